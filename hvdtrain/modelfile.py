"""Models out of sharded checkpoints: ``model.keras`` written one variable at a time, and the whole model built in
one process from a checkpoint.

**Streaming** (:func:`write_keras`). A ``.keras`` file is a zip of ``config.json`` (the model's structure),
``metadata.json`` and ``model.weights.h5`` (each layer's variables). Keras writes both from a model in memory; a
model whose weights do not fit one process cannot be held to write them. So Keras writes them for a *twin*: a
model of the same structure whose weights are tiny (the family's plan says which builder parameters make it, e.g.
a gpt of width ``num_heads`` with ``mlp_ratio`` 1, a llama of head size 2 with one hidden unit); each twin
variable is first filled with its own index, which
finds its dataset in the weights file whatever Keras names it. Then the config's sizes are set back to the real
ones and each dataset is replaced by the real variable, read from the checkpoint and written, one at a time. The
result is the file Keras would have written (tested: it loads with ``tf.keras.models.load_model`` and equals the
model trained in one process).

**Loading** (:func:`build_from_checkpoint`): the whole Keras model built in one process and each variable read
from the checkpoint, for ``generate``, ``evaluate``, ``compress`` and ``export`` when a run kept no ``model.keras``
(``train.save_model: false``).
"""
from __future__ import annotations

import json
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from hvdtrain import storage
from hvdtrain.checkpoint import CheckpointError, Reader
from hvdtrain.errors import ModelFileError


def spec_of(reader: Reader) -> dict:
    """The model a checkpoint holds: ``{name, params, input_shape, num_classes}``."""
    spec = reader.manifest.get("model")
    if not spec:
        raise ModelFileError(f"{reader.uri} does not say which model it holds; it cannot be assembled")
    return spec


def _plan(spec: dict, **override):
    import models

    params = {**spec["params"], **override}
    return models.parallel_plan(spec["name"], input_shape=tuple(spec["input_shape"]),
                                num_classes=spec["num_classes"], **params)


def write_keras(checkpoint_uri: str, uri: str) -> None:
    """Write the model of the checkpoint at ``checkpoint_uri`` to ``uri`` (``.keras``), one variable at a time."""
    import h5py
    import tensorflow as tf

    import models
    from models.plan import keras_variables

    reader = Reader(checkpoint_uri)
    spec = spec_of(reader)
    plan = _plan(spec)
    twin_params = {**spec["params"], **plan.twin["params"]}
    twin = models.build(spec["name"], input_shape=tuple(spec["input_shape"]), num_classes=spec["num_classes"],
                        **twin_params)
    names = {}
    for k, (name, var) in enumerate(keras_variables(twin, _plan(spec, **plan.twin["params"])).items()):
        var.assign(tf.fill(var.shape, float(k + 1)))
        names[k + 1] = name
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
                name = names.get(int(marker[0])) if marker.size else None
                if name is None:
                    continue
                del weights[path]
                weights.create_dataset(path, data=reader.read(name))  # one variable in memory at a time
        with storage.staged(uri, ".keras") as out:
            with zipfile.ZipFile(out, "w") as z:
                for part in ("metadata.json", "config.json", "model.weights.h5"):
                    z.write(tmp / "parts" / part, part)


def build_from_checkpoint(checkpoint_uri: str):
    """The whole model of a checkpoint, built in this process (for serving and compression)."""
    import models
    from hvdtrain.distributed.sharded import keras_name
    from models.plan import keras_variables

    reader = Reader(checkpoint_uri)
    spec = spec_of(reader)
    fits(reader)
    model = models.build(spec["name"], input_shape=tuple(spec["input_shape"]), num_classes=spec["num_classes"],
                         **spec["params"])
    if models.has_plan(spec["name"]):
        named = keras_variables(model, _plan(spec))
    else:
        named = {keras_name(i, v): v for i, v in enumerate(model.variables)}
    for name, var in named.items():
        try:
            var.assign(reader.read(name).astype(var.dtype.as_numpy_dtype))
        except CheckpointError as exc:
            raise ModelFileError(f"cannot assemble the model of {checkpoint_uri}: {exc}") from None
    return model


def fits(reader: Reader) -> None:
    """A one-line error when the checkpoint's weights cannot be held in this host's available memory."""
    total = sum(int(np.prod(v["shape"])) for v in reader.variables.values()) * 4
    available = _available_bytes()
    if available and total > available:
        raise ModelFileError(
            f"the model of {reader.uri} has {total / 2**30:.1f} GiB of float32 weights, more than this host's "
            f"{available / 2**30:.1f} GiB of available memory: it cannot be assembled in one process; evaluate it at a "
            "parallel layout (horovodrun ... hvdtrain evaluate --set parallel.tensor=N)")


def _available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
