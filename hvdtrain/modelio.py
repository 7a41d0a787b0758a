"""Loading saved models, with clear errors and Keras' safe mode."""
from __future__ import annotations

import zipfile
from pathlib import Path

from hvdtrain.errors import ModelFileError


def resolve(path: str | Path) -> Path:
    """A model path: a ``.keras``/``.tflite`` file, or a run directory holding ``model.keras``."""
    p = Path(path)
    if p.is_dir():
        if (p / "model.keras").is_file():
            return p / "model.keras"
        raise ModelFileError(f"'{p}' is a directory without model.keras; give a run directory or a model file")
    if not p.exists():
        raise ModelFileError(f"model file '{p}' does not exist")
    return p


def load_keras(path: str | Path, allow_unsafe: bool = False):
    """Load a ``.keras`` model in Keras' safe mode (no code from Lambda layers) unless ``allow_unsafe``.

    Raises:
        ModelFileError: the file is missing, is a TFLite model, or is not a readable Keras archive.
    """
    p = resolve(path)
    if p.suffix == ".tflite":
        raise ModelFileError(f"'{p}' is a TFLite model; this step needs a Keras model (.keras), e.g. runs/x/model.keras")
    if not zipfile.is_zipfile(p):
        raise ModelFileError(f"'{p}' is not a Keras model file (.keras archive); it may be truncated or corrupt")
    import tensorflow as tf

    import models

    models.names()  # registers the custom layers (for example the GPT blocks) before loading
    try:
        return tf.keras.models.load_model(p, compile=False, safe_mode=not allow_unsafe)
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for a bad archive
        reason = str(exc).splitlines()[0][:200]
        raise ModelFileError(f"cannot load '{p}': {reason}") from None
