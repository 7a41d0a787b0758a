"""Timings of collectives for the benchmarks (the machine's cost of an allreduce), on every rank."""
from __future__ import annotations

from hvdtrain.distributed.core import _hvd, barrier


def time_allreduce(num_bytes: int, repeats: int, warmup: int = 2) -> list[float]:
    """Seconds per allreduce (average) of a float32 tensor of ``num_bytes``, once per repeat, on every rank."""
    import time

    import horovod.tensorflow as hvd_tf
    import tensorflow as tf

    _hvd()
    tensor = tf.ones([max(1, num_bytes // 4)], tf.float32)
    name = f"bench_allreduce_{num_bytes}"
    for _ in range(warmup):
        hvd_tf.allreduce(tensor, op=hvd_tf.Average, name=name).numpy()
    times = []
    for _ in range(repeats):
        barrier()
        start = time.perf_counter()
        hvd_tf.allreduce(tensor, op=hvd_tf.Average, name=name).numpy()
        times.append(time.perf_counter() - start)
    return times
