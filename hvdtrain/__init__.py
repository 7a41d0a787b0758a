"""hvdtrain: distributed Keras training on Horovod (data, tensor and pipeline parallelism, sharded optimizer
states), and compression and serving of the trained models.

The public API for a user's own ``model.fit`` script::

    import hvdtrain
    hvdtrain.init()                                      # Horovod, threads per rank, GPU by local rank
    ds = hvdtrain.shard(dataset, batch_size=32)          # equal batches on every rank
    lr = hvdtrain.WarmupSchedule(base_lr=1e-3, peak_lr=1e-3 * hvdtrain.size(), warmup_steps=100)
    model.compile(optimizer=hvdtrain.wrap_optimizer(tf.keras.optimizers.Adam(lr)), loss=..., metrics=[...])
    model.fit(ds, callbacks=hvdtrain.callbacks.default_callbacks(...), verbose=2 if hvdtrain.is_chief() else 0)

Importing is cheap: nothing initialises and TensorFlow is not imported until it is needed.
"""
from __future__ import annotations

import importlib.util
import os

# TensorFlow >= 2.16 gives Keras 3 as tf.keras unless TF_USE_LEGACY_KERAS is set before TensorFlow is imported;
# hvdtrain (and Horovod's Keras layer) need Keras 2, which is then the tf-keras package. Set where tf-keras is
# installed (the default stack, TensorFlow 2.21); TensorFlow 2.15 has Keras 2 of its own and would look for
# tf-keras if it were set.
if importlib.util.find_spec("tf_keras") is not None:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from typing import TYPE_CHECKING

from hvdtrain.distributed import (
    allreduce,
    barrier,
    broadcast_object,
    init,
    is_chief,
    local_rank,
    local_size,
    rank,
    size,
    wrap_optimizer,
)

if TYPE_CHECKING:
    import tensorflow as tf

__version__ = "0.1.0"


def shard(dataset: "tf.data.Dataset", batch_size: int | None = None, num_examples: int | None = None):
    """This rank's shard of a finite, unbatched ``dataset``, with the same number of batches on every rank.

    See :func:`hvdtrain.data.sharding.shard_dataset`.
    """
    from hvdtrain.data.sharding import shard_dataset

    return shard_dataset(dataset, rank(), size(), batch_size=batch_size, num_examples=num_examples)


def from_pretrained(path: str, context_length: int = 0, adapter: str | None = None):
    """A Hugging Face checkpoint (a directory, an ``s3://`` prefix, or ``builtin:NAME``) as the family's Keras
    model, with a PEFT LoRA adapter merged in when given: :func:`models.from_pretrained` on hvdtrain's storage."""
    from hvdtrain.formats import huggingface

    return huggingface.load_model(path, context_length, adapter)


def exit(code: int = 0) -> None:  # noqa: A001 - the one way a script should end after using tensorflow-io
    """End a script: flush, shut Horovod down, and (after tensorflow-io's ``hdfs://`` was used) leave without the
    interpreter's teardown, during which tensorflow-io 0.36 aborts (see :func:`hvdtrain.process.exit_process`)."""
    from hvdtrain.process import exit_process

    exit_process(code)


def __getattr__(name: str):
    # These import TensorFlow, so they are loaded on first use.
    import importlib

    if name == "callbacks":
        return importlib.import_module("hvdtrain.callbacks")
    if name == "WarmupSchedule":
        return importlib.import_module("hvdtrain.schedule").WarmupSchedule
    if name == "ray":  # hvdtrain.ray.run(fn, num_workers=2): a user's function on Horovod workers placed by Ray
        return importlib.import_module("hvdtrain.distributed.raycluster")
    raise AttributeError(f"module 'hvdtrain' has no attribute '{name}'")


__all__ = [
    "allreduce", "barrier", "broadcast_object", "callbacks", "exit", "from_pretrained", "init", "is_chief",
    "local_rank", "local_size", "rank", "ray", "shard", "size", "wrap_optimizer", "WarmupSchedule",
]
