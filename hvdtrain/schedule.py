"""Learning-rate schedules as pure functions of the step.

``lr_at(step)`` ramps linearly from the single-rank rate to the scaled rate over the warmup (Goyal et al., 2017:
large global batches diverge early without it), then follows a constant, cosine or step schedule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupSchedule:
    """Learning rate at each optimizer step.

    Args:
        base_lr: rate at step 0 (the unscaled, single-rank rate).
        peak_lr: rate reached at the end of warmup (the scaled rate).
        warmup_steps: length of the linear ramp.
        total_steps: steps in the whole run (for cosine).
        kind: ``constant``, ``cosine`` (to 0 at ``total_steps``) or ``step``.
        step_every: for ``step``: steps between decays.
        step_factor: for ``step``: multiplier at each decay.
    """

    base_lr: float
    peak_lr: float
    warmup_steps: int = 0
    total_steps: int = 1
    kind: str = "constant"
    step_every: int = 1
    step_factor: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr + (self.peak_lr - self.base_lr) * step / self.warmup_steps
        after = step - self.warmup_steps
        if self.kind == "constant":
            return self.peak_lr
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            return 0.5 * self.peak_lr * (1.0 + math.cos(math.pi * min(1.0, after / span)))
        if self.kind == "step":
            return self.peak_lr * self.step_factor ** (after // max(1, self.step_every))
        raise ValueError(f"unknown schedule '{self.kind}'")
