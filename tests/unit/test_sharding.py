import numpy as np
import pytest
import tensorflow as tf

from hvdtrain.data.sharding import shard_dataset, shard_indices
from hvdtrain.errors import DataError


@pytest.mark.parametrize("n, size", [(10, 2), (11, 2), (1797, 3), (5, 5)])
def test_shard_indices_disjoint_equal_and_nearly_complete(n, size):
    shards = [shard_indices(n, r, size) for r in range(size)]
    assert len({len(s) for s in shards}) == 1
    allidx = np.concatenate(shards)
    assert len(set(allidx.tolist())) == len(allidx)  # disjoint
    assert len(allidx) == n - n % size  # all but the remainder
    full = [shard_indices(n, r, size, equal=False) for r in range(size)]
    assert sorted(np.concatenate(full).tolist()) == list(range(n))  # complete without `equal`


def test_shard_dataset_equal_batches_and_disjoint():
    ds = tf.data.Dataset.range(103)
    shards = [list(shard_dataset(ds, r, 2, batch_size=10).as_numpy_iterator()) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5
    seen = [set(np.concatenate(s).tolist()) for s in shards]
    assert not seen[0] & seen[1]


def test_shard_dataset_needs_a_length():
    unknown = tf.data.Dataset.range(10).filter(lambda x: x % 2 == 0)
    with pytest.raises(DataError, match="num_examples"):
        shard_dataset(unknown, 0, 2)
    assert len(list(shard_dataset(unknown, 0, 2, num_examples=5))) == 2
    with pytest.raises(DataError, match="infinite"):
        shard_dataset(tf.data.Dataset.range(3).repeat(), 0, 2)


def test_global_batches_do_not_depend_on_the_number_of_replicas():
    """Each epoch is one seeded permutation cut into global batches; replica r takes its slice of each. So the
    replicas of a data=2 (or 4) run together see exactly the one-process run's batches, epoch after epoch."""
    from hvdtrain.data.source import split_arrays

    x = np.arange(103)[:, None].astype(np.float32)
    src = split_arrays(x, np.arange(103), test_fraction=0.0, validation_fraction=0.0, seed=0)
    steps = 2 * (103 // 8)  # two epochs of global batches of 8 (7 examples left out of each)
    one = [b[1].numpy() for b in src.train_dataset(0, 1, 8, seed=5, shuffle_buffer=0).take(steps)]
    for size in (2, 4):
        parts = [[b[1].numpy() for b in src.train_dataset(r, size, 8 // size, 5, 0).take(steps)] for r in range(size)]
        assert all(np.array_equal(np.concatenate([p[i] for p in parts]), one[i]) for i in range(steps))
    epoch1, epoch2 = np.concatenate(one[: steps // 2]), np.concatenate(one[steps // 2:])
    assert len(set(epoch1.tolist())) == len(epoch1) and not np.array_equal(epoch1, epoch2)  # reshuffled
    other = [b[1].numpy() for b in src.train_dataset(0, 1, 8, seed=6, shuffle_buffer=0).take(2)]
    assert not np.array_equal(other[0], one[0])
