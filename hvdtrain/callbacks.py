"""Keras callbacks for data-parallel training, and their order.

``default_callbacks(...)`` returns them in the order that matters:

1. ``broadcast`` (``BroadcastGlobalVariablesCallback(0)``): after the first batch every rank holds rank 0's
   weights and optimizer state, whatever its random init.
2. ``metric_average`` (``MetricAverageCallback``): replaces each epoch's logs by the mean over ranks. It comes
   before every callback that reads the logs (early stopping, checkpoints, loggers), so that all ranks see the same
   numbers and take the same decisions; a decision taken on one rank only leaves the others hanging.
   :class:`LanguageModelMetrics` (language models) derives bits per byte and perplexity from the averaged loss.
3. :class:`LearningRateLogger`: the learning rate into the logs (the schedule runs in the graph, see
   :mod:`hvdtrain.schedule`).
4. :class:`NanGuard`: stops with a message naming the epoch and step when the loss is NaN or Inf.

None of them converts the logs to NumPy on every batch except the NaN guard (which must read the loss); with
``steps_per_execution=N`` that is once per N steps.
5. ``EarlyStopping`` (optional) on averaged validation loss.
6. Chief only: :class:`CheckpointCallback`, :class:`MetricsLogger` and ``TensorBoard``. Other ranks write nothing.

Each callback is importable by name for users who assemble their own list.
"""
from __future__ import annotations

import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

import tensorflow as tf

from hvdtrain import artifacts, distributed
from hvdtrain.errors import HvdtrainError


def broadcast_initial_state(root_rank: int = 0) -> tf.keras.callbacks.Callback:
    """Broadcast all model and optimizer variables from ``root_rank`` at the end of the first batch."""
    return distributed.broadcast_callback(root_rank)


def metric_average() -> tf.keras.callbacks.Callback:
    """Average the logged metrics across ranks at every epoch end."""
    return distributed.metric_average_callback()


class LearningRateLogger(tf.keras.callbacks.Callback):
    """Put the learning rate of the epoch's last step into the epoch logs (as ``lr``).

    The rate itself comes from the optimizer's schedule (:class:`hvdtrain.schedule.WarmupSchedule`), inside the
    graph; this callback only reads it once per epoch.
    """

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        opt = self.model.optimizer
        lr = getattr(opt, "inner_optimizer", opt).learning_rate  # LossScaleOptimizer wraps the real one
        logs["lr"] = float(lr(opt.iterations - 1) if callable(lr) else tf.keras.backend.get_value(lr))


class LanguageModelMetrics(tf.keras.callbacks.Callback):
    """Add bits per byte and perplexity, derived from the (averaged) loss in nats per byte, to the epoch logs."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        for prefix in ("", "val_"):
            if f"{prefix}loss" in logs:
                nats = float(logs[f"{prefix}loss"])
                logs[f"{prefix}bits_per_byte"] = nats / math.log(2)
                logs[f"{prefix}perplexity"] = math.exp(min(nats, 50.0))


class NanGuard(tf.keras.callbacks.Callback):
    """Stop training with a clear error when the loss becomes NaN or Inf.

    Under ``mixed_float16`` the loss scaler already skips overflowing steps, but a NaN *loss* is still a divergence.
    """

    def __init__(self):
        super().__init__()
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise HvdtrainError(
                f"loss became {float(loss)} at epoch {self._epoch + 1}, step {batch + 1}; "
                "lower train.learning_rate or raise train.warmup_epochs"
            )


class CheckpointCallback(tf.keras.callbacks.Callback):
    """Chief-only checkpoints of weights, optimizer state and progress, written atomically; keeps the last K.

    Each checkpoint is a directory ``epoch-NNNN/`` holding a TensorFlow checkpoint and ``state.json``; it is
    written under a temporary name and renamed into place, so a crash never leaves a half-written one. A checkpoint
    whose loss is NaN is never written.
    """

    def __init__(self, directory: str | Path, every_epochs: int = 1, keep: int = 3, steps_per_epoch: int = 0):
        super().__init__()
        self.directory = Path(directory)
        # A crash while writing leaves a temporary directory behind; it never became a checkpoint.
        for stale in self.directory.glob(".epoch-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.every_epochs = max(1, every_epochs)
        self.keep = max(1, keep)
        self.steps_per_epoch = steps_per_epoch

    def on_epoch_end(self, epoch, logs=None):
        logs = scalars(logs)
        if (epoch + 1) % self.every_epochs:
            return
        if not all(math.isfinite(v) for v in logs.values()):
            return  # never keep a diverged model
        save_checkpoint(self.model, self.directory, epoch + 1, self.steps_per_epoch, logs)
        prune_checkpoints(self.directory, self.keep)


def scalars(logs: dict[str, Any] | None) -> dict[str, float]:
    """The numeric entries of Keras logs as Python floats (they arrive as NumPy or tensor scalars)."""
    out = {}
    for key, value in (logs or {}).items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


_CKPT = re.compile(r"^epoch-(\d{4,})$")


def save_checkpoint(model: tf.keras.Model, directory: str | Path, epoch: int, steps_per_epoch: int,
                    logs: dict[str, Any] | None = None) -> Path:
    """Write ``directory/epoch-NNNN`` atomically; returns its path."""
    target = Path(directory) / f"epoch-{epoch:04d}"
    ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    with artifacts.atomic_path(target, suffix=".tmp") as tmp:
        tmp.mkdir()
        ckpt.write(str(tmp / "ckpt"))
        artifacts.write_json(tmp / "state.json", {
            "epoch": epoch, "steps_per_epoch": steps_per_epoch, "step": epoch * steps_per_epoch,
            "logs": scalars(logs),
        })
    return target


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and _CKPT.match(p.name)]
    return sorted(found, key=lambda p: int(_CKPT.match(p.name).group(1)))


def restore_latest(model, directory: str | Path) -> tuple[int, list[str]]:
    """Restore the newest readable checkpoint into ``model`` and its optimizer.

    A checkpoint that cannot be read (truncated, corrupt, from another model) is skipped with a warning and the
    previous one is tried. Returns ``(epoch, warnings)``; epoch 0 when none could be restored.
    """
    import json

    warnings = []
    for ckpt_dir in reversed(list_checkpoints(directory)):
        try:
            state = json.loads((ckpt_dir / "state.json").read_text())
            status = tf.train.Checkpoint(model=model, optimizer=model.optimizer).read(str(ckpt_dir / "ckpt"))
            status.assert_existing_objects_matched()
            return int(state["epoch"]), warnings
        except Exception as exc:  # noqa: BLE001 - any failure to read means: use the previous checkpoint
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            warnings.append(f"checkpoint {ckpt_dir} is unreadable ({reason}); using the previous one")
    return 0, warnings


def prune_checkpoints(directory: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


class MetricsLogger(tf.keras.callbacks.Callback):
    """Chief-only ``metrics.jsonl``: one line per epoch with the averaged metrics, lr, time and throughput."""

    def __init__(self, path: str | Path, examples_per_epoch: int, rows: list[dict] | None = None):
        """``rows``: the lines of epochs already done (a resumed run keeps them)."""
        super().__init__()
        self.path = Path(path)
        self.examples_per_epoch = examples_per_epoch
        self.rows: list[dict[str, Any]] = list(rows or [])
        self._start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._start
        row = {"epoch": epoch + 1}
        row.update(scalars(logs))
        row["epoch_seconds"] = seconds
        row["examples_per_sec"] = self.examples_per_epoch / seconds if seconds > 0 else None
        self.rows.append(row)
        artifacts.write_jsonl(self.path, self.rows)


def default_callbacks(
    *,
    steps_per_epoch: int = 0,
    output_dir: str | Path | None = None,
    examples_per_epoch: int = 0,
    checkpoint_every_epochs: int = 1,
    keep_checkpoints: int = 3,
    early_stopping_patience: int = 0,
    tensorboard: bool = True,
    language_model: bool = False,
    previous_rows: list[dict] | None = None,
) -> list[tf.keras.callbacks.Callback]:
    """The callbacks of a data-parallel ``model.fit``, in the order documented at the top of this module.

    Args:
        steps_per_epoch: batches per epoch on each rank (recorded in checkpoints, to resume mid-run).
        output_dir: where the chief writes checkpoints, ``metrics.jsonl`` and TensorBoard logs (None: nothing).
        examples_per_epoch: examples all ranks process per epoch, for the throughput in ``metrics.jsonl``.
        checkpoint_every_epochs, keep_checkpoints: checkpoint cadence and how many to keep.
        early_stopping_patience: epochs without ``val_loss`` improvement before stopping (0: off).
        tensorboard: write TensorBoard logs on the chief.
        language_model: add bits per byte and perplexity to the logs.
        previous_rows: ``metrics.jsonl`` lines of the epochs a resumed run already did.

    Returns:
        A list for ``model.fit(callbacks=...)``.
    """
    cbs: list[tf.keras.callbacks.Callback] = [broadcast_initial_state(0), metric_average()]
    if language_model:
        cbs.append(LanguageModelMetrics())
    cbs += [LearningRateLogger(), NanGuard()]
    if early_stopping_patience:
        cbs.append(tf.keras.callbacks.EarlyStopping(monitor="val_loss", patience=early_stopping_patience,
                                                    restore_best_weights=True))
    if output_dir is not None and distributed.is_chief():
        out = Path(output_dir)
        cbs.append(CheckpointCallback(out / "checkpoints", checkpoint_every_epochs, keep_checkpoints,
                                      steps_per_epoch))
        cbs.append(MetricsLogger(out / "metrics.jsonl", examples_per_epoch, previous_rows))
        if tensorboard:
            cbs.append(tf.keras.callbacks.TensorBoard(log_dir=str(out / "tensorboard"), profile_batch=0))
    return cbs
