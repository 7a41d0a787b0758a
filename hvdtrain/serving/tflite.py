"""TFLite export, and running TFLite models in LiteRT's interpreter (TensorFlow's where LiteRT is missing)."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np

from hvdtrain import storage
from hvdtrain.errors import HvdtrainError

@contextlib.contextmanager
def quiet_stderr():
    """Silence the converter's C++ logging (it writes to file descriptor 2 directly) unless HVDTRAIN_DEBUG is set."""
    if os.environ.get("HVDTRAIN_DEBUG"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def to_tflite(model, path: Path, mode: str = "float32", representative=None, int8_io: bool = False,
              quantization_aware: bool = False) -> Path:
    """Convert a Keras model to a ``.tflite`` file (written atomically) and return its path.

    Args:
        model: the Keras model.
        path: where to write it.
        mode: ``float32`` (no quantization), ``dynamic`` (int8 weights, float activations), ``float16``
            (float16 weights), or ``int8`` (full integer, calibrated on ``representative``).
        representative: an array of input examples for ``int8`` calibration.
        int8_io: with ``int8``: integer inputs and outputs too (for integer-only accelerators).
        quantization_aware: the model was trained with QAT; ``int8`` then needs no calibration data.
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if mode == "dynamic" or (mode == "int8" and quantization_aware):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif mode == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif mode == "int8":
        if representative is None or len(representative) == 0:
            raise HvdtrainError("full-integer quantization needs representative examples from the training data")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([x[None].astype(representative.dtype)] for x in representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    elif mode != "float32":
        raise ValueError(f"unknown TFLite mode '{mode}'")
    try:
        with quiet_stderr():
            data = converter.convert()
    except Exception as exc:  # noqa: BLE001 - the converter raises many types
        raise HvdtrainError(f"TFLite conversion ({mode}) failed: {str(exc).splitlines()[0][:300]}") from None
    with storage.atomic_local(path) as tmp:
        tmp.write_bytes(data)
    return path


_FALLBACK_SAID = False


def interpreter_class():
    """``(Interpreter, name)``: LiteRT's (``ai-edge-litert``, the TFLite runtime Google develops now), or where it
    is not installed TensorFlow's ``tf.lite.Interpreter``, which is deprecated and warns at every use: said once
    here, and its own warning silenced."""
    global _FALLBACK_SAID
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "litert"
    except ImportError:
        import warnings

        import tensorflow as tf

        if not _FALLBACK_SAID:
            from hvdtrain import console

            console.warn("LiteRT (pip install ai-edge-litert) is not installed: TFLite models run in TensorFlow's "
                         "deprecated tf.lite.Interpreter")
            _FALLBACK_SAID = True

        def deprecated(*args, **kwargs):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return tf.lite.Interpreter(*args, **kwargs)

        return deprecated, "tensorflow"


class TFLiteModel:
    """A ``.tflite`` model in the interpreter, called on float inputs one batch at a time.

    Quantized inputs and outputs (``int8_io``) are converted with the model's own scale and zero point, so callers
    always pass and get floats.
    """

    def __init__(self, path: str | Path, num_threads: int = 1):
        interpreter, _ = interpreter_class()
        try:
            self.interpreter = interpreter(model_path=str(path), num_threads=num_threads)
        except ValueError as exc:
            raise HvdtrainError(f"'{path}' is not a TFLite model: {str(exc).splitlines()[0][:200]}") from None
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.batch = None

    def _resize(self, batch: int) -> None:
        if batch != self.batch:
            shape = list(self.input["shape"])
            shape[0] = batch
            self.interpreter.resize_tensor_input(self.input["index"], shape)
            self.interpreter.allocate_tensors()
            self.input = self.interpreter.get_input_details()[0]
            self.output = self.interpreter.get_output_details()[0]
            self.batch = batch

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self._resize(len(x))
        dtype = self.input["dtype"]
        if dtype == np.int8 and x.dtype != np.int8:
            scale, zero = self.input["quantization"]
            x = np.clip(np.round(x / scale + zero), -128, 127).astype(np.int8)
        self.interpreter.set_tensor(self.input["index"], x.astype(dtype))
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self.output["index"])
        if self.output["dtype"] == np.int8:
            scale, zero = self.output["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y

    @property
    def input_shape(self) -> tuple:
        """Input shape without the batch axis."""
        return tuple(self.input["shape"][1:])

    def tensor_types(self) -> list[str]:
        """Data types of all tensors (to check what was really quantized)."""
        return [np.dtype(t["dtype"]).name for t in self.interpreter.get_tensor_details()]
