"""Model builders: pure functions, registered by name, returning uncompiled Keras models.

    import models
    model = models.build("cnn", input_shape=(8, 8, 1), num_classes=10, filters=(32, 64))
"""
import importlib.util
import os

# TensorFlow >= 2.16 gives Keras 3 as tf.keras unless TF_USE_LEGACY_KERAS is set before TensorFlow is imported;
# hvdtrain (and Horovod's Keras layer) need Keras 2, which is then the tf-keras package. Set where tf-keras is
# installed (the default stack, TensorFlow 2.21); TensorFlow 2.15 has Keras 2 of its own and would look for
# tf-keras if it were set.
if importlib.util.find_spec("tf_keras") is not None:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")


from models.registry import (ModelParamError, build, builder, check_params, has_plan, language_models, names, params_of,
                             parallel_plan, plan_of, register, register_plan)

# The families register their builders and plans, and their custom layers with Keras' serialization registry, when
# their modules are imported: `import models` is then all a process needs before `tf.keras.models.load_model`.
from models import cnn, gpt, llama, mlp, resnet  # noqa: E402,F401  isort: skip
from models.hub import PretrainedError, from_pretrained, save_pretrained  # noqa: E402

__all__ = ["ModelParamError", "PretrainedError", "build", "builder", "check_params", "from_pretrained", "has_plan",
           "language_models", "names", "params_of", "parallel_plan", "plan_of", "register", "register_plan",
           "save_pretrained"]


def _written_for_graphs(*packages: str) -> None:
    """Leave these packages' functions to TensorFlow as they are written: their control flow on tensors is explicit
    (tf.while_loop, tf.cond) and their Python branches are on Python values, so AutoGraph's rewrite of each function
    (parsing and transforming its source) changes nothing but costs time in every process: 1.2 s of gpt-tiny's first
    build (1.5 s -> 0.3 s) and 1.4 s of llama-tiny's, and 1.9 s of Horovod's gradient allreduce in a data-parallel
    train step (measured). A user's own layers and steps are converted as before."""
    from tensorflow.python.autograph.core import config as autograph

    ruled = {str(rule) for rule in autograph.CONVERSION_RULES}
    autograph.CONVERSION_RULES = tuple(
        rule for rule in map(autograph.DoNotConvert, packages) if str(rule) not in ruled) + autograph.CONVERSION_RULES


_written_for_graphs("models", "hvdtrain", "horovod")
