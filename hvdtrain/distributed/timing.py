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


def time_chain(num_bytes: int, length: int, repeats: int, op: str = "allreduce") -> list[float]:
    """Seconds per collective in a chain of ``length`` dependent collectives of ``num_bytes`` (float32) inside one
    ``tf.function``, once per repeat, on every rank: the pattern of tensor parallelism, where each block's
    allreduce waits for the compute that follows the previous one. ``op``: ``allreduce`` or ``allgather``."""
    import time

    import horovod.tensorflow as hvd_tf
    import tensorflow as tf

    _hvd()
    n = max(1, num_bytes // 4)

    @tf.function
    def chain(x):
        for i in range(length):
            if op == "allgather":
                y = hvd_tf.allgather(x, name=f"chain_gather_{i}")[:n]
            else:
                y = hvd_tf.allreduce(x, op=hvd_tf.Average, name=f"chain_reduce_{i}")
            x = y * 1.0001 + 1e-3  # the next collective needs this one's result
        return x

    x = tf.ones([n], tf.float32)
    chain(x).numpy()  # trace and warm up
    times = []
    for _ in range(repeats):
        barrier()
        start = time.perf_counter()
        chain(x).numpy()
        times.append((time.perf_counter() - start) / length)
    return times
