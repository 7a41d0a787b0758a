"""Everything distributed, and the only part of hvdtrain that imports Horovod.

- :mod:`~hvdtrain.distributed.core`: init, ranks, Horovod knobs, optimizer wrapping, collectives, elastic state.
- :mod:`~hvdtrain.distributed.timing`: timings of collectives for the benchmarks.
- :mod:`~hvdtrain.distributed.mesh`: the data x tensor x pipeline grid of process sets, and collectives over a group.
- :mod:`~hvdtrain.distributed.tensor`: Megatron's f and g, the context a family's math runs in, the
  vocabulary-parallel cross-entropy.
- :mod:`~hvdtrain.distributed.sharded`: a rank's part of a model, made one variable at a time from the family's plan.
- :mod:`~hvdtrain.distributed.pipeline`: the stage split, GPipe and 1F1B timetables, transfers between stages.
- :mod:`~hvdtrain.distributed.zero`: ZeRO-1 over the data-parallel group, with float32 master slices.
- :mod:`~hvdtrain.distributed.raycluster`: Horovod on a Ray cluster.

Importing this package imports no Horovod and no TensorFlow: both load on first use.
"""
from hvdtrain.distributed.core import *  # noqa: F401,F403
from hvdtrain.distributed.core import __all__  # noqa: F401
