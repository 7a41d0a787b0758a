"""Models in and out of files: loading with clear errors and Keras' safe mode, saving a plain ``.keras``, and
checking that a model fits the data it is given. Paths may be local or on object storage.

A model is a ``.keras`` file, a run directory holding one, or, when the run kept none (``train.save_model:
false``), the run's newest checkpoint (or a checkpoint folder given directly), assembled in this process
(:mod:`hvdtrain.modelfile`).
"""
from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

from hvdtrain import storage
from hvdtrain.errors import DataError, ModelFileError


def resolve(path: str | Path) -> str:
    """A model's URI: a ``.keras``/``.tflite`` file, a run directory's ``model.keras`` (or, without one, its newest
    checkpoint), or a checkpoint folder."""
    from hvdtrain import checkpoint

    uri = str(path).rstrip("/")
    storage.check(uri)
    if storage.is_dir(uri):
        if checkpoint.is_sharded(uri):
            return uri
        inner = storage.join(uri, "model.keras")
        if storage.exists(inner):
            return inner
        newest = checkpoint.latest(uri)
        if newest is not None and checkpoint.is_sharded(newest):
            return newest
        raise ModelFileError(f"'{uri}' is a directory without model.keras or a complete checkpoint; give a run "
                             "directory or a model file")
    if not storage.exists(uri):
        raise ModelFileError(f"model file '{uri}' does not exist")
    return uri


def is_checkpoint(uri: str) -> bool:
    """Whether a resolved model is a checkpoint folder (not a file)."""
    from hvdtrain import checkpoint

    return storage.is_dir(uri) and checkpoint.is_sharded(uri)


def run_dir_of(path: str | Path) -> str:
    """The directory that holds a model (its run directory)."""
    resolved = resolve(path)
    if is_checkpoint(resolved):  # RUN/checkpoints/epoch-NNNN
        return storage.parent(storage.parent(resolved))
    return storage.parent(resolved)


def load_keras(path: str | Path, allow_unsafe: bool = False):
    """Load a ``.keras`` model in Keras' safe mode (no code from Lambda layers) unless ``allow_unsafe``.

    Raises:
        ModelFileError: the file is missing, is a TFLite model, or is not a readable Keras archive.
    """
    uri = resolve(path)
    if is_checkpoint(uri):
        from hvdtrain import modelfile

        return modelfile.build_from_checkpoint(uri)
    if uri.endswith(".tflite"):
        raise ModelFileError(f"'{uri}' is a TFLite model; this step needs a Keras model (.keras), e.g. "
                             "runs/x/model.keras")
    if storage.is_local(uri):
        return _load_local(storage.local_path(uri), uri, allow_unsafe)
    with tempfile.TemporaryDirectory(prefix="hvdtrain-model-") as tmp:
        local = Path(tmp) / "model.keras"
        storage.download(uri, local)
        return _load_local(local, uri, allow_unsafe)


def _load_local(local: Path, name: str, allow_unsafe: bool):
    if not zipfile.is_zipfile(local):
        raise ModelFileError(f"'{name}' is not a Keras model file (.keras archive); it may be truncated or corrupt")
    import tensorflow as tf

    import models

    models.names()  # registers the custom layers (for example the GPT blocks) before loading
    try:
        return tf.keras.models.load_model(local, compile=False, safe_mode=not allow_unsafe)
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for a bad archive
        reason = str(exc).splitlines()[0][:200]
        raise ModelFileError(f"cannot load '{name}': {reason}") from None


def save_keras(model, uri: str | Path, scope=None) -> None:
    """Save ``model`` without its optimizer as a standard ``.keras`` file, whole (atomically where possible).

    The Horovod optimizer is a class made at run time that a plain process cannot load; a clone with the same
    weights saves as a ``.keras`` file that loads anywhere (checkpoints keep the optimizer state). ``scope`` is a
    context manager needed to clone some models (tfmot's ``quantize_scope``).
    """
    import contextlib

    import tensorflow as tf

    with scope() if scope is not None else contextlib.nullcontext():
        clone = tf.keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
        with storage.staged(str(uri)) as tmp:
            clone.save(tmp)


def check_fit(model, source, what: str = "the model") -> None:
    """Fail clearly when a model's input or output does not match the data."""
    want_in, got_in = tuple(source.input_shape), tuple(model.input_shape[1:])
    if want_in != got_in:
        raise DataError(f"{what} takes inputs of shape {got_in}, but the data has {want_in}; "
                        "use the data the model was trained on (the run's config.yaml)")
    classes = model.output_shape[-1]
    if classes != source.num_classes:
        raise DataError(f"{what} has {classes} outputs, but the data has {source.num_classes} classes")


def run_config(model_path: str, recipe: str | None = None, config_file: str | None = None,
               overrides: list[str] | None = None):
    """The config of the run that made ``model_path`` (its config.yaml), unless a recipe or a config file (the
    commands' --recipe/--config) says otherwise; ``overrides`` (--set) on top."""
    from hvdtrain import config

    overrides = list(overrides or [])
    if recipe or config_file:
        return config.load(recipe, config_file, overrides)
    found = storage.join(run_dir_of(model_path), "config.yaml")
    if not storage.exists(found):
        from hvdtrain.errors import UsageError

        raise UsageError(f"no config.yaml next to '{model_path}' to say which data it was trained on; "
                         "give --recipe NAME or --config FILE")
    # The run's model and data, but today's compression settings (a training run's config.yaml also records the
    # compression defaults of its day, which are not a choice the user made for this command) and this launch's
    # layout (--set parallel.tensor=2 under horovodrun), not the training run's.
    raw = config.read_yaml(storage.read_text(found), f"config file '{found}'")
    raw.pop("compression", None)
    raw.pop("parallel", None)
    return config.from_dict(config.apply_overrides(raw, overrides))
