"""Sharded optimizer states: ZeRO stage 1 (Rajbhandari et al., 2020) over the data-parallel group.

The model's variables (this rank's tensor-parallel shards of them) are seen as one flat vector, padded to a
multiple of the group size and cut into equal slices, one per data-parallel rank. Each rank keeps the optimizer's
state (Adam's two moments, momentum) for its slice only, so optimizer memory per rank falls by the group size.
A step: the gradients, flattened, are reduce-scattered (averaged; each rank receives its slice), each rank updates
its slice with the ordinary Keras optimizer, and the updated slices are all-gathered back into the variables. The
update is elementwise, so the result equals the unsharded optimizer's.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from hvdtrain.distributed.mesh import Group


class ShardedOptimizer:
    """A Keras optimizer whose state lives in slices over ``group``.

    Args:
        optimizer: a plain Keras optimizer (not wrapped by Horovod); it updates this rank's slice.
        variables: the variables it trains (the same list, in the same order, on every member of ``group``).
        group: the data-parallel group.
    """

    def __init__(self, optimizer, variables, group: Group):
        self.optimizer, self.variables, self.group = optimizer, list(variables), group
        self.sizes = [int(np.prod(v.shape)) for v in self.variables]
        self.total = sum(self.sizes)
        self.slice_size = -(-self.total // group.size)
        self.start = (group.rank if group.size > 1 else 0) * self.slice_size
        with tf.init_scope():
            self.master = tf.Variable(self._my_slice(self._flat_values()), name="zero_slice", trainable=False)
        optimizer.build([self.master])

    def _flat_values(self) -> np.ndarray:
        flat = np.concatenate([np.asarray(v.numpy(), np.float32).ravel() for v in self.variables])
        return np.pad(flat, (0, self.slice_size * self.group.size - self.total))

    def _my_slice(self, flat: np.ndarray) -> np.ndarray:
        return flat[self.start: self.start + self.slice_size]

    def apply_gradients(self, grads) -> None:
        """One optimizer step from this rank's (unaveraged) gradients; call inside the train step."""
        flat = tf.concat([tf.reshape(tf.zeros_like(v) if g is None else tf.cast(g, tf.float32), [-1])
                          for g, v in zip(grads, self.variables)], 0)
        flat = tf.pad(flat, [[0, self.slice_size * self.group.size - self.total]])
        mine = self.group.reducescatter(flat, "average")
        self.optimizer.apply_gradients([(mine, self.master)])
        full = self.group.allgather(self.master.read_value())[: self.total]
        for var, part in zip(self.variables, tf.split(full, self.sizes)):
            var.assign(tf.reshape(part, var.shape))

    def resync(self) -> None:
        """Take this rank's slice of the variables again (after the variables were loaded or broadcast)."""
        self.master.assign(self._my_slice(self._flat_values()))

    def slot_variables(self) -> list[tf.Variable]:
        """The optimizer's state for this rank's slice (without the step count)."""
        return [v for v in self.optimizer.variables if v is not self.optimizer.iterations]

    def gather_slots(self) -> list[list[np.ndarray]]:
        """Every slot kind's full state, per variable (a collective on the group): ``[kind][variable] -> array``."""
        out = []
        for slot in self.slot_variables():
            flat = np.concatenate(self.group.allgather_object(slot.numpy()))[: self.total]
            out.append([part.reshape(v.shape) for part, v in zip(np.split(flat, np.cumsum(self.sizes)[:-1]),
                                                                  self.variables)])
        return out

    def load_slots(self, slots: list[list[np.ndarray]]) -> None:
        """Set this rank's slices of the state from full per-variable arrays (``[kind][variable]``)."""
        for slot, per_var in zip(self.slot_variables(), slots):
            flat = np.concatenate([np.asarray(a, np.float32).ravel() for a in per_var])
            flat = np.pad(flat, (0, self.slice_size * self.group.size - self.total))
            slot.assign(self._my_slice(flat))
