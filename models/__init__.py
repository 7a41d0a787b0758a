"""Model builders: pure functions, registered by name, returning uncompiled Keras models.

    import models
    model = models.build("cnn", input_shape=(8, 8, 1), num_classes=10, filters=(32, 64))
"""
from models.registry import (ModelParamError, build, builder, check_params, has_plan, names, params_of, parallel_plan,
                             register, register_plan)

__all__ = ["ModelParamError", "build", "builder", "check_params", "has_plan", "names", "params_of", "parallel_plan",
           "register", "register_plan"]
