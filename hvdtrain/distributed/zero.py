"""Sharded optimizer states: ZeRO stage 1 (Rajbhandari et al., 2020) over the data-parallel group.

The model's variables (this rank's tensor-parallel slices of them) are seen as one flat vector, padded to a
multiple of the group size and cut into equal slices, one per data-parallel rank. Each rank keeps, for its slice
only, the float32 master weights and the optimizer's state (Adam's two moments, momentum), so that memory falls by
the group size; the model's own variables may then be kept in the compute dtype (bfloat16 under mixed precision).

A step: the gradients, flattened, are reduce-scattered (averaged; each rank receives its slice), the caller may
scale them (clipping needs the norm of every slice: :meth:`sum_of_squares`), each rank updates its master slice
with the ordinary Keras optimizer, and the updated slices are all-gathered back into the variables. The update is
elementwise, so the result equals the unsharded optimizer's.

This is also what ZeRO stage 2 saves elsewhere: no rank keeps a gradient buffer between steps here (the gradients
live inside the step, and only the reduce-scattered slice reaches the optimizer).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from hvdtrain.distributed.fsdp import Flat
from hvdtrain.distributed.mesh import Group


class ShardedOptimizer:
    """A Keras optimizer whose state and master weights live in slices over ``group``.

    Args:
        optimizer: a plain Keras optimizer; it updates this rank's slice.
        variables: the variables it trains (the same list, shapes and order on every member of ``group``).
        group: the data-parallel group.
        counted: per variable, whether it counts in a whole-model sum (see
            :attr:`hvdtrain.distributed.sharded.Entry.counted`).
    """

    def __init__(self, optimizer, variables, group: Group, counted=None):
        self.optimizer, self.variables, self.group = optimizer, list(variables), group
        self.sizes = [int(np.prod(v.shape)) for v in self.variables]
        self.flat = Flat(tuple(self.sizes), group.size, group.rank if group.size > 1 else 0)
        self.total, self.slice_size = self.flat.total, self.flat.slice_size
        self.counted = list(counted) if counted is not None else [True] * len(self.variables)
        with tf.init_scope():
            self.master = tf.Variable(self._initial_slice(), name="zero_master", trainable=False)
        optimizer.build([self.master])

    # ---- the slice's geometry

    def overlaps(self):
        """``(variable index, start, stop within the variable's flat values, start within the slice)`` of every
        variable this rank's slice covers."""
        return self.flat.overlaps()

    def _initial_slice(self) -> np.ndarray:
        out = np.zeros(self.slice_size, np.float32)
        for i, a, b, at in self.overlaps():
            out[at: at + b - a] = np.asarray(self.variables[i].numpy(), np.float32).ravel()[a:b]
        return out

    # ---- one step

    def reduce(self, grads):
        """This rank's slice of the gradients averaged over the group (a collective; call inside the step)."""
        flat = tf.concat([tf.reshape(tf.zeros_like(v, tf.float32) if g is None else tf.cast(g, tf.float32), [-1])
                          for g, v in zip(grads, self.variables)], 0)
        flat = tf.pad(flat, [[0, self.slice_size * self.group.size - self.total]])
        return self.group.reducescatter(flat, "average")

    def sum_of_squares(self, mine):
        """The sum of squares of the counted variables' elements in the slice ``mine`` (padding excluded)."""
        parts = [tf.reduce_sum(tf.square(mine[at: at + b - a])) for i, a, b, at in self.overlaps() if self.counted[i]]
        return tf.add_n(parts) if parts else tf.constant(0.0)

    def step(self, mine) -> None:
        """Update this rank's master slice from its gradient slice and gather every slice into the variables."""
        self.optimizer.apply_gradients([(mine, self.master)])
        dtype = self.variables[0].dtype if self.variables else tf.float32
        full = self.group.allgather(tf.cast(self.master.read_value(), dtype))[: self.total]
        for var, part in zip(self.variables, tf.split(full, self.sizes)):
            var.assign(tf.reshape(part, var.shape))

    # ---- state

    def slot_variables(self) -> list[tf.Variable]:
        """The optimizer's state for this rank's slice (without the step count)."""
        return [v for v in self.optimizer.variables if v is not self.optimizer.iterations]

    def slot_kinds(self) -> list[str]:
        """The slots' names (``m``, ``v`` for Adam), in the order of :meth:`slot_variables` (Keras names a slot
        ``[scope/]KIND/zero_master``)."""
        return [v.name.split(":")[0].rsplit("/", 2)[-2] for v in self.slot_variables()]

    def pieces(self):
        """What this rank saves: ``(variable index, kind, flat start, flat stop, values)`` for the master weights
        (kind ``param``) and every slot; ``values`` reads its range when called (when the checkpoint writes it)."""
        arrays = [("param", self.master)] + list(zip(self.slot_kinds(), self.slot_variables()))
        return [(i, kind, a, b, lambda v=values, start=at, stop=at + b - a: v[start:stop])
                for i, a, b, at in self.overlaps() for kind, values in arrays]

    def load(self, read) -> None:
        """Fill the master slice and the slots from ``read(variable index, kind) -> flat values`` (float32; the
        caller sets the variables themselves). No collective: a rank that fails to read leaves no other waiting."""
        kinds = ["param"] + self.slot_kinds()
        targets = [self.master] + self.slot_variables()
        for kind, target in zip(kinds, targets):
            out = np.zeros(self.slice_size, np.float32)
            for i, a, b, at in self.overlaps():
                out[at: at + b - a] = read(i, kind)[a:b]
            target.assign(out)
