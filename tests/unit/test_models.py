import numpy as np
import pytest
import tensorflow as tf

import models


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_builder_is_pure_uncompiled_and_trains_a_step(name):
    model = models.build(name, input_shape=(8, 8, 1), num_classes=10)
    assert isinstance(model, tf.keras.Model)
    assert model.optimizer is None  # builders never compile
    assert model.output.dtype == tf.float32
    x = np.random.default_rng(0).random((16, 8, 8, 1), dtype=np.float32)
    y = np.arange(16) % 10
    model.compile("sgd", tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [w.copy() for w in model.get_weights()]
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert any(not np.allclose(a, b) for a, b in zip(before, model.get_weights()))
    # get_config round-trips
    clone = tf.keras.Model.from_config(model.get_config())
    assert clone.count_params() == model.count_params()


def test_unknown_model_and_parameter_are_named():
    with pytest.raises(models.ModelParamError, match="did you mean 'cnn'"):
        models.build("cnnn", input_shape=(8, 8, 1), num_classes=10)
    with pytest.raises(models.ModelParamError, match="did you mean 'model.params.filters'"):
        models.build("cnn", input_shape=(8, 8, 1), num_classes=10, filterz=(8,))


def test_logits_stay_float32_under_mixed_precision():
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = models.build("cnn", input_shape=(8, 8, 1), num_classes=10)
        assert model.get_layer("conv_0").compute_dtype == "float16"
        assert model.output.dtype == tf.float32
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")


def test_autograph_leaves_our_packages_as_written_and_converts_a_users_code():
    """models/__init__.py: no AutoGraph rewrite of hvdtrain, models and Horovod (seconds per process)."""
    from tensorflow.python.autograph.impl import conversion

    import models  # noqa: F401
    from hvdtrain import exact_metrics
    from models import gpt

    def users_own_step(x):
        return x

    assert conversion.is_allowlisted(gpt.block) and conversion.is_allowlisted(exact_metrics.local_sums)
    assert not conversion.is_allowlisted(users_own_step)
