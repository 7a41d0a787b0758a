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
