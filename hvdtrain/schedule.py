"""The learning rate as a function of the optimizer step, computed inside the training graph.

:class:`WarmupSchedule` ramps linearly from the single-rank rate to the rate scaled for all ranks (Goyal et al.,
2017: large global batches diverge early without it), then follows a constant, cosine or step schedule. It is a
Keras ``LearningRateSchedule``: pass it as the optimizer's learning rate. Computed from ``optimizer.iterations``,
it needs no per-batch callback (no host round trip, exact under ``steps_per_execution``) and resumes exactly from
a checkpoint, which restores the iteration count.
"""
from __future__ import annotations

import math

import tensorflow as tf

KINDS = ("constant", "cosine", "step")


@tf.keras.utils.register_keras_serializable(package="hvdtrain")
class WarmupSchedule(tf.keras.optimizers.schedules.LearningRateSchedule):
    """Learning rate at each optimizer step.

    Args:
        base_lr: rate at step 0 (the unscaled, single-rank rate).
        peak_lr: rate reached at the end of warmup (the scaled rate).
        warmup_steps: length of the linear ramp.
        total_steps: steps in the whole run (for cosine, which reaches 0 there).
        kind: ``constant``, ``cosine`` or ``step``.
        step_every: for ``step``: steps between decays.
        step_factor: for ``step``: multiplier at each decay.
    """

    def __init__(self, base_lr: float, peak_lr: float, warmup_steps: int = 0, total_steps: int = 1,
                 kind: str = "constant", step_every: int = 1, step_factor: float = 0.1):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"schedule kind must be one of {', '.join(KINDS)}, got '{kind}'")
        self.base_lr, self.peak_lr = float(base_lr), float(peak_lr)
        self.warmup_steps, self.total_steps = int(warmup_steps), max(1, int(total_steps))
        self.kind, self.step_every, self.step_factor = kind, max(1, int(step_every)), float(step_factor)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = float(self.warmup_steps)
        after = tf.maximum(step - warm, 0.0)
        if self.kind == "constant":
            decayed = tf.constant(self.peak_lr)
        elif self.kind == "cosine":
            span = float(max(1, self.total_steps - self.warmup_steps))
            decayed = 0.5 * self.peak_lr * (1.0 + tf.cos(math.pi * tf.minimum(1.0, after / span)))
        else:
            decayed = self.peak_lr * tf.pow(self.step_factor, tf.floor(after / float(self.step_every)))
        if self.warmup_steps <= 0:
            return decayed
        ramp = self.base_lr + (self.peak_lr - self.base_lr) * step / warm
        return tf.where(step < warm, ramp, decayed)

    def get_config(self):
        return {"base_lr": self.base_lr, "peak_lr": self.peak_lr, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "kind": self.kind, "step_every": self.step_every,
                "step_factor": self.step_factor}


class ElasticSchedule(tf.keras.optimizers.schedules.LearningRateSchedule):
    """A schedule made for one world size, kept in step with training progress when the world size changes.

    Elastic runs change the number of ranks, so the steps per epoch and the scaled rate change mid-run. On each
    (re)start :meth:`rescale` records where training stands; afterwards the rate is
    ``schedule(offset + (step - start) * ratio) * scale``: the original schedule at the same point of progress
    (in epochs), scaled for the current number of ranks.
    """

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule
        self.scale = tf.Variable(1.0, trainable=False, name="elastic_lr_scale")
        self.ratio = tf.Variable(1.0, trainable=False, name="elastic_step_ratio")
        self.start = tf.Variable(0.0, trainable=False, name="elastic_step_start")
        self.offset = tf.Variable(0.0, trainable=False, name="elastic_step_offset")

    def rescale(self, iterations: int, epochs_done: float, first_steps_per_epoch: int, steps_per_epoch: int,
                lr_ratio: float) -> None:
        """Continue from ``epochs_done`` at ``steps_per_epoch`` steps per epoch and ``lr_ratio`` times the rate."""
        self.start.assign(float(iterations))
        self.offset.assign(epochs_done * first_steps_per_epoch)
        self.ratio.assign(first_steps_per_epoch / steps_per_epoch)
        self.scale.assign(lr_ratio)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        return self.schedule(self.offset + (step - self.start) * self.ratio) * self.scale

    def get_config(self):
        return self.schedule.get_config()
