"""What every training-based compression method shares: data-parallel fine-tuning and saving on the chief."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvdtrain import distributed
from hvdtrain.config import Config
from hvdtrain.batch_plan import make_plan


@dataclass
class Artifact:
    """One compressed (or reference) model: a Keras model or a TFLite file, and how it was made."""

    name: str
    kind: str  # "keras" or "tflite"
    path: Path
    method: str
    model: Any = None  # the Keras model (keras artifacts), for evaluation and latency
    notes: dict[str, Any] = field(default_factory=dict)


def fine_tune(model, source, cfg: Config, epochs: int, learning_rate: float, extra_callbacks=(),
              loss=None) -> None:
    """Fine-tune ``model`` data-parallel on every rank: sharded data, averaged gradients, rank 0's start state.

    The model is made ready by :func:`hvdtrain.runtime.prepare` (the run's optimizer and distributed options) at
    ``learning_rate`` scaled like training's (``train.lr_scaling``); ``extra_callbacks`` run on every rank (for
    example pruning's step update), after the broadcast and metric averaging.
    """
    from hvdtrain import callbacks as cb
    from hvdtrain import runtime

    size = distributed.size()
    plan = make_plan(num_train_examples=source.num_train, data_ranks=size,
                     batch_size_per_rank=cfg.data.batch_size_per_rank, epochs=epochs, learning_rate=learning_rate,
                     lr_scaling=cfg.train.lr_scaling)
    runtime.prepare(model, cfg, plan.learning_rate, loss=loss)
    ds = source.train_dataset(distributed.rank(), size, plan.batch_size_per_rank, cfg.train.seed,
                              cfg.data.shuffle_buffer)
    # the divergence guard too: a custom train step (distillation) that skipped Horovod's averaging would stop here
    callbacks = [cb.broadcast_initial_state(0), cb.metric_average(), *extra_callbacks,
                 cb.DivergenceGuard(cfg.distributed.divergence_check_epochs, cfg.distributed.divergence_tolerance)]
    if distributed.is_chief():
        callbacks.append(cb.ProgressLogger(epochs, plan.steps_per_epoch))
    model.fit(ds, epochs=epochs, steps_per_epoch=plan.steps_per_epoch, callbacks=callbacks, verbose=0)


def count_params(model) -> tuple[int, int]:
    """(parameters, non-zero parameters) of a Keras model's weights."""
    import numpy as np

    weights = model.get_weights()
    return int(sum(w.size for w in weights)), int(sum(np.count_nonzero(w) for w in weights))
