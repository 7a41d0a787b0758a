"""Pipeline parallelism over Horovod: the stage split, the GPipe and 1F1B schedules, and transfers by alltoall.

A model's plan is cut into consecutive stages of its units (the units pinned first, such as an embedding, on the
first stage, those pinned last, such as the logits, on the last; the units between them balanced by parameter
count). A batch is cut into M micro-batches that flow through the
stages: activations forward, gradients backward.

**Schedules.** Each stage runs its operations in a fixed order: GPipe (Huang et al., 2019) runs every forward,
then every backward; 1F1B (PipeDream-Flush, Narayanan et al., 2021; Megatron-LM's default) runs ``p - s - 1``
forwards, then alternates one forward and one backward, then drains, so a stage keeps at most ``p - s``
micro-batches' activations instead of M. :func:`timetable` places those operations on a clock of *ticks* (a
stage does at most one operation per tick, and an operation waits for its input from the neighbouring stage at an
earlier tick): its idle ticks are GPipe's bubble, ``(p - 1) / (M + p - 1)``, when a backward costs what a forward
does. The executor keeps each stage's order of operations and nothing else: an operation starts as soon as the
previous one on its stage is done and its input has arrived, so with a backward about twice a forward the stages
are not held in lock-step ticks.

**Transfers.** Horovod has no send or receive. Between stages s and s+1, a 2-rank alltoall on the process set
``[s, s+1]`` moves a tensor one way with ``splits=[0, n]`` / ``[n, 0]`` (zero rows the other way): one transfer
per micro-batch and direction. Each is ordered by its data alone: the sender's when its tensor is computed, the
receiver's at the step's start (it sends nothing); a stage's next operation starts once its send is taken. Inside a
``tf.function`` Horovod's collectives are not stateful ops, so (seen here) TensorFlow can merge two with identical
inputs, fold one with a constant input (constant folding *runs* it once, at graph optimization, instead of once per
call), or prune one whose output is unused, and the peer then waits forever. So every transfer has an explicit name
that both sides share, an input that is distinct and computed in the step (never from static shapes), and its
output is counted into a variable; collectives that must come after the transfers take :meth:`Pipeline.fence`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from hvdtrain.distributed.mesh import Mesh

SCHEDULES = ("gpipe", "1f1b")


def split_stages(plan, stages: int) -> list[list]:
    """The units of each stage: the units no stage is pinned to split into ``stages`` contiguous runs minimising
    the largest stage's parameters; a unit pinned ``first`` (the embedding) goes on the first stage and one pinned
    ``last`` (the head) on the last."""
    units = list(plan.units)
    first = [u for u in units if u.pin == "first"]
    last = [u for u in units if u.pin == "last"]
    middle = [u for u in units if u.pin is None]
    if stages > len(middle):
        raise ValueError(f"{stages} stages need at least {stages} blocks, the model has {len(middle)}")
    sizes = [u.parameters for u in middle]
    head, tail = sum(u.parameters for u in first), sum(u.parameters for u in last)
    best = None
    for cuts in itertools.combinations(range(1, len(middle)), stages - 1):
        bounds = [0, *cuts, len(middle)]
        loads = [sum(sizes[a:b]) for a, b in zip(bounds, bounds[1:])]
        loads[0] += head
        loads[-1] += tail
        key = (max(loads), max(b - a for a, b in zip(bounds, bounds[1:])))
        if best is None or key < best[0]:
            best = (key, bounds)
    bounds = best[1]
    parts = [middle[a:b] for a, b in zip(bounds, bounds[1:])]
    parts[0] = first + parts[0]
    parts[-1] = parts[-1] + last
    return parts


@dataclass(frozen=True)
class Op:
    """One operation of a stage: the forward (``F``) or backward (``B``) pass of a micro-batch."""

    kind: str
    micro: int

    def __repr__(self) -> str:
        return f"{self.kind}{self.micro}"


def stage_ops(schedule: str, stage: int, stages: int, micro: int) -> list[Op]:
    """The order in which ``stage`` runs its forward and backward passes."""
    forward, backward = [Op("F", m) for m in range(micro)], [Op("B", m) for m in range(micro)]
    if schedule == "gpipe":
        return forward + backward
    if schedule != "1f1b":
        raise ValueError(f"unknown pipeline schedule '{schedule}'; use one of {', '.join(SCHEDULES)}")
    warmup = min(stages - stage - 1, micro)
    ops = forward[:warmup]
    for i in range(micro - warmup):
        ops += [forward[warmup + i], backward[i]]
    return ops + backward[micro - warmup:]


def timetable(schedule: str, stages: int, micro: int) -> list[list[Op | None]]:
    """``table[tick][stage]``: what each stage does at each tick (None: idle).

    A forward waits for the previous stage's forward of the same micro-batch at an earlier tick, a backward for
    the next stage's backward (the last stage's for its own forward); each stage follows :func:`stage_ops`.
    """
    orders = [stage_ops(schedule, s, stages, micro) for s in range(stages)]
    done: dict[tuple[str, int, int], int] = {}
    position = [0] * stages
    table = []
    while any(position[s] < len(orders[s]) for s in range(stages)):
        tick = len(table)
        row: list[Op | None] = [None] * stages
        for s in range(stages):
            if position[s] == len(orders[s]):
                continue
            op = orders[s][position[s]]
            if op.kind == "F":
                ready = s == 0 or done.get(("F", s - 1, op.micro), tick) < tick
            else:
                ready = (done.get(("F", s, op.micro), tick) < tick if s == stages - 1
                         else done.get(("B", s + 1, op.micro), tick) < tick)
            if ready:
                row[s] = op
        for s, op in enumerate(row):
            if op is not None:
                done[(op.kind, s, op.micro)] = tick
                position[s] += 1
        table.append(row)
    return table


def describe_split(parts) -> str:
    """One line: each stage's units and parameters."""
    return "; ".join(f"stage {s}: {', '.join(u.name for u in units)} ({sum(u.parameters for u in units):,} parameters)"
                     for s, units in enumerate(parts))


def bubble_fraction(table) -> float:
    """Idle stage-ticks over all stage-ticks of a timetable."""
    cells = [op for row in table for op in row]
    return sum(op is None for op in cells) / len(cells)


def peak_activations(table, stage: int) -> int:
    """The most micro-batches whose forward ``stage`` has run and whose backward it has not, at any tick: the
    activations it must keep."""
    live = peak = 0
    for row in table:
        op = row[stage]
        if op is not None:
            live += 1 if op.kind == "F" else -1
            peak = max(peak, live)
    return peak


class Pipeline:
    """Runs this rank's stage of a schedule inside a training step (all of it in one graph).

    Args:
        module: this stage's part of the model (tokens or activations in; activations or logits out).
        mesh: the rank grid (stage, edges to the neighbouring stages).
        schedule: ``gpipe`` or ``1f1b``.
        micro: micro-batches per step.
        activation_shape: ``(context_length, width)``: what travels between stages per example.
        dtype: the activations' dtype (the compute dtype: bfloat16 activations travel as 2 bytes).
    """

    def __init__(self, module, mesh: Mesh, schedule: str, micro: int, activation_shape: tuple[int, int],
                 dtype=tf.float32):
        self.module, self.mesh, self.schedule, self.micro = module, mesh, schedule, micro
        self.activation_shape = tuple(activation_shape)
        self.dtype = tf.as_dtype(dtype)
        self.stage = mesh.stage
        self._links = []
        with tf.init_scope():
            # every transfer's output is counted here, so that none is pruned (and the bytes can be reported)
            self.sent = tf.Variable(0, dtype=tf.int64, trainable=False, name="pipeline_sent_elements")
            self.received = tf.Variable(0, dtype=tf.int64, trainable=False, name="pipeline_received_elements")
            # start and end time (seconds) of each of this stage's operations in the last step
            self.timings = tf.Variable(np.zeros((2 * micro, 2)), dtype=tf.float64, trainable=False,
                                       name="pipeline_op_timings")
            # over every step so far: seconds this stage was busy, seconds its steps lasted, steps
            self.clock = tf.Variable(np.zeros(3), dtype=tf.float64, trainable=False, name="pipeline_clock")

    # ---- transfers

    def _nothing(self, began, index: int):
        """What the receiving side of a transfer sends: an empty tensor that is computed (its row count is zero
        only at run time, so no static shape lets TensorFlow fold it) and distinct for each transfer (``index``:
        two alltoalls with one input could be merged). It depends on the step's start only, so every receive is
        posted when the step starts and a sender's transfer goes as soon as its tensor is ready."""
        rows = tf.cast(tf.minimum(began, 0.0), tf.int32)
        return tf.cast(tf.ones([rows, *self.activation_shape]) * float(index + 1), self.dtype)

    def _transfer(self, edge, tensor, name: str, nothing):
        """One alltoall on ``edge`` that moves one tensor one way: ``tensor`` when this side sends, ``nothing``
        (see :meth:`_nothing`) when it receives. Returns what arrived (empty on the sending side); its completion
        is ``self._links[-1]``.

        A transfer is ordered by its data alone: the sender's by the tensor it sends, the receiver's by nothing
        (posted at the step's start), so a receive never waits for this stage's own work and no transfer waits for
        an unrelated one (the schedule's order of work is kept by each operation's start, see :meth:`train`)."""
        lower = edge.ranks[0] == self.mesh.rank  # this rank is the edge's earlier stage
        send = tf.cast(tensor, self.dtype) if tensor is not None else nothing
        rows = tf.shape(send)[0]
        splits = tf.stack([0, rows]) if lower else tf.stack([rows, 0])
        got, received = edge.alltoall(send, splits, name=name)
        got = tf.reshape(got, [-1, *self.activation_shape])
        # count what moved from the op's run-time outputs (its static shape would let TensorFlow fold a size):
        # these counts also keep every transfer in the graph (an alltoall whose output is unused is pruned, and
        # its peer waits forever)
        per_row = int(np.prod(self.activation_shape))
        self.sent.assign_add(tf.cast(tf.reduce_sum(splits), tf.int64) * per_row)
        self.received.assign_add(tf.cast(tf.reduce_sum(received), tf.int64) * per_row)
        self._links.append(received)
        return got

    def fence(self):
        """A float32 zero that exists only once every transfer of this call is done: added to the input of a later
        collective (the pipeline's sums, the gradients' allreduces), it orders that collective after them.

        Seen here, inside a ``tf.function``: a transfer whose output was only used through ``tf.size`` (which
        Horovod's static shape makes a constant) or ``0.0 * x`` (which TensorFlow folds) was pruned, and its peer
        waited forever; control dependencies did not survive that folding either. ``min(count of received rows,
        0)`` is zero at run time, but nothing can fold it.
        """
        if not self._links:
            return tf.constant(0.0)
        return tf.minimum(tf.cast(tf.add_n([tf.reduce_sum(r) for r in self._links]), tf.float32), 0.0)

    # ---- one training step

    def train(self, x, y, terms, variables, loss_scale=None):
        """Forward and backward of every micro-batch of ``x``/``y`` in the schedule's order.

        ``terms(labels, logits)`` gives each position's cross-entropy and hit. Returns ``(sums, grads)``: on the
        last stage ``[sum of cross-entropy, hits, positions]`` over the batch (zeros elsewhere; the caller sums
        them over the pipeline, after :meth:`fence`), and this stage's gradients of the batch's mean loss (times
        ``loss_scale`` when given).
        """
        m, s, last = self.micro, self.stage, self.mesh.pipeline - 1
        xs, ys = tf.split(x, m), tf.split(y, m)
        # dropout: one step for every micro-batch; micro-batch i's examples start at i x its size in this
        # replica's part of the global batch
        step, size = self.module.next_step(), tf.shape(x)[0] // m
        first = self.mesh.data_rank * tf.shape(x)[0]
        inputs, outputs, tapes = {}, {}, {}
        grads = [tf.zeros_like(v) for v in variables]
        sums = tf.zeros([3])
        self._links = []
        times = []
        stamp = began = tf.timestamp()
        sent = []  # this stage's last send: the next operation starts once it is taken (see below)
        for op in stage_ops(self.schedule, s, self.mesh.pipeline, m):
            # An operation starts when the previous one is done, its input has arrived and the previous one's
            # output has left: the time between is idle (the bubble), the time inside is busy. Waiting for the send
            # costs one transfer (the peer posted its receive at the step's start); not waiting let the send sit
            # behind this stage's next operation (seen: the peer got micro-batch i's activations only when this
            # stage paused, after i+1 or, under GPipe, after every forward). Transfers: forward activations on
            # edge e are named pp_f{e}_m{i}, backward gradients pp_b{e}_m{i}; both sides of an edge name them alike.
            if op.kind == "F":
                x_in = xs[op.micro] if s == 0 else tf.ensure_shape(
                    self._transfer(self.mesh.prev_edge, None, f"pp_f{s - 1}_m{op.micro}",
                                   self._nothing(began, 2 * op.micro)), [None, *self.activation_shape])
                with tf.control_dependencies([stamp, x_in] + sent):
                    start = tf.timestamp()
                with tf.control_dependencies([start]):
                    x_in = tf.identity(x_in)
                with tf.GradientTape(watch_accessed_variables=False) as tape:
                    tape.watch(variables)
                    if s > 0:
                        tape.watch(x_in)
                    out = self.module(x_in, training=True, offset=first + op.micro * size, step=step)
                    if s == last:
                        ce, hit = terms(ys[op.micro], out)
                        sums += tf.stack([tf.reduce_sum(ce), tf.reduce_sum(hit), tf.cast(tf.size(ce), tf.float32)])
                        out = tf.reduce_mean(ce) / m
                        if loss_scale is not None:
                            out = out * loss_scale
                inputs[op.micro], outputs[op.micro], tapes[op.micro] = x_in, out, tape
                with tf.control_dependencies([out]):
                    stamp = tf.timestamp()
                if s < last:
                    self._transfer(self.mesh.next_edge, out, f"pp_f{s}_m{op.micro}", None)
                    sent = [self._links[-1]]
            else:
                tape = tapes.pop(op.micro)
                upstream = None if s == last else self._transfer(
                    self.mesh.next_edge, None, f"pp_b{s}_m{op.micro}", self._nothing(began, 2 * op.micro + 1))
                with tf.control_dependencies([stamp] + sent + ([upstream] if upstream is not None else [])):
                    start = tf.timestamp()
                if upstream is not None:
                    with tf.control_dependencies([start]):
                        upstream = tf.identity(upstream)
                sources = list(variables) + ([inputs[op.micro]] if s > 0 else [])
                with tf.control_dependencies([start]):
                    got = tape.gradient(outputs.pop(op.micro), sources, output_gradients=upstream)
                grads = [g if d is None else g + tf.cast(d, g.dtype) for g, d in zip(grads, got[: len(variables)])]
                inputs.pop(op.micro)
                with tf.control_dependencies([d for d in got if d is not None] or [start]):
                    stamp = tf.timestamp()
                if s > 0:
                    self._transfer(self.mesh.prev_edge, got[-1], f"pp_b{s - 1}_m{op.micro}", None)
                    sent = [self._links[-1]]
            times.append(tf.stack([start, stamp]))
        ops = tf.stack(times)
        self.timings.assign(ops)
        self.clock.assign_add(tf.stack([tf.reduce_sum(ops[:, 1] - ops[:, 0]), stamp - began,
                                        tf.constant(1.0, tf.float64)]))
        return sums, grads

    # ---- forward only (validation, evaluation)

    def forward_sums(self, x, y, terms):
        """The whole batch through every stage, forward only: ``[sum of cross-entropy, hits, positions]`` on the
        last stage, zeros elsewhere (after this call's transfers: see :meth:`fence`)."""
        s, last = self.stage, self.mesh.pipeline - 1
        self._links = []
        h = x
        if s > 0:
            h = tf.ensure_shape(self._transfer(self.mesh.prev_edge, None, f"pp_fwd_e{s - 1}",
                                               self._nothing(tf.timestamp(), 0)), [None, *self.activation_shape])
        out = self.module(h, training=False)
        if s < last:
            self._transfer(self.mesh.next_edge, out, f"pp_fwd_e{s}", None)
            return tf.zeros([3]) + self.fence()
        ce, hit = terms(y, out)
        return tf.stack([tf.reduce_sum(ce), tf.reduce_sum(hit), tf.cast(tf.size(ce), tf.float32)])
