"""Every registered builder: pure, uncompiled, float32 logits, and able to train a step on tiny inputs."""
import numpy as np
import pytest
import tensorflow as tf

import models

TINY = {
    "mlp": dict(input_shape=(8, 8, 1), num_classes=10),
    "cnn": dict(input_shape=(8, 8, 1), num_classes=10),
    "resnet_small": dict(input_shape=(16, 16, 3), num_classes=5, blocks_per_stage=1, filters=(4, 8, 8)),
    "resnet50": dict(input_shape=(32, 32, 3), num_classes=3),
    "gpt": dict(input_shape=(12,), num_classes=256, num_layers=1, num_heads=2, width=16),
    "llama": dict(input_shape=(12,), num_classes=300, num_layers=1, num_heads=4, kv_heads=2, width=16),
}


def test_every_registered_model_is_covered():
    assert sorted(TINY) == models.names()


@pytest.mark.parametrize("name", sorted(TINY))
def test_builds_and_trains_a_step(name):
    params = dict(TINY[name])
    model = models.build(name, **params)
    assert model.optimizer is None and model.output.dtype == tf.float32
    rng = np.random.default_rng(0)
    if name in models.language_models():
        vocab = params["num_classes"]
        x = rng.integers(0, vocab, (4, 12)).astype(np.int32)
        y = rng.integers(0, vocab, (4, 12)).astype(np.int32)
        assert model.output_shape == (None, 12, vocab)
    else:
        x = rng.random((4, *params["input_shape"]), dtype=np.float32)
        y = np.arange(4) % params["num_classes"]
        assert model.output_shape == (None, params["num_classes"])
    model.compile(tf.keras.optimizers.SGD(0.01), tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = model.trainable_weights[0].numpy().copy()
    loss = model.train_on_batch(x, y)
    assert np.isfinite(loss)
    assert not np.array_equal(before, model.trainable_weights[0].numpy())


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_language_models_are_causal(family):
    model = models.build(family, input_shape=(24,), num_classes=256, num_layers=2, num_heads=2, width=32,
                         dropout=0.0)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (3, 24)).astype(np.int32)
    base = model(x).numpy()
    for t in (0, 7, 22):
        changed = x.copy()
        changed[:, t + 1:] = rng.integers(0, 256, (3, 23 - t))
        out = model(changed).numpy()
        np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-5)  # positions <= t unchanged
        assert np.abs(out[:, t + 1:] - base[:, t + 1:]).max() > 1e-3  # later positions do see the change


def test_gpt_round_trips_through_a_keras_file(tmp_path):
    from hvdtrain import formats

    model = models.build("gpt", input_shape=(8,), num_classes=256, num_layers=1, num_heads=2, width=16)
    model.save(tmp_path / "gpt.keras")
    loaded = formats.load_model(tmp_path / "gpt.keras")
    x = np.arange(16, dtype=np.int32).reshape(2, 8)
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=1e-6)


def test_gpt_rejects_heads_that_do_not_divide_the_width():
    with pytest.raises(ValueError, match="must divide"):
        models.build("gpt", input_shape=(8,), num_classes=256, num_heads=3, width=16)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_language_models_multiply_with_plain_matmuls(family):
    """Every product of a block is a matmul that neither broadcasts a weight over the batch nor is an einsum in
    bfloat16. ``tf.matmul(x3d, w2d)`` forms the weight's gradient one example at a time (the gpt's MLP took 2.8x
    longer that way on 2 CPU cores); a CPU einsum in bfloat16 rounds as it accumulates (4.8% off at worst for a
    (2048 x 512) x (512 x 2048) product, against a matmul's 0.41%): docs/performance.md, "One process"."""
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = models.build(family, input_shape=(12,), num_classes=256, num_layers=1, num_heads=4, width=16,
                             dropout=0.0)
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    x = tf.zeros((2, 12), tf.int32)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x, training=True))
        return tape.gradient(loss, model.trainable_weights)

    graph = step.get_concrete_function(x).graph
    products = [op for op in graph.get_operations() if op.type.startswith(("BatchMatMul", "MatMul", "Einsum"))]
    assert len(products) >= 8  # the projections, forward and backward, are in the graph
    broadcast = [op.name for op in products if op.type.startswith("BatchMatMul")
                 and len({len(t.shape) for t in op.inputs}) > 1]
    assert not broadcast, f"weights broadcast over the batch: {broadcast}"
    bf16_einsums = [op.name for op in products if op.type == "Einsum" and op.inputs[0].dtype == tf.bfloat16]
    assert not bf16_einsums, f"einsums in bfloat16: {bf16_einsums}"
