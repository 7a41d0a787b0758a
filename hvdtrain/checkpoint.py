"""Checkpoints of a training run: what is saved, how it is restored, and the newest good one after a crash.

A checkpoint is the model's weights and the optimizer's state (its step count included, so the learning-rate
schedule resumes exactly) in TensorFlow's checkpoint format, plus ``state.json`` (written last, the marker of a
complete checkpoint; see :mod:`hvdtrain.rundir`) with the epoch, steps per epoch, the epoch's logs and every
``metrics.jsonl`` line up to it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hvdtrain import console
from hvdtrain.rundir import RunDir


def inner_optimizer(optimizer):
    """The optimizer inside a loss-scale wrapper (or the optimizer itself)."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def save(run_dir: RunDir, model, optimizer, epoch: int, state: dict[str, Any]) -> str:
    """Write the checkpoint of ``epoch`` (chief only); returns its URI."""
    import tensorflow as tf

    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer)
    return run_dir.write_checkpoint(epoch, lambda folder: ckpt.write(str(folder / "ckpt")), state)


def restore_latest(run_dir: RunDir, model, optimizer) -> tuple[int, dict[str, Any], list[str]]:
    """Restore the newest readable checkpoint into ``model`` and ``optimizer`` (chief only).

    A checkpoint that cannot be read (truncated, corrupt, from another model) is skipped with a warning and the
    previous one is tried. Returns ``(epoch, state, warnings)``; epoch 0 and an empty state when none could be.
    """
    import tensorflow as tf

    warnings = []
    for found in reversed(run_dir.checkpoints()):
        def read(folder: Path) -> None:
            status = tf.train.Checkpoint(model=model, optimizer=optimizer).read(str(folder / "ckpt"))
            status.assert_existing_objects_matched()

        try:
            state = run_dir.read_checkpoint(found, read)
            return int(state["epoch"]), state, warnings
        except Exception as exc:  # noqa: BLE001 - any failure to read means: use the previous checkpoint
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            warnings.append(f"checkpoint {found.uri} is unreadable ({reason}); using the previous one")
    return 0, {}, warnings


def warn(message: str) -> None:
    """A warning line on stderr (the chief's)."""
    console.warn(message)
