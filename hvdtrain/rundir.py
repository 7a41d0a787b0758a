"""The output directory of one command, as one object: every path in it and every write to it.

Only the chief makes a :class:`RunDir` to write with (other ranks hold ``None`` and write nothing, except the
bundles of a sharded checkpoint, which each writing rank puts in :meth:`RunDir.checkpoint_staging`). The
directory may be local or on object storage (:mod:`hvdtrain.storage`); nothing else in hvdtrain knows how a file
gets there.

A training run's directory::

    config.yaml         the resolved config (written first, before training)
    metrics.jsonl       one line per epoch (or per interval of a run counted in steps), rewritten whole each time
    checkpoints/epoch-NNNN/ (or step-NNNNNNNN/ in a run counted in steps)   the writers' bundles and manifest.json,
                        then state.json: a checkpoint is complete only once its state.json exists
                        (hvdtrain.formats.checkpoint)
    tensorboard/        TensorBoard event files (on s3://, written to a local folder and uploaded after every epoch:
                        TensorFlow has no S3 file system)
    summary.json, model.keras, curves.png, and files written by code that knows only local paths (Horovod's
                        timeline and autotune log), staged locally and uploaded when the directory is remote

Checkpoints are complete only with their marker because object stores cannot rename a folder atomically; on local
disks the folder is also renamed into place. ``state.json`` holds the epoch and every metrics line up to it, so a
resumed run rewrites ``metrics.jsonl`` from the checkpoint it restores: whatever instant a crash comes, each
epoch's line is kept exactly once.

Failpoints (for the crash tests): ``HVDTRAIN_FAILPOINT=NAME@N`` kills the process with SIGKILL at that point of
epoch N (of step N in a run counted in steps); NAME is ``after-metrics``, ``mid-checkpoint`` (files written, marker
not yet) or ``after-checkpoint``.
"""
from __future__ import annotations

import json
import os
import re
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvdtrain import artifacts, storage

CHECKPOINT_MARKER = "state.json"
_CHECKPOINT = re.compile(r"^(epoch|step)-(\d{4,})$")
DIGITS = {"epoch": 4, "step": 8}  # epoch-0003, step-00000200


def failpoint(name: str, epoch: int) -> None:
    """SIGKILL this process when ``HVDTRAIN_FAILPOINT`` names this point and epoch (crash tests only)."""
    if os.environ.get("HVDTRAIN_FAILPOINT") == f"{name}@{epoch}":
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint: the epoch (or step) it ends and where it is."""

    number: int
    uri: str
    unit: str = "epoch"


class RunDir:
    """Paths and writes of one output directory (local or on object storage)."""

    def __init__(self, uri: str | Path):
        self.uri = str(uri)
        self._staged: dict[str, Path] = {}
        self._staging: tempfile.TemporaryDirectory | None = None
        self._uploaded: dict[Path, tuple[int, int]] = {}  # staged file -> (size, mtime) at its last upload

    def __repr__(self) -> str:
        return f"RunDir({self.uri!r})"

    def path(self, *parts: str) -> str:
        """The URI of ``parts`` inside the directory."""
        return storage.join(self.uri, *parts)

    def resolve(self, name: str) -> str:
        """A user's file name: absolute paths and URIs as given, relative ones inside the directory."""
        if not storage.is_local(name) or os.path.isabs(name):
            return name
        return self.path(name)

    # ---- creating it

    def create(self, config_yaml: str | None = None) -> str | None:
        """Create the directory (and write ``config.yaml``); returns an error message instead of raising."""
        from hvdtrain.errors import HvdtrainError

        try:
            storage.check(self.uri)
        except HvdtrainError as exc:
            return str(exc)
        try:
            storage.makedirs(self.uri)
            if config_yaml is not None:
                storage.write_text(self.path("config.yaml"), config_yaml)
        except OSError as exc:
            return f"cannot write to output directory '{self.uri}': {exc.strerror or exc}; choose another --output"
        except Exception as exc:  # noqa: BLE001 - object stores raise TensorFlow's error types
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            return f"cannot write to output directory '{self.uri}': {reason}; check the URI and credentials"
        return None

    # ---- small files

    def write_json(self, name: str, value: Any) -> None:
        """``name`` as JSON."""
        artifacts.write_json(self.path(name), value)

    def write_metrics(self, rows: list[dict]) -> None:
        """``metrics.jsonl``: one line per epoch, the whole file each time."""
        storage.write_text(self.path("metrics.jsonl"), artifacts.jsonl(rows))

    def read_metrics(self) -> list[dict]:
        """The lines of ``metrics.jsonl`` (none when it does not exist)."""
        uri = self.path("metrics.jsonl")
        if not storage.exists(uri):
            return []
        return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]

    def plot_curves(self, rows: list[dict], title: str = "") -> None:
        """``curves.png``: loss, metrics and learning rate per epoch."""
        artifacts.plot_curves(rows, self.path("curves.png"), title=title)

    def save_figure(self, fig, name: str) -> None:
        """A matplotlib figure as ``name`` (PNG)."""
        artifacts.save_figure(fig, self.path(name))

    @property
    def tensorboard(self) -> str:
        """The TensorBoard log folder: the directory's own, or on ``s3://`` a local folder that :meth:`publish`
        uploads (the training callbacks publish after every epoch)."""
        target = self.path("tensorboard")
        return str(self.local("tensorboard")) if self.tensorboard_staged else target

    @property
    def tensorboard_staged(self) -> bool:
        """Whether TensorBoard writes to a local folder that :meth:`publish` uploads (``s3://``)."""
        return storage.is_s3(self.uri)

    # ---- files written by code that knows only local files (Horovod's C++, the TFLite converter, the report)

    def local(self, name: str) -> Path:
        """A local path for ``name``: what is written there is in the directory after :meth:`publish`.

        Local directories: the path itself (its folder created). Object storage: a local staging file, uploaded
        by :meth:`publish`.
        """
        target = self.resolve(name)
        if storage.is_local(target):
            path = storage.local_path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            return path
        if self._staging is None:
            self._staging = tempfile.TemporaryDirectory(prefix="hvdtrain-stage-")
        path = Path(self._staging.name) / storage.basename(target)
        self._staged[target] = path
        return path

    def adopt(self, local: str | Path, name: str) -> None:
        """Copy a local file written elsewhere (before this directory existed) into ``name`` at :meth:`publish`."""
        self._staged[self.resolve(name)] = Path(local)

    def publish(self) -> None:
        """Upload what was written to staging files and folders since the last call (files already in place
        stay)."""
        for target, local in self._staged.items():
            if str(local) == target or not local.exists():
                continue
            files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
            for file in files:
                stat = file.stat()
                if self._uploaded.get(file) != (stat.st_size, stat.st_mtime_ns):
                    relative = file.relative_to(local).as_posix() if local.is_dir() else ""
                    storage.upload(file, storage.join(target, relative) if relative else target)
                    self._uploaded[file] = (stat.st_size, stat.st_mtime_ns)

    # ---- checkpoints

    def checkpoint_uri(self, number: int, unit: str = "epoch") -> str:
        """Where the checkpoint at the end of epoch (or step) ``number`` goes."""
        return self.path("checkpoints", f"{unit}-{number:0{DIGITS[unit]}d}")

    def checkpoints(self, unit: str | None = None) -> list[Checkpoint]:
        """Complete checkpoints (with their marker), oldest first (of ``unit`` alone when given)."""
        folder = self.path("checkpoints")
        found = []
        for name in storage.listdir(folder):
            m = _CHECKPOINT.match(name)
            if m and unit in (None, m.group(1)) and storage.exists(storage.join(folder, name, CHECKPOINT_MARKER)):
                found.append(Checkpoint(int(m.group(2)), storage.join(folder, name), m.group(1)))
        return sorted(found, key=lambda c: (c.unit, c.number))

    def clean_incomplete_checkpoints(self) -> list[str]:
        """Remove checkpoints a crash left without their marker, and temporary folders; returns what went."""
        folder = self.path("checkpoints")
        removed = []
        for name in storage.listdir(folder):
            uri = storage.join(folder, name)
            partial = _CHECKPOINT.match(name) and not storage.exists(storage.join(uri, CHECKPOINT_MARKER))
            if partial or name.startswith((".epoch-", ".step-")):  # staging, or a replaced one not yet removed
                storage.remove(uri)
                removed.append(uri)
        return removed

    def checkpoint_staging(self, number: int, unit: str = "epoch") -> str:
        """Where the writers of the checkpoint of epoch (or step) ``number`` put their files: on a local disk a
        temporary folder, renamed into place once complete; on object storage the checkpoint's own prefix (its
        marker comes last)."""
        target = self.checkpoint_uri(number, unit)
        if storage.is_local(target):
            return self.path("checkpoints", f".{unit}-{number:0{DIGITS[unit]}d}.tmp")
        return target

    def begin_checkpoint(self, number: int, unit: str = "epoch") -> None:
        """Remove what an earlier, interrupted attempt at this checkpoint left (chief only, before anyone
        writes)."""
        staging = self.checkpoint_staging(number, unit)
        storage.remove(staging)
        if storage.is_local(staging):
            storage.makedirs(staging)

    def finish_checkpoint(self, number: int, state: dict[str, Any], unit: str = "epoch") -> str:
        """Write the marker of the checkpoint of epoch (or step) ``number``, whose files are all in
        :meth:`checkpoint_staging` (chief only); on a local disk the folder then takes its place, replacing an
        older one of the same number."""
        staging, target = self.checkpoint_staging(number, unit), self.checkpoint_uri(number, unit)
        marker = artifacts.to_json({**state, unit: number}) + "\n"
        storage.write_text(storage.join(staging, CHECKPOINT_MARKER), marker)
        if staging != target:
            final, tmp = storage.local_path(target), storage.local_path(staging)
            old = final.with_name(f".{final.name}.old")
            if final.exists():
                os.rename(final, old)
            os.rename(tmp, final)
            storage.remove(str(old))
        failpoint("after-checkpoint", number)
        return target

    def prune_checkpoints(self, keep: int) -> None:
        """Delete all but the newest ``keep`` checkpoints."""
        for old in self.checkpoints()[:-keep]:
            storage.remove(old.uri)


def prepare(uri: str | Path | None, config_yaml: str | None, chief: bool) -> tuple[RunDir | None, str | None]:
    """The chief's :class:`RunDir` for ``uri``, created with its ``config.yaml``; ``(None, None)`` elsewhere.

    Returns ``(run_dir, error)``: every rank must then agree on the error
    (:func:`hvdtrain.distributed.agree`), so that no rank goes on alone into a collective the chief never joins.
    """
    if uri is None or not chief:
        return None, None
    run_dir = RunDir(uri)
    return run_dir, run_dir.create(config_yaml)


def for_command(uri: str) -> RunDir:
    """The output directory of a command that runs in this one process (benchmark, export), made the way every
    command makes it (:func:`prepare`): a one-line error when it cannot be written."""
    from hvdtrain.errors import HvdtrainError

    run_dir, error = prepare(uri, None, chief=True)
    if error:
        raise HvdtrainError(error)
    return run_dir
