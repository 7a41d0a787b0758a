"""Model formats, one home: every way a model enters or leaves files.

- ``.keras`` files (:mod:`~hvdtrain.formats.keras_file`): what a run ends with, loaded in Keras' safe mode, saved
  without the optimizer, and written one variable at a time from a sharded checkpoint;
- sharded checkpoints (:mod:`~hvdtrain.formats.checkpoint`): what every rank of a layout writes and reads back at
  any layout, and whole models assembled from one;
- Hugging Face directories (:mod:`~hvdtrain.formats.huggingface`): ``config.json`` with safetensors weights, read
  straight into a rank's share and written back (full models and PEFT adapters).

A model given to a command (``--model``) is resolved here: a ``.keras``/``.tflite`` file, a run directory (its
``model.keras``, or without one its newest checkpoint), a checkpoint folder, or a Hugging Face directory. Paths may
be local or on object storage.
"""
from __future__ import annotations

from pathlib import Path

from hvdtrain import storage
from hvdtrain.errors import DataError, ModelFileError


def resolve(path: str | Path) -> str:
    """A model's URI: a ``.keras``/``.tflite`` file, a run directory's ``model.keras`` (or, without one, its newest
    checkpoint), a checkpoint folder, or a Hugging Face directory."""
    from hvdtrain.formats import checkpoint, huggingface

    uri = str(path).rstrip("/")
    storage.check(uri)
    if storage.is_dir(uri):
        if checkpoint.is_sharded(uri) or huggingface.is_pretrained(uri):
            return uri
        inner = storage.join(uri, "model.keras")
        if storage.exists(inner):
            return inner
        newest = checkpoint.latest(uri)
        if newest is not None and checkpoint.is_sharded(newest):
            return newest
        if storage.exists(storage.join(uri, huggingface.CONFIG)):
            huggingface.check_directory(uri)  # config.json without weights: one line saying what is missing
        raise ModelFileError(f"'{uri}' is a directory without model.keras, a complete checkpoint or a Hugging Face "
                             "model (config.json + model.safetensors); give a run directory or a model file")
    if not storage.exists(uri):
        raise ModelFileError(f"model file '{uri}' does not exist")
    return uri


def is_checkpoint(uri: str) -> bool:
    """Whether a resolved model is a checkpoint folder (not a file)."""
    from hvdtrain.formats import checkpoint

    return storage.is_dir(uri) and checkpoint.is_sharded(uri)


def is_huggingface(uri: str) -> bool:
    """Whether a resolved model is a Hugging Face directory."""
    from hvdtrain.formats import huggingface

    return storage.is_dir(uri) and huggingface.is_pretrained(uri)


def run_dir_of(path: str | Path) -> str:
    """The directory that holds a model (its run directory; a Hugging Face directory is its own)."""
    resolved = resolve(path)
    if is_checkpoint(resolved):  # RUN/checkpoints/epoch-NNNN
        return storage.parent(storage.parent(resolved))
    if is_huggingface(resolved):
        return resolved
    return storage.parent(resolved)


def load_model(path: str | Path, allow_unsafe: bool = False, context_length: int = 0):
    """The whole Keras model at ``path``, whatever its format (see the module doc).

    ``context_length``: for a Hugging Face directory, the model's window (0: the checkpoint's, at most
    :data:`models.hub.DEFAULT_CONTEXT`).

    Raises:
        ModelFileError: the file is missing, is a TFLite model, or is not a readable model.
    """
    uri = resolve(path)
    if is_checkpoint(uri):
        from hvdtrain.formats import checkpoint

        return checkpoint.assemble(uri)
    if is_huggingface(uri):
        from hvdtrain.formats import huggingface

        return huggingface.load_model(uri, context_length)
    if uri.endswith(".tflite"):
        raise ModelFileError(f"'{uri}' is a TFLite model; this step needs a Keras model (.keras), e.g. "
                             "runs/x/model.keras")
    from hvdtrain.formats import keras_file

    return keras_file.load(uri, allow_unsafe)


def open_slices(path: str | Path, context_length: int = 0):
    """``(plan, initial)`` for a member of a tensor-parallel group to build its part of the model at ``path``
    without the whole: ``initial(weight, box)`` reads the box ``(start, size)`` of a weight (the bytes of it
    alone, where the format allows). ``path``: a Hugging Face directory, a checkpoint, or a run directory (its
    newest checkpoint); a LoRA run's weights come merged (``W + alpha / rank x A B``, one weight at a time)."""
    from hvdtrain.formats import checkpoint, huggingface

    uri = resolve(path)
    if is_huggingface(uri):
        found = huggingface.open_checkpoint(uri, context_length)
        plan = found.plan()
        return plan, huggingface.initial_values(found, plan)
    if not is_checkpoint(uri):
        newest = checkpoint.latest(run_dir_of(uri)) if uri.endswith(".keras") else None
        if newest is None or not checkpoint.is_sharded(newest):
            raise ModelFileError(f"'{uri}' is a model file; a tensor-parallel layout reads its slices from a run "
                                 "directory with checkpoints, a checkpoint or a Hugging Face directory")
        uri = newest
    reader = checkpoint.Reader(uri)
    spec = checkpoint.spec_of(reader)
    plan = checkpoint.plan_of_spec(spec)
    if spec.get("lora"):
        values = checkpoint.model_values(reader)

        def merged(weight, box):
            start, size = box
            return values(weight.name)[tuple(slice(a, a + n) for a, n in zip(start, size))]

        return plan, merged
    return plan, lambda weight, box: reader.read(weight.name, "param", box)


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
    commands' --recipe/--config) says otherwise; ``overrides`` (--set) on top.

    A Hugging Face directory has no run: its config is the ``llama-finetune`` recipe's (the embedded corpus, windows
    of 64 tokens) with ``model.pretrained`` set to it, unless a recipe or a config file says otherwise.
    """
    from hvdtrain import config

    overrides = list(overrides or [])
    if is_huggingface(resolve(model_path)):
        pretrained = [f"model.pretrained={str(model_path).rstrip('/')}"]
        return config.load(recipe or (None if config_file else "llama-finetune"), config_file, pretrained + overrides)
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
