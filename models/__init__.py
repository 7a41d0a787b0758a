"""Model builders: pure functions, registered by name, returning uncompiled Keras models.

    import models
    model = models.build("cnn", input_shape=(8, 8, 1), num_classes=10, filters=(32, 64))
"""
from models.registry import (ModelParamError, build, builder, check_params, has_plan, language_models, names, params_of,
                             parallel_plan, plan_of, register, register_plan)

# The families register their builders and plans, and their custom layers with Keras' serialization registry, when
# their modules are imported: `import models` is then all a process needs before `tf.keras.models.load_model`.
from models import cnn, gpt, llama, mlp, resnet  # noqa: E402,F401  isort: skip

__all__ = ["ModelParamError", "build", "builder", "check_params", "has_plan", "language_models", "names", "params_of",
           "parallel_plan", "plan_of", "register", "register_plan"]
