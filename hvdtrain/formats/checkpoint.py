"""Checkpoints of a training run: sharded, written by every rank that holds state no other rank holds, readable at
any layout.

A checkpoint folder::

    checkpoints/epoch-0003/
      rank-00000.index, rank-00000.data-00000-of-0000N    one TensorFlow bundle per writing rank: its slices of
      rank-00001.index, ...                               the weights and of the optimizer's slots
      manifest.json     the layout it was written at, every variable's global shape and split, where each piece
                        of each variable is (file, key, tensor-parallel part, flat range), the optimizer's step
      state.json        written last: the marker of a complete checkpoint (epoch, metrics rows; see rundir.py)

Who writes: a rank of the first data-parallel replica writes its weights and slots (a replicated weight only on
the tensor group's first member); with sharded optimizer states every rank writes its slice (master weights and
slots) as flat ranges of the variables it covers. In data-parallel runs only the chief writes. Nothing is
gathered on one rank: each piece goes to storage from the rank that holds it.

Reading is planned from the manifest: :class:`Reader` returns any box of any variable, reading only the pieces
that overlap it (one saved slice in memory at a time), so a run resumes at another tensor, pipeline or data
degree, or in one process, and ``model.keras`` is written one variable at a time (:mod:`hvdtrain.formats.keras_file`).
Checkpoints written before this format (``ckpt.*`` files, one process) still restore in data-parallel runs.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hvdtrain import console, storage
from hvdtrain.errors import HvdtrainError, ModelFileError
from hvdtrain.rundir import CHECKPOINT_MARKER, RunDir, failpoint

MANIFEST = "manifest.json"
FORMAT = "hvdtrain-sharded-checkpoint"


class CheckpointError(HvdtrainError):
    """A checkpoint that cannot be read, or does not fit the model it is read into."""


def inner_optimizer(optimizer):
    """The optimizer inside a loss-scale wrapper (or the optimizer itself)."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def build_optimizer(optimizer, variables) -> None:
    """Create the optimizer's state for ``variables`` now, named as Keras names it in a first step. Built before
    training, the first step creates no variable, and TensorFlow traces the train function once instead of twice
    (digits-mlp in one process here: 7.9 s instead of 9.0 s, docs/performance.md)."""
    import tensorflow as tf

    inner = inner_optimizer(optimizer)
    with tf.name_scope(inner.name):
        inner.build(variables)


@dataclass(frozen=True)
class Piece:
    """A flat range of one tensor-parallel part of one variable's weights (``kind="param"``) or optimizer slot."""

    name: str
    kind: str
    part: int
    start: int
    stop: int
    # ``stop - start`` elements (or the part's shape when it is whole): a NumPy array, a variable or a tensor, or a
    # callable that makes one (when the bundle writes it)
    values: Any


def file_name(rank: int) -> str:
    """The bundle of a writing rank."""
    return f"rank-{rank:05d}"


CHUNK_BYTES = 32 * 2**20  # pieces made and written at a time (a bundle of more is written in parts, then merged)


def write_bundle(prefix: str, pieces: list[Piece]) -> list[list]:
    """Write ``pieces`` as one TensorFlow bundle at local ``prefix``; returns each piece's manifest row
    ``[name, kind, part, start, stop, key]``.

    A piece's values are made when their part is written (a callable's), so that a rank never holds a copy of its
    whole state: measured, a sharded-parameter rank's checkpoint of 7.2M float32 values and two Adam slots, made
    whole in NumPy and then as tensors, raised its peak by 181 MB. A variable is written from its own buffer (a
    float32 one is neither cast nor copied)."""
    import shutil

    import tensorflow as tf

    def tensor(values):
        values = values() if callable(values) else values
        if isinstance(values, (tf.Variable, tf.Tensor)):
            return tf.reshape(tf.cast(values, tf.float32), [-1])
        return tf.constant(np.asarray(values, np.float32).ravel())

    keys = [f"t{i}" for i in range(len(pieces))]
    chunks, size = [[]], 0
    for i, p in enumerate(pieces):
        if chunks[-1] and size + 4 * (p.stop - p.start) > CHUNK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(i)
        size += 4 * (p.stop - p.start)

    def save(target, indices):
        tf.raw_ops.SaveV2(prefix=target, tensor_names=[keys[i] for i in indices],
                          shape_and_slices=[""] * len(indices), tensors=[tensor(pieces[i].values) for i in indices])

    if len(chunks) == 1 and pieces:
        save(prefix, chunks[0])
    elif pieces:
        parts = tempfile.mkdtemp(prefix=".parts-", dir=os.path.dirname(prefix) or ".")
        try:
            names = [os.path.join(parts, f"part-{k}") for k in range(len(chunks))]
            for name, indices in zip(names, chunks):
                save(name, indices)
            tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=names, destination_prefix=prefix,
                                          delete_old_dirs=False)
        finally:
            shutil.rmtree(parts, ignore_errors=True)
    return [[p.name, p.kind, p.part, p.start, p.stop, k] for p, k in zip(pieces, keys)]


def save(run_dir_uri: str, chief: RunDir | None, number: int, layout, state: dict[str, Any], rank: int,
         unit: str = "epoch") -> str | None:
    """Write the checkpoint at the end of epoch (or step, with ``unit="step"``) ``number``; every rank of
    ``layout`` calls it when ``layout.collective_checkpoint``, only the chief otherwise. Returns the checkpoint's URI
    on the chief.

    Order: the chief removes an earlier partial attempt at this epoch; every writer writes its bundle; the chief
    writes the manifest, then the marker (last, so that a crash anywhere before leaves an incomplete checkpoint
    that the next start removes).
    """
    from hvdtrain import distributed

    collective = layout.collective_checkpoint and distributed.size() > 1
    target = RunDir(run_dir_uri)
    staging = target.checkpoint_staging(number, unit)
    if chief is not None:
        chief.begin_checkpoint(number, unit)
    if collective:
        distributed.barrier()  # the cleanup above before anyone writes
    pieces = layout.checkpoint_pieces()
    rows = []
    if pieces:
        name = file_name(rank)
        if storage.is_local(staging):
            folder = storage.local_path(staging)
            folder.mkdir(parents=True, exist_ok=True)
            rows = write_bundle(str(folder / name), pieces)
        else:
            with tempfile.TemporaryDirectory(prefix="hvdtrain-ckpt-") as tmp:
                rows = write_bundle(os.path.join(tmp, name), pieces)
                for f in os.listdir(tmp):
                    storage.upload(os.path.join(tmp, f), storage.join(staging, f))
        del pieces
    meta = layout.variables_meta()
    written = {file_name(rank): (rows, {r[0]: meta[r[0]] for r in rows})} if rows else {}
    if collective:
        everyone = distributed.allgather_object(written)
        written = {k: v for part in everyone for k, v in part.items()}
    if chief is None:
        return None
    manifest = {"format": FORMAT, "version": 1, "layout": layout.describe_layout(), "model": layout.spec,
                "scalars": layout.scalars(), "variables": {}}
    for file, (file_rows, meta) in sorted(written.items()):
        for name, kind, part, start, stop, key in file_rows:
            entry = manifest["variables"].setdefault(name, {**meta[name], "pieces": {}})
            entry["pieces"].setdefault(kind, []).append([file, key, part, start, stop])
    storage.write_text(storage.join(staging, MANIFEST), json.dumps(manifest) + "\n")
    failpoint("mid-checkpoint", number)
    return chief.finish_checkpoint(number, state, unit)


class Reader:
    """Any box of any variable of one checkpoint, read from the pieces that cover it."""

    def __init__(self, uri: str):
        self.uri = uri
        path = storage.join(uri, MANIFEST)
        if not storage.exists(path):
            raise CheckpointError(f"{uri} has no {MANIFEST}")
        try:
            self.manifest = json.loads(storage.read_text(path))
        except ValueError as exc:
            raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
        if self.manifest.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not an hvdtrain checkpoint manifest")
        self.variables: dict[str, dict] = self.manifest["variables"]
        self.scalars: dict[str, Any] = self.manifest.get("scalars", {})
        self.layout: dict[str, Any] = self.manifest.get("layout", {})
        self._files: dict[str, Any] = {}
        self._downloads: tempfile.TemporaryDirectory | None = None

    def _bundle(self, file: str) -> str:
        """Where TensorFlow's reader opens bundle ``file``: in place, or for ``s3://`` (which TensorFlow cannot
        read) a local copy of its index and data files, made when first needed and removed with the reader."""
        uri = storage.join(self.uri, file)
        if not storage.is_s3(uri):
            return uri
        if self._downloads is None:
            self._downloads = tempfile.TemporaryDirectory(prefix="hvdtrain-ckpt-")
        local = Path(self._downloads.name)
        for part in [uri + ".index", *storage.glob(uri + ".data-*")]:
            storage.download(part, local / storage.basename(part))
        return str(local / file)

    def kinds(self, name: str) -> list[str]:
        """What the checkpoint holds of ``name``: ``param`` and the optimizer's slot kinds."""
        return list(self.variables[name]["pieces"])

    def _tensor(self, file: str, key: str) -> np.ndarray:
        """One stored tensor; a missing or damaged bundle is a :class:`CheckpointError` that names it."""
        import tensorflow as tf

        try:
            if file not in self._files:
                self._files[file] = tf.train.load_checkpoint(self._bundle(file))
            return self._files[file].get_tensor(key)
        except (tf.errors.OpError, ValueError, OSError) as exc:
            reason = str(getattr(exc, "message", exc)).strip().splitlines()[0][:120]
            raise CheckpointError(f"{self.uri}: cannot read {file} ({reason})") from None

    def _part(self, name: str, kind: str, part: int) -> np.ndarray:
        meta = self.variables[name]
        shape = list(meta["shape"])
        if meta["axis"] is not None:
            shape[meta["axis"]] //= meta["parts"]
        size = int(np.prod(shape))
        pieces = sorted((p for p in meta["pieces"].get(kind, []) if p[2] == part), key=lambda p: p[3])
        out = np.empty(size, np.float32)
        at = 0
        for file, key, _, start, stop in pieces:
            if start != at:
                break
            values = self._tensor(file, key)
            if values.size != stop - start:
                raise CheckpointError(f"{self.uri}: {name} ({kind}) piece {key} of {file} has {values.size} values, "
                                      f"the manifest says {stop - start}")
            out[start:stop] = values.ravel()
            at = stop
        if at != size:
            raise CheckpointError(f"{self.uri} lacks part of {name} ({kind}): {at} of {size} values of slice {part}")
        return out.reshape(shape)

    def read(self, name: str, kind: str = "param", box=None) -> np.ndarray:
        """The values of ``box = (start, size)`` (default: all) of variable ``name``'s ``kind``, as float32.

        The bundles' readers are closed when it returns: TensorFlow's keeps a 1 MB buffer for each data file it has
        read from until it is closed, and a rank's bundle is written in data files of 32 MB (``CHUNK_BYTES``), so
        readers kept open over a whole checkpoint held one buffer per data file (measured in one process, writing a
        113M-parameter model.keras from a data=4 checkpoint's 44 data files: the resident set grew 69 MB with the
        readers kept open, 21 MB with them closed). An index is a few KB to read again."""
        try:
            return self._read(name, kind, box)
        finally:
            self._files.clear()

    def _read(self, name: str, kind: str, box) -> np.ndarray:
        if name not in self.variables:
            raise CheckpointError(f"{self.uri} has no variable {name}")
        meta = self.variables[name]
        if kind not in meta["pieces"]:
            raise CheckpointError(f"{self.uri} holds no {kind} of {name} (it holds {', '.join(meta['pieces'])})")
        shape, axis, parts = tuple(meta["shape"]), meta["axis"], meta["parts"]
        start, size = box or ((0,) * len(shape), shape)
        if axis is None:
            whole = self._part(name, kind, 0)  # a fresh array: the whole of it needs no copy
            return whole if box is None else whole[tuple(slice(a, a + n) for a, n in zip(start, size))].copy()
        out = np.empty(size, np.float32)
        width = shape[axis] // parts
        for part in range(parts):
            lo, hi = max(start[axis], part * width), min(start[axis] + size[axis], (part + 1) * width)
            if lo >= hi:
                continue
            values = self._part(name, kind, part)
            src = [slice(a, a + n) for a, n in zip(start, size)]
            dst = [slice(0, n) for n in size]
            src[axis] = slice(lo - part * width, hi - part * width)
            dst[axis] = slice(lo - start[axis], hi - start[axis])
            out[tuple(dst)] = values[tuple(src)]
            del values
        return out


def restore_latest(run_dir_uri: str, chief: RunDir | None, layout, unit: str = "epoch"
                   ) -> tuple[int, dict[str, Any], list[str]]:
    """Restore the newest readable checkpoint into ``layout`` (a collective on every rank when the layout reads on
    every rank, the chief's alone otherwise).

    The chief lists the complete checkpoints; every reading rank tries the newest, and if any rank fails to read
    its part (truncated, corrupt, from another model) every rank goes back to the one before, with a warning.
    Returns ``(number, state, warnings)`` (the epoch, or the step with ``unit="step"``, that the checkpoint ends); 0
    and an empty state when none could be read.
    """
    from hvdtrain import distributed

    collective = layout.collective_checkpoint and distributed.size() > 1
    found = [(c.number, c.uri) for c in chief.checkpoints(unit)] if chief is not None else []
    if collective:
        found = distributed.broadcast_object(found)
    warnings = []
    for epoch, uri in reversed(found):
        error = None
        try:
            layout.load_checkpoint(uri)
        except Exception as exc:  # noqa: BLE001 - any failure to read means: use the previous checkpoint
            error = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        if collective:
            errors = [e for e in distributed.allgather_object(error) if e]
            error = errors[0] if errors else None
        if error is None:
            state = json.loads(storage.read_text(storage.join(uri, CHECKPOINT_MARKER))) if chief is not None else {}
            return epoch, state, warnings
        warnings.append(f"checkpoint {uri} is unreadable ({error}); using the previous one")
    return 0, {}, warnings


def latest(run_dir_uri: str) -> str | None:
    """The newest complete checkpoint of a run directory (None when it has none)."""
    found = RunDir(run_dir_uri).checkpoints()
    return found[-1].uri if found else None


def is_sharded(uri: str) -> bool:
    """Whether the checkpoint at ``uri`` is in this format (it has a manifest)."""
    return storage.exists(storage.join(uri, MANIFEST))


def read_legacy(uri: str, model, optimizer) -> None:
    """Restore a checkpoint of the earlier one-process format (``ckpt.*``: TensorFlow's object checkpoint of the
    model and its optimizer) into a data-parallel model."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="hvdtrain-ckpt-") as tmp:
        folder = storage.local_path(uri) if storage.is_local(uri) else Path(tmp)
        if not storage.is_local(uri):
            storage.download(uri, tmp)
        status = tf.train.Checkpoint(model=model, optimizer=optimizer).read(str(folder / "ckpt"))
        status.assert_existing_objects_matched()


def warn(message: str) -> None:
    """A warning line on stderr (the chief's)."""
    console.warn(message)


# ---------------------------------------------------------------------------------------------------------------
# Whole models from a checkpoint


def spec_of(reader: Reader) -> dict:
    """The model a checkpoint holds: ``{name, params, input_shape, num_classes}``."""
    spec = reader.manifest.get("model")
    if not spec:
        raise ModelFileError(f"{reader.uri} does not say which model it holds; it cannot be assembled")
    return spec


def plan_of_spec(spec: dict, **override):
    """The family plan of a checkpoint's model (``override``: builder parameters set otherwise)."""
    import models

    params = {**spec["params"], **override}
    return models.parallel_plan(spec["name"], input_shape=tuple(spec["input_shape"]),
                                num_classes=spec["num_classes"], **params)


def assemble(checkpoint_uri: str):
    """The whole model of a checkpoint, built in this process (for serving and compression)."""
    import models
    from hvdtrain.distributed.sharded import keras_name
    from models.plan import keras_variables, set_clocks

    reader = Reader(checkpoint_uri)
    spec = spec_of(reader)
    fits(reader)
    model = models.build(spec["name"], input_shape=tuple(spec["input_shape"]), num_classes=spec["num_classes"],
                         **spec["params"])
    if models.has_plan(spec["name"]):
        named = keras_variables(model, plan_of_spec(spec))
    else:
        named = {keras_name(i, v): v for i, v in enumerate(model.variables)}
    values = model_values(reader)
    for name, var in named.items():
        try:
            var.assign(values(name).astype(var.dtype.as_numpy_dtype))
        except CheckpointError as exc:
            raise ModelFileError(f"cannot assemble the model of {checkpoint_uri}: {exc}") from None
    set_clocks(model, int(reader.scalars.get("iterations", 0)))  # its dropout continues from the run's step
    return model


def model_values(reader: Reader):
    """``values(name)``: a weight's whole value in the model a checkpoint holds: the checkpoint's own, or, for a
    LoRA run (whose checkpoints hold its adapters only), the pretrained checkpoint's with the adapter merged in
    (``W + alpha / rank x A B``)."""
    from models.lora import factor_names, lora_of, merged

    spec = spec_of(reader)
    lora = lora_of(spec)
    if lora is None:
        return reader.read
    from hvdtrain.formats import huggingface

    plan = plan_of_spec(spec)
    base = huggingface.open_checkpoint(spec["pretrained"], int(spec["input_shape"][0]))

    def values(name: str) -> np.ndarray:
        with huggingface.one_line_errors():
            value = base.read(plan, name)
        a, b = factor_names(name)
        if a in reader.variables:
            value = merged(value, reader.read(a), reader.read(b), lora.scale)
        return value

    return values


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
