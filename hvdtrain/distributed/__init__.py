"""Everything distributed, and the only part of hvdtrain that imports Horovod.

- :mod:`~hvdtrain.distributed.core`: init, ranks, Horovod knobs, optimizer wrapping, collectives, elastic state.
- :mod:`~hvdtrain.distributed.timing`: timings of collectives for the benchmarks.

Importing this package imports no Horovod and no TensorFlow: both load on first use.
"""
from hvdtrain.distributed.core import *  # noqa: F401,F403
from hvdtrain.distributed.core import __all__  # noqa: F401
