"""Keras callbacks for data-parallel training, and their order.

``default_callbacks(...)`` returns them in the order that matters:

1. ``broadcast`` (``BroadcastGlobalVariablesCallback(0)``): after the first batch every rank holds rank 0's
   weights and optimizer state, whatever its random init.
2. ``metric_average`` (``MetricAverageCallback``): replaces each epoch's logs by the mean over ranks. It comes
   before every callback that reads the logs (early stopping, checkpoints, loggers), so that all ranks see the same
   numbers and take the same decisions; a decision taken on one rank only leaves the others hanging.
   :class:`Validation` then adds the validation split's metrics, exact sums over every rank's part.
   :class:`LanguageModelMetrics` (language models) derives bits per byte and perplexity from the averaged loss.
3. :class:`LearningRateLogger`: the learning rate into the logs (the schedule runs in the graph, see
   :mod:`hvdtrain.schedule`).
4. :class:`NanGuard`: stops with a message naming the epoch and step when the loss is NaN or Inf.
5. :class:`DivergenceGuard`: every N epochs, one collective compares a checksum of each trainable variable across
   ranks and stops every rank, naming the variables, when they drifted apart (before anything is saved).
6. ``EarlyStopping`` (optional) on averaged validation loss.
7. :class:`ProgressLogger` (chief only): whole lines under a launcher or in a log file, a bar in a terminal.
8. :class:`MetricsLogger` (every rank keeps the rows; the chief writes ``metrics.jsonl``), then
   :class:`CheckpointCallback` (its marker holds those rows, so a resumed run loses and repeats no epoch's line),
   and ``TensorBoard`` (chief only). Other ranks write nothing, except their own part of a checkpoint when the
   layout splits the model.

None of them converts the logs to NumPy on every batch except the NaN guard (which must read the loss; with
``steps_per_execution=N`` that is once per N steps) and the progress logger when it prints.
Each callback is importable by name for users who assemble their own list.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from hvdtrain import distributed
from hvdtrain.formats import checkpoint
from hvdtrain.errors import HvdtrainError
from hvdtrain.rundir import RunDir, failpoint


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
        lr = checkpoint.inner_optimizer(opt).learning_rate
        logs["lr"] = float(lr(opt.iterations - 1) if callable(lr) else tf.keras.backend.get_value(lr))


class LanguageModelMetrics(tf.keras.callbacks.Callback):
    """Add bits per byte and perplexity, derived from the (averaged) loss in nats per token, to the epoch logs.

    Args:
        bytes_per_token: ``{"": training split's, "val_": validation split's}`` text bytes per token (1 for bytes).
    """

    def __init__(self, bytes_per_token: dict | None = None):
        super().__init__()
        self.bytes_per_token = bytes_per_token or {}

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        for prefix in ("", "val_"):
            if f"{prefix}loss" in logs:
                nats = float(logs[f"{prefix}loss"])
                logs[f"{prefix}bits_per_byte"] = nats / math.log(2) / self.bytes_per_token.get(prefix, 1.0)
                logs[f"{prefix}perplexity"] = math.exp(min(nats, 50.0))


class Validation(tf.keras.callbacks.Callback):
    """At each epoch's end, the model's loss and accuracy on the whole validation split as ``val_loss`` and
    ``val_accuracy``: summed over positions and ranks (:mod:`hvdtrain.exact_metrics`), so the same numbers whatever
    the layout, and the same on every rank (a collective: every rank runs it).

    Args:
        evaluate: returns ``{"loss": ..., "accuracy": ...}`` of the validation split (empty when there is none).
        every, last: validate at the end of every ``every``-th epoch (interval of a run counted in steps) and of
            epoch ``last`` (0: every epoch).
    """

    def __init__(self, evaluate, every: int = 1, last: int = 0):
        super().__init__()
        self.evaluate, self.every, self.last = evaluate, max(1, every), last

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or ((epoch + 1) % self.every and epoch + 1 != self.last):
            return
        for key, value in (self.evaluate() or {}).items():
            if key in ("loss", "accuracy"):
                logs[f"val_{key}"] = value


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


def checksums(variables) -> np.ndarray:
    """Per variable: the sum, the sum of squares and the sum of magnitudes of its values (float64), as
    ``[sums..., squares..., magnitudes...]``."""
    rows = []
    for v in variables:
        w = np.asarray(v.numpy(), dtype=np.float64)
        rows.append((w.sum(), (w * w).sum(), np.abs(w).sum()))
    return np.array(rows).T.ravel()


class DivergenceGuard(tf.keras.callbacks.Callback):
    """Stop every rank when the ranks' copies of the trainable variables drifted apart.

    The most common silent failure of data-parallel jobs: a custom ``train_step`` that calls ``apply_gradients``
    (which Horovod does not average), a callback that changes weights on one rank, a layer with rank-dependent
    state. Every ``every_epochs`` epochs each rank computes the sum and the sum of squares of every trainable
    variable, and one allreduce (max of the values and of their negatives) gives each checksum's spread across
    ranks. A spread above ``tolerance`` times the checksum's scale (the largest sum of magnitudes, or of squares)
    stops the run with one line, on every rank alike (all ranks see the same reduced numbers, so none is left
    waiting).

    Args:
        every_epochs: check at the end of every N-th epoch (0: never).
        tolerance: relative spread that counts as diverged (identical updates leave bit-identical weights, so any
            tolerance above float rounding works).
        groups: a function returning ``[(variables, group)]``: variables that must be identical over the ranks
            of a :class:`~hvdtrain.distributed.mesh.Group` (default: the model's trainable variables, all ranks).
    """

    def __init__(self, every_epochs: int = 1, tolerance: float = 1e-6, groups=None):
        super().__init__()
        self.every_epochs, self.tolerance = every_epochs, tolerance
        self.groups = groups
        self.seconds: list[float] = []

    def on_epoch_end(self, epoch, logs=None):
        if not self.every_epochs or (epoch + 1) % self.every_epochs or distributed.size() == 1:
            return
        start = time.perf_counter()
        groups = self.groups() if self.groups else [(self.model.trainable_variables, None)]
        bad: list[tuple[str, float]] = []
        count = 0
        for variables, group in groups:
            if not variables or (group is not None and group.size == 1):
                continue
            count += len(variables)
            values = checksums(variables)
            low, high = distributed.extremes(values) if group is None else group.extremes(values)
            n = len(variables)
            # each checksum's spread across ranks, relative to its largest scale (the same numbers on every rank)
            spread = (high - low)[: 2 * n].reshape(2, n)
            scale = np.stack([high[2 * n:], high[n: 2 * n]]) + 1e-30
            relative = (spread / scale).max(axis=0)
            bad += [(variables[i].name, relative[i]) for i in range(n) if relative[i] > self.tolerance]
        self.seconds.append(time.perf_counter() - start)
        if bad:
            first = ", ".join(f"{name} (relative spread {spread:.2g})" for name, spread in bad[:3])
            raise HvdtrainError(
                f"ranks diverged by epoch {epoch + 1}: {len(bad)} of {count} trainable variables differ across ranks, "
                f"first {first}; a custom train_step that calls optimizer.apply_gradients skips Horovod's "
                "averaging: use optimizer.minimize(loss, variables, tape=tape) or hvdtrain.distributed.gradient_tape")


class ProgressLogger(tf.keras.callbacks.Callback):
    """Progress on the chief, readable in a terminal and in a log file under any launcher.

    In ``bar`` mode (a plain process on a terminal) one line is redrawn in place. In ``lines`` mode (under
    horovodrun, mpirun or srun, which prefix and interleave the ranks' output, or when the output is a file) only
    whole lines are printed: one per epoch, plus one every ``interval`` seconds inside long epochs.

    A run counted in steps (``unit="step"``) shows the step of the run, its tokens per second (``tokens_per_step``)
    and the time left; one counted in epochs, the epoch and its step.
    """

    def __init__(self, epochs: int, steps_per_epoch: int, mode: str | None = None, interval: float = 30.0,
                 stream=None, unit: str = "epoch", tokens_per_step: int = 0):
        super().__init__()
        self.epochs, self.steps_per_epoch, self.interval = epochs, steps_per_epoch, interval
        self.unit, self.tokens_per_step = unit, tokens_per_step
        self.stream = stream or sys.stdout
        self.mode = mode or default_progress_mode(self.stream)
        self._supports_tf_logs = True  # read the logs only when printing
        self._epoch_start = self._last = self._run_start = 0.0
        self._epoch = self._first = 0

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_start = self._last = time.perf_counter()
        if not self._run_start:
            self._run_start, self._first = self._epoch_start, epoch

    def _where(self, batch: int) -> tuple[str, float]:
        """``(where the run is, the share of the unit done)``: an epoch and its step, or the run's step."""
        if self.unit == "step":
            total = self.epochs * self.steps_per_epoch
            step = self._epoch * self.steps_per_epoch + batch + 1
            return f"step {step}/{total}", step / max(1, total)
        return f"epoch {self._epoch + 1}/{self.epochs}", (batch + 1) / max(1, self.steps_per_epoch)

    def _speed(self, now: float, batch: int) -> str:
        """Tokens per second since this launch's first step, and the time left (runs counted in steps)."""
        if self.unit != "step":
            return ""
        done = (self._epoch - self._first) * self.steps_per_epoch + batch + 1
        left = self.epochs * self.steps_per_epoch - (self._epoch * self.steps_per_epoch + batch + 1)
        per_step = (now - self._run_start) / max(1, done)
        speed = f"{self.tokens_per_step / per_step:.4g} tokens/s, " if self.tokens_per_step and per_step > 0 else ""
        return f"{speed}ETA {_duration(left * per_step)}, "

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if self.mode == "off":
            return
        where, done = self._where(batch)
        if self.mode == "bar":
            if now - self._last < 0.1 and batch + 1 < self.steps_per_epoch:
                return
            bar = "=" * int(done * 24)
            eta = "" if self.unit == "step" else f" ETA {(now - self._epoch_start) / done * (1 - done):.0f}s"
            speed = self._speed(now, batch).rstrip(", ")
            self._write(f"\r{where.split('/')[0]} [{bar:<24}] {where.split()[1]} {speed} "
                        f"{_format_logs(logs, train_only=True)}{eta}\033[K")
        elif now - self._last >= self.interval and batch + 1 < self.steps_per_epoch:
            inside = "" if self.unit == "step" else f": step {batch + 1}/{self.steps_per_epoch}"
            self._write(f"{where}{inside}, {now - self._epoch_start:.0f} s, {self._speed(now, batch)}"
                        f"{_format_logs(logs, train_only=True)}\n")
        self._last = now

    def on_epoch_end(self, epoch, logs=None):
        if self.mode == "off":
            return
        now = time.perf_counter()
        seconds = now - self._epoch_start
        start = "\r" if self.mode == "bar" else ""
        end = "\033[K\n" if self.mode == "bar" else "\n"
        where, _ = self._where(self.steps_per_epoch - 1)
        self._write(f"{start}{where}: {self.steps_per_epoch} steps, {seconds:.3g} s, "
                    f"{self._speed(now, self.steps_per_epoch - 1)}{_format_logs(logs)}{end}")


def _duration(seconds: float) -> str:
    """``42 s``, ``7 min``, ``3.2 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def default_progress_mode(stream=None) -> str:
    """``bar`` for a plain process writing to a terminal, ``lines`` otherwise (launchers, pipes, files)."""
    stream = stream or sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    return "bar" if tty and not distributed.launched() else "lines"


def _format_logs(logs, train_only: bool = False) -> str:
    parts = []
    for key, value in (logs or {}).items():
        if train_only and key.startswith("val_"):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        parts.append(f"{key} {number:.4g}")
    return " ".join(parts)


class MetricsLogger(tf.keras.callbacks.Callback):
    """One row per epoch (averaged metrics, lr, time, throughput), kept on every rank; the chief writes
    ``metrics.jsonl``."""

    def __init__(self, run_dir: RunDir | None, examples_per_epoch: int, rows: list[dict] | None = None,
                 utilization: dict | None = None, label=None, unit: str = "epoch"):
        """``rows``: the lines of epochs already done (a resumed run keeps them). ``utilization``: a language
        model's ``tokens_per_example``, ``model_flops_per_token`` and ``peak_flops_per_rank`` (and
        ``hardware_flops_per_token``), for tokens/s and the model FLOPs utilization (``mfu``) of every epoch.
        ``label(n)``: what a row says of where the run is after ``n`` epochs (intervals of a run counted in steps:
        :meth:`hvdtrain.batch_plan.BatchPlan.row`); default ``{"epoch": n}``."""
        super().__init__()
        self.run_dir = run_dir
        self.utilization = utilization
        self.examples_per_epoch = examples_per_epoch
        self.label = label or (lambda n: {"epoch": n})
        self.unit = unit  # the failpoints name the epoch, or the step of a run counted in steps
        self.rows: list[dict[str, Any]] = list(rows or [])
        self._start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._start
        row = dict(self.label(epoch + 1))
        row.update(scalars(logs))
        row["epoch_seconds"] = seconds
        row["examples_per_sec"] = self.examples_per_epoch / seconds if seconds > 0 else None
        u = self.utilization
        if u is not None and row["examples_per_sec"]:
            from hvdtrain import flops

            row["tokens_per_sec"] = row["examples_per_sec"] * u["tokens_per_example"]
            peak = u["peak_flops_per_rank"] * distributed.size()
            row["mfu"] = flops.utilization(row["tokens_per_sec"], u["model_flops_per_token"], peak)
            if u["hardware_flops_per_token"] != u["model_flops_per_token"]:
                row["hfu"] = flops.utilization(row["tokens_per_sec"], u["hardware_flops_per_token"], peak)
        self.rows.append(row)
        if self.run_dir is not None:
            self.run_dir.write_metrics(self.rows)
            failpoint("after-metrics", row["step"] if self.unit == "step" else epoch + 1)


class CheckpointCallback(tf.keras.callbacks.Callback):
    """Checkpoints of weights, optimizer state and progress (:mod:`hvdtrain.formats.checkpoint`); keeps the last K.

    Each checkpoint's marker (``state.json``) holds the epoch and every metrics row up to it, taken from
    ``metrics`` (the :class:`MetricsLogger` that runs before this callback). A checkpoint whose metrics are NaN or
    Inf is never written. With a ``layout`` whose parts live on several ranks (tensor or pipeline parallelism,
    sharded optimizer state) every rank runs this callback and writes its own part; otherwise the chief writes.

    Args:
        run_dir: the output directory on the chief (None elsewhere).
        output_uri: the output directory as given (every rank of a split layout writes into it).
        layout: how the model sits on the ranks (default: the whole model on every rank).
    """

    def __init__(self, run_dir: RunDir | None, every_epochs: int = 1, keep: int = 3, steps_per_epoch: int = 0,
                 metrics: MetricsLogger | None = None, layout=None, output_uri: str | None = None,
                 unit: str = "epoch", last: int = 0):
        super().__init__()
        self.run_dir = run_dir
        self.output_uri = output_uri or (run_dir.uri if run_dir is not None else None)
        self.every_epochs = max(1, every_epochs)
        self.keep = max(1, keep)
        self.steps_per_epoch = steps_per_epoch
        self.metrics = metrics
        self.layout = layout
        self.unit, self.last = unit, last  # a run counted in steps names its checkpoints by step; always the last

    def on_epoch_end(self, epoch, logs=None):
        logs = scalars(logs)
        if (epoch + 1) % self.every_epochs and not (self.unit == "step" and epoch + 1 == self.last):
            return
        if not all(math.isfinite(v) for v in logs.values()):
            return  # never keep a diverged model (the logs are averaged: every rank decides alike)
        if self.layout is None:
            from hvdtrain.parallel import DataParallel

            self.layout = DataParallel(self.model, None)
        if self.run_dir is None and not self.layout.collective_checkpoint:
            return
        step = (epoch + 1) * self.steps_per_epoch
        checkpoint.save(self.output_uri, self.run_dir, step if self.unit == "step" else epoch + 1, self.layout, {
            "steps_per_epoch": self.steps_per_epoch, "step": step, "logs": logs,
            "metrics": self.metrics.rows if self.metrics is not None else [],
        }, distributed.rank(), self.unit)
        if self.run_dir is not None:
            self.run_dir.prune_checkpoints(self.keep)


def scalars(logs: dict[str, Any] | None) -> dict[str, float]:
    """The numeric entries of Keras logs as Python floats (they arrive as NumPy or tensor scalars)."""
    out = {}
    for key, value in (logs or {}).items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def default_callbacks(
    *,
    steps_per_epoch: int = 0,
    output_dir: str | Path | RunDir | None = None,
    examples_per_epoch: int = 0,
    epochs: int = 0,
    checkpoint_every_epochs: int = 1,
    keep_checkpoints: int = 3,
    early_stopping_patience: int = 0,
    tensorboard: bool = True,
    language_model: bool | dict = False,
    previous_rows: list[dict] | None = None,
    divergence_check_epochs: int = 1,
    divergence_tolerance: float = 1e-6,
    progress: str | None = "off",
    layout=None,
    output_uri: str | None = None,
    validation=None,
    utilization: dict | None = None,
    plan=None,
    tokens_per_example: int = 0,
) -> list[tf.keras.callbacks.Callback]:
    """The callbacks of a data-parallel ``model.fit``, in the order documented at the top of this module.

    Args:
        steps_per_epoch: batches per epoch on each rank (recorded in checkpoints, to resume mid-run).
        output_dir: where the chief writes checkpoints, ``metrics.jsonl`` and TensorBoard logs (None: nothing).
        examples_per_epoch: examples all ranks process per epoch, for the throughput in ``metrics.jsonl``.
        epochs: the run's epochs (for the progress lines).
        checkpoint_every_epochs, keep_checkpoints: checkpoint cadence and how many to keep.
        early_stopping_patience: epochs without ``val_loss`` improvement before stopping (0: off).
        tensorboard: write TensorBoard logs on the chief.
        language_model: add bits per byte and perplexity to the logs (a dict: with these bytes per token,
            :class:`LanguageModelMetrics`).
        previous_rows: ``metrics.jsonl`` lines of the epochs a resumed run already did.
        divergence_check_epochs, divergence_tolerance: the :class:`DivergenceGuard` (0 epochs: off).
        progress: ``"off"`` (the default: use Keras' ``verbose``), ``"lines"``, ``"bar"``, or None to choose by
            the output (a bar on a terminal, whole lines under a launcher or in a file).
        layout: how the model is laid out over the ranks (:mod:`hvdtrain.parallel`; default: data parallel).
        output_uri: the output directory as given, for every rank of a layout that writes from every rank.
        validation: a function giving the validation split's metrics (:class:`Validation`), after the averaging.
        utilization: for a language model, what :class:`MetricsLogger` needs for tokens/s and MFU per epoch.
        plan: a run's :class:`~hvdtrain.batch_plan.BatchPlan`: a run counted in steps (``train.steps``) has its
            rows say the step, validates and checkpoints at the plan's cadence and names checkpoints by step;
            ``steps_per_epoch``, ``epochs`` and ``checkpoint_every_epochs`` are then the plan's intervals.
        tokens_per_example: for the progress lines of a run counted in steps (tokens/s).

    Returns:
        A list for ``model.fit(callbacks=...)``.
    """
    chief = distributed.is_chief()
    run_dir = output_dir if isinstance(output_dir, RunDir) or output_dir is None else RunDir(output_dir)
    run_dir = run_dir if chief else None
    unit, eval_every, label = "epoch", 1, None
    if plan is not None:
        steps_per_epoch, epochs, checkpoint_every_epochs = plan.interval_steps, plan.intervals, plan.checkpoint_every
        unit, eval_every, label = plan.unit, plan.eval_every, plan.row
    broadcast = layout.broadcast_callback() if layout is not None else broadcast_initial_state(0)
    cbs: list[tf.keras.callbacks.Callback] = [c for c in (broadcast, metric_average()) if c is not None]
    if validation is not None:
        cbs.append(Validation(validation, eval_every, epochs))
    if language_model:
        cbs.append(LanguageModelMetrics(language_model if isinstance(language_model, dict) else None))
    groups = layout.consistency_groups if layout is not None else None
    cbs += [LearningRateLogger(), NanGuard(), DivergenceGuard(divergence_check_epochs, divergence_tolerance, groups)]
    if early_stopping_patience:
        cbs.append(tf.keras.callbacks.EarlyStopping(monitor="val_loss", patience=early_stopping_patience,
                                                    restore_best_weights=True))
    if chief and progress != "off":
        tokens_per_step = tokens_per_example * (plan.global_batch_size if plan is not None else 0)
        cbs.append(ProgressLogger(epochs, steps_per_epoch, progress, unit=unit, tokens_per_step=tokens_per_step))
    metrics = MetricsLogger(run_dir, examples_per_epoch, previous_rows, utilization, label, unit)
    cbs.append(metrics)
    collective = layout is not None and layout.collective_checkpoint and distributed.size() > 1
    if output_dir is not None and (run_dir is not None or collective):
        uri = output_uri or (output_dir.uri if isinstance(output_dir, RunDir) else str(output_dir))
        cbs.append(CheckpointCallback(run_dir, checkpoint_every_epochs, keep_checkpoints, steps_per_epoch, metrics,
                                      layout, uri, unit, epochs))
    if run_dir is not None:
        if tensorboard:
            cbs.append(tf.keras.callbacks.TensorBoard(log_dir=run_dir.tensorboard, profile_batch=0))
            if run_dir.tensorboard_staged:
                cbs.append(tf.keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: run_dir.publish()))
    return cbs
