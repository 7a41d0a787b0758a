"""A run's batch plan: the world-size arithmetic, in one place (a family's *parallel* plan is
:mod:`models.plan`).

Every number that depends on how many ranks run — global batch, batch per rank, steps per epoch, the scaled
learning rate, warmup steps — is computed here once, logged once by the chief, and saved in ``summary.json``.
It depends on the *data-parallel* ranks: the ranks that share one model through tensor or pipeline parallelism
share one batch (see :mod:`hvdtrain.distributed.mesh`).

A run is counted in epochs (``train.epochs``: passes over the training split) or in optimizer steps
(``train.steps``, for corpora a pass over which nobody waits for). Either way Keras' ``fit`` runs *intervals*
(its "epochs"): a pass over the data, or a number of steps between which the run logs a metrics row, evaluates
(every ``eval_every`` intervals) and checkpoints (every ``checkpoint_every``). In steps, the interval is the largest
number of steps that divides the run, the evaluation cadence and the checkpoint cadence.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from hvdtrain.errors import DataError


@dataclass(frozen=True)
class BatchPlan:
    """What one run does, per rank and in total."""

    data_ranks: int  # data-parallel ranks (replicas); all ranks without tensor or pipeline parallelism
    batch_size_per_rank: int
    global_batch_size: int
    examples_per_rank: int
    steps_per_epoch: int
    epochs: int
    total_steps: int
    base_learning_rate: float
    learning_rate: float
    warmup_steps: int
    backward_passes_per_step: int
    unit: str = "epoch"  # what the run counts: "epoch" or "step"
    interval_steps: int = 0  # optimizer steps per interval (a fit epoch); in epochs: steps_per_epoch
    intervals: int = 0  # intervals in the run; in epochs: epochs
    eval_every: int = 1  # intervals between validations
    checkpoint_every: int = 1  # intervals between checkpoints

    def as_dict(self) -> dict:
        """The plan as plain data."""
        return asdict(self)

    def describe(self) -> str:
        """One line for the log."""
        if self.unit == "step":
            length = (f"{self.total_steps} steps ({self.total_steps / self.steps_per_epoch:.3g} epochs of "
                      f"{self.steps_per_epoch} steps), validation every {self.eval_every * self.interval_steps} "
                      f"steps, checkpoints every {self.checkpoint_every * self.interval_steps}")
        else:
            length = f"{self.steps_per_epoch} steps/epoch x {self.epochs} epochs"
        return (f"{self.data_ranks} data-parallel rank(s) x {self.batch_size_per_rank} examples = global batch "
                f"{self.global_batch_size}; {length}; lr {self.base_learning_rate:g} -> {self.learning_rate:g} "
                f"(warmup {self.warmup_steps} steps)")

    def row(self, interval: int) -> dict:
        """What a metrics row and a checkpoint say of the end of ``interval`` intervals: the epoch, or the step and
        the epochs of data it amounts to."""
        step = interval * self.interval_steps
        if self.unit == "step":
            return {"step": step, "epoch": round(step / self.steps_per_epoch, 4)}
        return {"epoch": interval, "step": step}

    def checkpoint_number(self, interval: int) -> int:
        """The number in the name of the checkpoint at the end of ``interval`` intervals (``epoch-0003``,
        ``step-00000200``)."""
        return interval * self.interval_steps if self.unit == "step" else interval

    def intervals_done(self, number: int) -> int:
        """The intervals a checkpoint named ``number`` ends."""
        return number // self.interval_steps if self.unit == "step" else number


def scale_learning_rate(base: float, data_ranks: int, rule: str) -> float:
    """Scale a single-rank learning rate for ``data_ranks`` replicas: ``linear``, ``sqrt`` or ``none``."""
    if rule == "linear":
        return base * data_ranks
    if rule == "sqrt":
        return base * math.sqrt(data_ranks)
    if rule == "none":
        return base
    raise ValueError(f"unknown lr_scaling rule '{rule}'")


def make_plan(
    *,
    num_train_examples: int,
    data_ranks: int,
    batch_size_per_rank: int,
    epochs: int,
    learning_rate: float,
    lr_scaling: str = "linear",
    warmup_epochs: float = 0.0,
    backward_passes_per_step: int = 1,
    train_steps: int = 0,
    eval_every_steps: int = 0,
    checkpoint_every_steps: int = 0,
    warmup_steps: int = 0,
    checkpoint_every_epochs: int = 1,
) -> BatchPlan:
    """Compute the plan; every rank computes the same numbers from the same inputs.

    ``train_steps`` > 0 counts the run in optimizer steps (``epochs`` then plays no part): validation every
    ``eval_every_steps`` (default: a tenth of the run) and checkpoints every ``checkpoint_every_steps`` (default: at
    each validation). ``warmup_steps`` > 0 takes the place of ``warmup_epochs``.

    Each replica gets ``num_train_examples // data_ranks`` examples (the remainder is dropped so that every rank runs
    the same number of steps: ranks with more batches would hang at the last allreduce).
    """
    if num_train_examples < data_ranks:
        raise DataError(
            f"{num_train_examples} training examples cannot be shared by {data_ranks} ranks; "
            "use fewer ranks or more data"
        )
    per_rank = num_train_examples // data_ranks
    steps = per_rank // batch_size_per_rank
    if steps < 1:
        raise DataError(
            f"each rank has {per_rank} examples, fewer than one batch of {batch_size_per_rank}; "
            f"lower data.batch_size_per_rank to at most {per_rank} or use fewer ranks"
        )
    if backward_passes_per_step > 1:
        # Whole accumulation cycles only, so that no gradients are left unapplied at an epoch's end.
        steps = (steps // backward_passes_per_step) * backward_passes_per_step
        if steps < 1:
            raise DataError(
                f"{per_rank // batch_size_per_rank} batches per rank are fewer than "
                f"distributed.backward_passes_per_step={backward_passes_per_step}"
            )
    global_batch = batch_size_per_rank * data_ranks
    common = dict(data_ranks=data_ranks, batch_size_per_rank=batch_size_per_rank, global_batch_size=global_batch,
                  examples_per_rank=per_rank, steps_per_epoch=steps, base_learning_rate=learning_rate,
                  learning_rate=scale_learning_rate(learning_rate, data_ranks, lr_scaling),
                  backward_passes_per_step=backward_passes_per_step)
    warmup = warmup_steps or int(round(warmup_epochs * steps))
    if not train_steps:
        return BatchPlan(**common, epochs=epochs, total_steps=steps * epochs, warmup_steps=warmup, unit="epoch",
                         interval_steps=steps, intervals=epochs, eval_every=1,
                         checkpoint_every=max(1, checkpoint_every_epochs))
    evaluate = eval_every_steps or max(1, train_steps // 10)
    save = checkpoint_every_steps or evaluate
    interval = math.gcd(train_steps, evaluate, save)
    if backward_passes_per_step > 1 and interval % backward_passes_per_step:
        raise DataError(f"train.steps, eval_every_steps and checkpoint_every_steps must be multiples of "
                        f"distributed.backward_passes_per_step={backward_passes_per_step}")
    return BatchPlan(**common, epochs=0, total_steps=train_steps, warmup_steps=min(warmup, train_steps), unit="step",
                     interval_steps=interval, intervals=train_steps // interval, eval_every=evaluate // interval,
                     checkpoint_every=save // interval)


def plan_for(cfg, num_train_examples: int, data_ranks: int) -> BatchPlan:
    """The plan of a :class:`~hvdtrain.config.Config` at ``data_ranks`` data-parallel ranks."""
    return make_plan(
        num_train_examples=num_train_examples, data_ranks=data_ranks,
        batch_size_per_rank=cfg.data.batch_size_per_rank, epochs=cfg.train.epochs,
        learning_rate=cfg.train.learning_rate, lr_scaling=cfg.train.lr_scaling, warmup_epochs=cfg.train.warmup_epochs,
        backward_passes_per_step=cfg.distributed.backward_passes_per_step, train_steps=cfg.train.steps,
        eval_every_steps=cfg.train.eval_every_steps, checkpoint_every_steps=cfg.train.checkpoint_every_steps,
        warmup_steps=cfg.train.warmup_steps, checkpoint_every_epochs=cfg.train.checkpoint_every_epochs,
    )
