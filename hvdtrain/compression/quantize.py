"""Quantization: quantization-aware training (fine-tuned data-parallel) and post-training quantization (TFLite).

QAT (Jacob et al., 2018) inserts fake-quantization of weights and activations with tfmot and fine-tunes, so the
int8 TFLite model keeps the float model's accuracy. tfmot quantizes the built-in Keras layers only: a model with
other layers (the GPT blocks, attention) stops with an error that names them, unless
``compression.qat_fallback=true``, which quantizes the supported layers and leaves the rest in float.
Post-training quantization (dynamic range, float16, full int8 calibrated on training examples) needs no training
and works for every registered model, ``gpt`` included.
"""
from __future__ import annotations

from hvdtrain.compression.common import fine_tune
from hvdtrain.config import Config
from hvdtrain.errors import HvdtrainError


def unsupported_layers(model) -> list[tuple[str, str]]:
    """(name, type) of the layers tfmot's default 8-bit scheme cannot quantize."""
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
        default_8bit_quantize_registry as registry,
    )

    reg = registry.Default8BitQuantizeRegistry()
    skip = ("InputLayer",)
    return [(layer.name, type(layer).__name__) for layer in model.layers
            if type(layer).__name__ not in skip and not reg.supports(layer)]


def quantization_aware(model, source, cfg: Config, model_name: str, epochs: int | None = None):
    """Wrap ``model`` for QAT and fine-tune it; returns ``(qat_model, notes)``."""
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot

    unsupported = unsupported_layers(model)
    weighted = [layer.name for layer in model.layers if layer.weights]
    if weighted and {n for n, _ in unsupported} >= set(weighted):
        names = ", ".join(f"{n} ({t})" for n, t in unsupported)
        raise HvdtrainError(
            f"quantization-aware training has no layer of '{model_name}' it can quantize (its layers are the "
            f"family's own: {names}); use --method ptq-int8 or ptq-dynamic")
    if unsupported and not cfg.compression.qat_fallback:
        names = ", ".join(f"{n} ({t})" for n, t in unsupported)
        raise HvdtrainError(
            f"quantization-aware training does not support these layers of '{model_name}': {names}; use "
            "--method ptq-dynamic, or --set compression.qat_fallback=true to quantize only the supported layers"
        )
    if unsupported:
        skipped = {n for n, _ in unsupported}

        def annotate(layer):
            if layer.name in skipped:
                return layer.__class__.from_config(layer.get_config())
            return tfmot.quantization.keras.quantize_annotate_layer(layer.__class__.from_config(layer.get_config()))

        annotated = tf.keras.models.clone_model(model, clone_function=annotate)
        annotated.set_weights(model.get_weights())
        qat = tfmot.quantization.keras.quantize_apply(annotated)
    else:
        qat = tfmot.quantization.keras.quantize_model(model)
    fine_tune(qat, source, cfg, epochs or cfg.compression.fine_tune_epochs, cfg.compression.learning_rate)
    return qat, {"float_layers": [n for n, _ in unsupported]}
