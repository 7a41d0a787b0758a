"""A run's batch plan: the world-size arithmetic, in one place (a family's *parallel* plan is
:mod:`models.plan`).

Every number that depends on how many ranks run — global batch, batch per rank, steps per epoch, the scaled
learning rate, warmup steps — is computed here once, logged once by the chief, and saved in ``summary.json``.
It depends on the *data-parallel* ranks: the ranks that share one model through tensor or pipeline parallelism
share one batch (see :mod:`hvdtrain.distributed.mesh`).
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

    def as_dict(self) -> dict:
        """The plan as plain data."""
        return asdict(self)

    def describe(self) -> str:
        """One line for the log."""
        return (
            f"{self.data_ranks} data-parallel rank(s) x {self.batch_size_per_rank} examples = global batch "
            f"{self.global_batch_size}; {self.steps_per_epoch} steps/epoch x {self.epochs} epochs; "
            f"lr {self.base_learning_rate:g} -> {self.learning_rate:g} (warmup {self.warmup_steps} steps)"
        )


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
) -> BatchPlan:
    """Compute the plan; every rank computes the same numbers from the same inputs.

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
    return BatchPlan(
        data_ranks=data_ranks,
        batch_size_per_rank=batch_size_per_rank,
        global_batch_size=global_batch,
        examples_per_rank=per_rank,
        steps_per_epoch=steps,
        epochs=epochs,
        total_steps=steps * epochs,
        base_learning_rate=learning_rate,
        learning_rate=scale_learning_rate(learning_rate, data_ranks, lr_scaling),
        warmup_steps=int(round(warmup_epochs * steps)),
        backward_passes_per_step=backward_passes_per_step,
    )


def plan_for(cfg, num_train_examples: int, data_ranks: int) -> BatchPlan:
    """The plan of a :class:`~hvdtrain.config.Config` at ``data_ranks`` data-parallel ranks."""
    return make_plan(
        num_train_examples=num_train_examples, data_ranks=data_ranks,
        batch_size_per_rank=cfg.data.batch_size_per_rank, epochs=cfg.train.epochs,
        learning_rate=cfg.train.learning_rate, lr_scaling=cfg.train.lr_scaling, warmup_epochs=cfg.train.warmup_epochs,
        backward_passes_per_step=cfg.distributed.backward_passes_per_step,
    )
