"""Sharding across ranks: disjoint shards that together cover the data, with equal batch counts.

Ranks that run different numbers of steps hang Horovod at the last allreduce, so training shards are cut to the
same length on every rank. Pure functions of ``(rank, size)``: the rank comes from :mod:`hvdtrain.distributed`.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from hvdtrain.errors import DataError


def shard_indices(n: int, rank: int, size: int, equal: bool = True) -> np.ndarray:
    """Indices of the examples that ``rank`` of ``size`` owns: every ``size``-th one, starting at ``rank``.

    With ``equal`` every rank gets ``n // size`` indices (the last ``n % size`` examples go unused in that pass).
    """
    if n < size:
        raise DataError(f"{n} examples cannot be shared by {size} ranks; use fewer ranks or more data")
    idx = np.arange(rank, n, size)
    return idx[: n // size] if equal else idx


def shard_files(files: list[str], rank: int, size: int) -> list[str]:
    """Files that ``rank`` reads when there are at least as many files as ranks (round-robin, sorted)."""
    files = sorted(files)
    if len(files) < size:
        raise DataError(f"{len(files)} files cannot be shared by {size} ranks by file; shard by example")
    return files[rank::size]


def shard_dataset(
    dataset: tf.data.Dataset,
    rank: int,
    size: int,
    batch_size: int | None = None,
    num_examples: int | None = None,
) -> tf.data.Dataset:
    """Per-rank shard of a finite ``tf.data.Dataset`` with the same number of examples (and batches) per rank.

    Args:
        dataset: unbatched examples, the same order on every rank.
        rank, size: this rank and the number of ranks.
        batch_size: if given, the shard is batched with ``drop_remainder=True``.
        num_examples: the dataset's length when TensorFlow cannot infer it (for example after ``filter``).

    Returns:
        ``dataset.shard(size, rank)`` cut to ``num_examples // size`` examples.
    """
    n = int(dataset.cardinality().numpy()) if num_examples is None else num_examples
    if n == tf.data.INFINITE_CARDINALITY:
        raise DataError("cannot shard an infinite dataset into equal parts; shard before .repeat()")
    if n < 0:
        raise DataError("the dataset's length is unknown; pass num_examples=N to shard it into equal parts")
    if n < size:
        raise DataError(f"{n} examples cannot be shared by {size} ranks; use fewer ranks or more data")
    shard = dataset.shard(size, rank).take(n // size)
    if batch_size:
        if n // size < batch_size:
            raise DataError(f"each rank gets {n // size} examples, fewer than one batch of {batch_size}")
        shard = shard.batch(batch_size, drop_remainder=True)
    return shard
