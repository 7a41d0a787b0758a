"""Exact metrics on a whole split, computed in parts by every rank and summed across ranks.

A leaf: it imports nothing of hvdtrain but the distributed core (for the sum across ranks).
"""
from __future__ import annotations

import math
import weakref

import numpy as np

from hvdtrain import distributed


def local_sums(model, dataset) -> np.ndarray:
    """``[sum of cross-entropy, number correct, count]`` over ``dataset`` (count is examples, or tokens).

    One compiled function per model, traced once for the dataset's batches whatever their size (a trace of a
    Transformer costs seconds here): eager calls would cost more than these small models. A model that computes
    them itself (a parallel layout's trainer, whose logits are split over ranks) gives its ``metric_sums(x, y)``.
    """
    import tensorflow as tf

    def sums(x, y):
        logits = tf.cast(model(x, training=False), tf.float32)
        ce = tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        hit = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), tf.cast(y, tf.int32)), tf.float32)
        return tf.stack([tf.reduce_sum(ce), tf.reduce_sum(hit), tf.cast(tf.size(ce), tf.float32)])

    total = np.zeros(3, np.float64)
    if dataset is None:
        return total
    step = _steps.get(model)
    if step is None:
        step = _steps[model] = tf.function(getattr(model, "metric_sums", sums),
                                           input_signature=list(dataset.element_spec))
    for x, y in dataset:
        total += step(x, y).numpy()
    return total


_steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # one compiled step per model, kept across epochs


def metrics_from_sums(sums, language_model: bool, bytes_per_token: float = 1.0) -> dict[str, float]:
    """Loss and accuracy (and bits per byte and perplexity for language models) from summed parts; the loss is
    per token, bits per byte divide its bits by the text's bytes per token."""
    loss_sum, hits, count = (float(v) for v in sums)
    if count == 0:
        return {}
    out = {"loss": loss_sum / count, "accuracy": hits / count, "count": int(count)}
    if language_model:
        out["bits_per_byte"] = out["loss"] / math.log(2) / bytes_per_token
        out["perplexity"] = math.exp(out["loss"])
    return out


def evaluate(model, source, split: str, batch_size: int, shard: tuple[int, int] | None = None,
             counted: bool = True, limit: int = 0) -> dict[str, float]:
    """Metrics of ``model`` on the whole ``split`` of ``source`` (its first ``limit`` examples when given); the same
    result on every rank.

    Args:
        shard: ``(index, count)`` of this rank's part of the split (default: its rank among all ranks). Ranks
            that hold parts of one model (a tensor group, a pipeline) share a part and run the model together.
        counted: whether this rank's sums count (one rank per part does).
    """
    if not source.num_examples(split):
        return {}
    rank, size = shard or (distributed.rank(), distributed.size())
    sums = local_sums(model, source.eval_dataset(split, rank, size, batch_size, equal=False, limit=limit))
    sums = sums if counted else np.zeros_like(sums)
    if distributed.size() > 1:
        sums = distributed.allreduce(sums, op="sum", name=f"evaluate_{split}")
    return metrics_from_sums(sums, source.is_language_model, source.bytes_of_token(split))
