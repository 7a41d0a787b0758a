""".keras files: loaded with clear errors and Keras' safe mode, saved whole without the optimizer, and written one
variable at a time from a sharded checkpoint.

**Streaming** (:func:`write_from_checkpoint`). A ``.keras`` file is a zip of ``config.json`` (the model's
structure), ``metadata.json`` and ``model.weights.h5`` (each layer's variables). Keras writes both from a model in
memory; a model whose weights do not fit one process cannot be held to write them. So Keras writes them for a
*twin*: a model of the same structure whose weights are tiny (the family's plan says which builder parameters make
it, e.g. a gpt of width ``num_heads`` with ``mlp_ratio`` 1, a llama of head size 2 with one hidden unit); each twin
variable is first filled with its own index, which finds its dataset in the weights file whatever Keras names it.
Then the config's sizes are set back to the real ones and each dataset is replaced by the real variable, read from
the checkpoint and written, one at a time. The result is the file Keras would have written (tested: it loads with
``tf.keras.models.load_model`` and equals the model trained in one process).
"""
from __future__ import annotations

import json
import tempfile
import zipfile
from pathlib import Path


from hvdtrain import storage
from hvdtrain.errors import ModelFileError


CLOCK_MARK = -7  # what a dropout step counter holds in the twin whose weights mark their names


def write_from_checkpoint(checkpoint_uri: str, uri: str, values=None) -> None:
    """Write the model of the checkpoint at ``checkpoint_uri`` to ``uri`` (``.keras``), one variable at a time.

    ``values(name)``: a weight's whole value (default: the model's, :func:`~hvdtrain.formats.checkpoint.model_values`:
    a LoRA run's adapters merged into its pretrained weights)."""
    from hvdtrain.formats.checkpoint import Reader, model_values, spec_of

    reader = Reader(checkpoint_uri)
    write_streamed(spec_of(reader), values or model_values(reader), int(reader.scalars.get("iterations", 0)), uri)


def write_streamed(spec: dict, values, step: int, uri: str) -> None:
    """Write the model ``spec`` names (``{name, params, input_shape, num_classes}``, a family with a plan) to
    ``uri`` (``.keras``), each weight's whole value read by ``values(name)`` when written; its dropout step counters
    at ``step``. Also how a whole model in memory is saved without a copy of it (:func:`save_planned`)."""
    import h5py
    import tensorflow as tf

    import models
    from models.plan import keras_variables, set_clocks

    from hvdtrain.formats.checkpoint import plan_of_spec

    plan = plan_of_spec(spec)
    twin_params = {**spec["params"], **plan.twin["params"]}
    twin = models.build(spec["name"], input_shape=tuple(spec["input_shape"]), num_classes=spec["num_classes"],
                        **twin_params)
    names = {}
    for k, (name, var) in enumerate(keras_variables(twin, plan_of_spec(spec, **plan.twin["params"])).items()):
        var.assign(tf.fill(var.shape, float(k + 1)))
        names[k + 1] = name
    set_clocks(twin, CLOCK_MARK)  # the dropout step counters: the run's step, as a one-process model.keras has
    with tempfile.TemporaryDirectory(prefix="hvdtrain-modelfile-") as tmp:
        tmp = Path(tmp)
        twin.save(tmp / "twin.keras")
        del twin
        with zipfile.ZipFile(tmp / "twin.keras") as z:
            z.extractall(tmp / "parts")
        config = json.loads((tmp / "parts" / "config.json").read_text())
        for layer in config["config"]["layers"]:
            for key, value in plan.twin["restore"].items():
                if key in layer.get("config", {}):
                    layer["config"][key] = value
        (tmp / "parts" / "config.json").write_text(json.dumps(config))
        with h5py.File(tmp / "parts" / "model.weights.h5", "r+") as weights:
            datasets = []
            weights.visititems(lambda path, obj: datasets.append(path) if isinstance(obj, h5py.Dataset) else None)
            for path in datasets:
                marker = weights[path][()].ravel()
                if weights[path].dtype.kind == "i" and marker.size == 1 and marker[0] == CLOCK_MARK:
                    weights[path][()] = step
                    continue
                name = names.get(int(marker[0])) if marker.size else None
                if name is None:
                    continue
                del weights[path]
                weights.create_dataset(path, data=values(name))  # one variable in memory at a time
        with storage.staged(uri, ".keras") as out:
            with zipfile.ZipFile(out, "w") as z:
                for part in ("metadata.json", "config.json", "model.weights.h5"):
                    z.write(tmp / "parts" / part, part)


def load(uri: str, allow_unsafe: bool = False):
    """Load a ``.keras`` model (local or on object storage) in Keras' safe mode (no code from Lambda layers) unless
    ``allow_unsafe``."""
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


def save(model, uri: str | Path, scope=None) -> None:
    """Save ``model`` without its optimizer as a standard ``.keras`` file, whole (atomically where possible).

    The Horovod optimizer is a class made at run time that a plain process cannot load; a clone with the same
    weights saves as a ``.keras`` file that loads anywhere (checkpoints keep the optimizer state). ``scope`` is a
    context manager needed to clone some models (tfmot's ``quantize_scope``).
    """
    import contextlib

    import tensorflow as tf

    with scope() if scope is not None else contextlib.nullcontext():
        clone = tf.keras.models.clone_model(model)
        for target, source in zip(clone.weights, model.weights):  # one variable at a time, not a NumPy copy of all
            target.assign(source)
        with storage.staged(str(uri)) as tmp:
            clone.save(tmp)


def save_planned(model, plan, spec: dict, step: int, uri: str | Path) -> None:
    """Save a whole model of a family with a plan as :func:`save` would, one weight at a time (no clone of it: a
    clone and its weights' copies raised a one-process run's peak by 4 bytes per parameter)."""
    from models.plan import keras_variables

    variables = keras_variables(model, plan)
    write_streamed(spec, lambda name: variables[name].numpy(), step, str(uri))
