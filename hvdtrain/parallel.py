"""How a model is laid out over the ranks, and how each layout trains, checkpoints and saves.

- :class:`DataParallel` (the default): every rank holds the whole model; Horovod's ``DistributedOptimizer``
  averages gradients over all ranks.
- :class:`Parallel` (``parallel.tensor``, ``parallel.pipeline``, ``parallel.shard_optimizer``,
  ``parallel.recompute``): each rank holds its part of the model (:mod:`hvdtrain.distributed.tensor`), its stage
  (:mod:`hvdtrain.distributed.pipeline`), its slice of the optimizer state (:mod:`hvdtrain.distributed.zero`);
  :class:`ParallelTrainer` is the Keras model that ``fit`` trains.

Both offer the run the same interface, so a run is the same run whatever the layout: the model to fit, where this
rank's data comes from, the variables that must stay identical and across which ranks (for the divergence guard),
and the full model, gathered on the chief, for checkpoints and ``model.keras``. Checkpoints of every layout hold
the full, unsharded model and optimizer state in the one-process format, so a run resumes at another layout.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from hvdtrain import distributed
from hvdtrain.checkpoint import inner_optimizer
from hvdtrain.distributed.mesh import Group, Mesh


def variable_bytes(variables) -> int:
    """Bytes held by ``variables``."""
    return int(sum(int(np.prod(v.shape)) * v.dtype.size for v in variables))


def slots_of(optimizer, variables) -> list[list[tf.Variable]]:
    """The optimizer's state per slot kind, each a list aligned with ``variables`` (Keras keeps, after the step
    count, every variable's slots one after the other: ``m0, v0, m1, v1, ...``)."""
    opt = inner_optimizer(optimizer)
    slots = [v for v in opt.variables if v is not opt.iterations]
    if not variables:
        return []
    kinds = len(slots) // len(variables)
    return [[slots[i * kinds + k] for i in range(len(variables))] for k in range(kinds)]


class DataParallel:
    """Every rank holds the whole model; gradients are averaged over all ranks by Horovod's optimizer."""

    needs_gather = False

    def __init__(self, model, mesh: Mesh):
        self.model, self.mesh = model, mesh
        self.training_model = model

    @property
    def data_rank(self) -> int:
        """This rank's data shard (its rank: in elastic runs the world changes)."""
        return distributed.rank()

    @property
    def data_size(self) -> int:
        """Number of data shards: every rank."""
        return distributed.size()

    counted = True  # every rank's evaluation counts

    def gather(self) -> None:
        """Make the full model current on the chief (nothing to do: every rank holds it)."""

    def full_model(self):
        """The whole model (on the chief, after :meth:`gather`)."""
        return self.model

    def checkpoint_objects(self):
        """What a checkpoint saves and restores on the chief: ``(model, optimizer)``."""
        return self.model, self.model.optimizer

    def build_optimizer(self) -> None:
        """Create the optimizer state now (it exists only after a first step otherwise)."""
        inner_optimizer(self.model.optimizer).build(self.model.trainable_variables)

    def distribute_restored(self) -> None:
        """Give every rank the state the chief restored (a collective)."""
        if distributed.size() > 1:
            distributed.broadcast_variables(self.model.variables + list(self.model.optimizer.variables))

    def consistency_groups(self) -> list[tuple[list, Group | None]]:
        """Variables that must be identical, and over which ranks (None: all of them)."""
        return [(self.model.trainable_variables, None)]

    def broadcast_callback(self):
        """The callback that gives every rank rank 0's initial state."""
        return distributed.broadcast_callback(0)

    def memory(self) -> dict[str, int]:
        """Bytes of parameters and optimizer state on this rank."""
        opt = inner_optimizer(self.model.optimizer)
        params = variable_bytes(self.model.trainable_variables)
        return {"param_bytes_full": params, "param_bytes_per_rank": params,
                "optimizer_bytes_per_rank": variable_bytes([v for v in opt.variables if v is not opt.iterations])}


class Parallel:
    """The model split over the mesh: tensor-parallel blocks, pipeline stages, sharded optimizer state.

    Args:
        cfg: the run's config (``parallel`` and ``train`` sections are read).
        full: the one-process model, built by :func:`models.build` on every rank with the same seed; each rank
            keeps its part (the chief keeps ``full`` itself, to gather into).
        mesh: the rank grid.
    """

    needs_gather = True

    def __init__(self, cfg, full, mesh: Mesh):
        from hvdtrain.distributed import tensor

        self.cfg, self.mesh = cfg, mesh
        p = cfg.parallel
        self.full_names = [v.name for v in full.trainable_variables]
        self.full_bytes = variable_bytes(full.trainable_variables)
        self.stage_layers = self.split = self.pipeline = None
        if p.pipeline > 1:
            from hvdtrain.distributed import pipeline

            self.split = pipeline.split_stages(full, p.pipeline)
            self.split_description = pipeline.describe_split(full, self.split)
            self.stage_layers = self.split[mesh.stage]
        if p.tensor > 1 or p.pipeline > 1 or p.recompute:
            self.module, self.shards = tensor.parallelize_gpt(full, mesh.tensor_group, p.recompute,
                                                              self.stage_layers)
        else:  # sharded optimizer states only: the model itself
            self.module, self.shards = full, [tensor.Shard(v.name, None) for v in full.trainable_variables]
        self.variables = self.module.trainable_variables
        if p.pipeline > 1:
            from hvdtrain.distributed.pipeline import Pipeline

            width = full.get_layer("embed").width
            self.pipeline = Pipeline(self.module, mesh, p.schedule, p.microbatches, (full.input_shape[1], width))
            self.pipeline.last_width = full.output_shape[-1]
        self.full = full if mesh.rank == 0 else None  # the chief gathers into it
        self.full_optimizer = None
        self.training_model = ParallelTrainer(self)
        self.zero = None

    data_rank = property(lambda self: self.mesh.data_rank)
    data_size = property(lambda self: self.mesh.data)

    @property
    def counted(self) -> bool:
        """Whether this rank's evaluation counts: one shard of a tensor group, on the stage that has the logits."""
        return self.mesh.tensor_rank == 0 and self.mesh.is_last_stage

    def attach_optimizer(self, optimizer) -> None:
        """Build the optimizer's state for this rank's variables (a slice of them with ``shard_optimizer``)."""
        if self.cfg.parallel.shard_optimizer:
            from hvdtrain.distributed.zero import ShardedOptimizer

            self.zero = ShardedOptimizer(optimizer, self.variables, self.mesh.data_group)
        else:
            optimizer.build(self.variables)

    def build_optimizer(self) -> None:
        """The optimizer state exists from :meth:`attach_optimizer` on."""

    # ---- the full state, for checkpoints and model.keras

    def _slot_arrays(self) -> list[list[np.ndarray]]:
        if self.zero is not None:
            return self.zero.gather_slots()  # a collective over the data group
        return [[s.numpy() for s in kind] for kind in slots_of(self.training_model.optimizer, self.variables)]

    def gather(self) -> None:
        """Assemble the full model and optimizer state on the chief (a collective on every rank)."""
        slots = self._slot_arrays()
        if self.mesh.data_rank != 0:
            return  # replicas hold copies of replica 0's values
        values = [v.numpy() for v in self.variables]
        arrays = [values, *slots]  # [kind][variable]
        if self.mesh.tensor > 1:
            sharded = [i for i, s in enumerate(self.shards) if s.axis is not None]
            parts = self.mesh.tensor_group.allgather_object([[a[i] for i in sharded] for a in arrays])
            for k, kind in enumerate(arrays):
                for j, i in enumerate(sharded):
                    kind[i] = np.concatenate([member[k][j] for member in parts], axis=self.shards[i].axis)
        stage = {s.name: [kind[i] for kind in arrays] for i, s in enumerate(self.shards)}
        if self.mesh.pipeline > 1:
            if self.mesh.rank == 0:
                for link in self.mesh.chief_links:
                    stage.update(link.broadcast_object(None, root=link.ranks[1]))
            elif self.mesh.chief_link is not None:
                self.mesh.chief_link.broadcast_object(stage, root=self.mesh.rank)
        if self.mesh.rank == 0:
            self._assign_full(stage)

    def _full_optimizer(self):
        if self.full_optimizer is None:  # the training optimizer's kind and settings, over the full model
            opt = inner_optimizer(self.training_model.optimizer)
            self.full_optimizer = type(opt).from_config(opt.get_config())
            self.full_optimizer.build(self.full.trainable_variables)
        return self.full_optimizer

    def _assign_full(self, by_name: dict) -> None:
        opt = self._full_optimizer()
        kinds = slots_of(opt, self.full.trainable_variables)
        for i, var in enumerate(self.full.trainable_variables):
            value, *slot_values = by_name[var.name]
            var.assign(value)
            for kind, slot_value in zip(kinds, slot_values):
                kind[i].assign(slot_value)
        opt.iterations.assign(self.training_model.optimizer.iterations)

    def full_model(self):
        """The whole model on the chief (after :meth:`gather`); None elsewhere."""
        return self.full

    def checkpoint_objects(self):
        """On the chief: the full model and an optimizer with the full state, in the one-process format."""
        return self.full, self._full_optimizer()

    def distribute_restored(self) -> None:
        """Cut the chief's restored full state into every rank's part (a collective on every rank)."""
        by_name = None
        if self.mesh.rank == 0:
            opt = self.full_optimizer
            kinds = slots_of(opt, self.full.trainable_variables)
            by_name = {v.name: [v.numpy(), *(kind[i].numpy() for kind in kinds)]
                       for i, v in enumerate(self.full.trainable_variables)}
            by_name["__iterations__"] = int(opt.iterations.numpy())
            stages = self._stage_names()
            for link, names in zip(self.mesh.chief_links, stages[1:]):
                link.broadcast_object({n: by_name[n] for n in [*names, "__iterations__"]}, root=0)
            by_name = {n: by_name[n] for n in [*stages[0], "__iterations__"]}
        elif self.mesh.chief_link is not None:
            by_name = self.mesh.chief_link.broadcast_object(None, root=self.mesh.chief_link.ranks[0])
        by_name = self.mesh.stage_group.broadcast_object(by_name)
        tp, me = self.mesh.tensor, self.mesh.tensor_rank
        from hvdtrain.distributed.tensor import split

        local = [[split(a, tp, me, s.axis) for a in by_name[s.name]] for s in self.shards]
        for var, arrays in zip(self.variables, local):
            var.assign(arrays[0])
        slot_arrays = [[arrays[1 + k] for arrays in local] for k in range(len(local[0]) - 1)] if local else []
        if self.zero is not None:
            self.zero.load_slots(slot_arrays)
            self.zero.resync()
        else:
            for kind, values in zip(slots_of(self.training_model.optimizer, self.variables), slot_arrays):
                for slot, value in zip(kind, values):
                    slot.assign(value)
        self.training_model.optimizer.iterations.assign(by_name["__iterations__"])

    def _stage_names(self) -> list[list[str]]:
        """The full variable names each stage holds (on the chief, which has the full model)."""
        if self.mesh.pipeline == 1:
            return [self.full_names]
        owner = {}
        for s, names in enumerate(self.split):
            for layer in names:
                for v in self.full.get_layer(layer).trainable_variables:
                    owner[v.name] = s
        return [[n for n in self.full_names if owner[n] == s] for s in range(self.mesh.pipeline)]

    # ---- what the run asks of every layout

    def consistency_groups(self) -> list[tuple[list, Group]]:
        """Replicated variables must be identical over the stage; shards over their replicas."""
        replicated = [v for v, s in zip(self.variables, self.shards) if s.axis is None]
        sharded = [v for v, s in zip(self.variables, self.shards) if s.axis is not None]
        groups = [(replicated, self.mesh.stage_group)]
        if sharded:
            groups.append((sharded, self.mesh.data_group))
        return groups

    def broadcast_callback(self):
        """Replica 0's initial state to the other replicas of each shard, after the first batch."""
        return _BroadcastReplicas(self)

    def memory(self) -> dict[str, int]:
        """Bytes of parameters (and of their sharded part) and of optimizer state on this rank."""
        opt_vars = (self.zero.slot_variables() if self.zero is not None else
                    [v for kind in slots_of(self.training_model.optimizer, self.variables) for v in kind])
        return {
            "param_bytes_full": self.full_bytes,
            "param_bytes_per_rank": variable_bytes(self.variables),
            "sharded_param_bytes_per_rank": variable_bytes([v for v, s in zip(self.variables, self.shards)
                                                            if s.axis is not None]),
            "optimizer_bytes_per_rank": variable_bytes(opt_vars),
        }


class _BroadcastReplicas(tf.keras.callbacks.Callback):
    """After the first batch, every replica of a shard takes replica 0's values (a collective on the data group)."""

    def __init__(self, layout: Parallel):
        super().__init__()
        self.layout, self.done = layout, False

    def on_train_batch_end(self, batch, logs=None):
        if self.done:
            return
        self.done = True
        group = self.layout.mesh.data_group
        group.broadcast_variables(self.layout.variables)
        if self.layout.zero is not None:
            self.layout.zero.resync()
        else:
            group.broadcast_variables([v for kind in slots_of(self.model.optimizer, self.layout.variables)
                                       for v in kind])


class ParallelTrainer(tf.keras.Model):
    """The Keras model that ``fit`` trains for a :class:`Parallel` layout.

    One step: forward and backward through this rank's part (the tensor-parallel collectives run inside the
    layers; a pipeline runs its schedule), the gradients averaged over the data-parallel group (or reduce-scattered
    to the optimizer slices), one optimizer step. The loss and accuracy it reports are those of the replica's whole
    batch, the same on every rank of the replica.
    """

    def __init__(self, layout: Parallel):
        super().__init__(name="parallel_trainer")
        self.layout, self.module = layout, layout.module
        self.loss_tracker = tf.keras.metrics.Mean(name="loss")
        self.accuracy_tracker = tf.keras.metrics.Mean(name="accuracy")

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker]

    def compile(self, optimizer, **kwargs):
        super().compile(optimizer=optimizer, **kwargs)
        self.layout.attach_optimizer(optimizer)

    def call(self, x, training=False):
        if self.layout.pipeline is not None:  # logits on the last stage, zeros on the others
            return self.layout.pipeline.forward(x)
        return self.module(x, training=training)

    @staticmethod
    def _loss_and_accuracy(y, logits):
        ce = tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        hit = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), tf.cast(y, tf.int32)), tf.float32)
        return tf.reduce_mean(ce), tf.reduce_mean(hit)

    def _over_pipeline(self, loss, accuracy):
        """The last stage's numbers on every stage (the others contribute zeros), after the pipeline's transfers
        (see :meth:`hvdtrain.distributed.pipeline.Pipeline.fence`)."""
        if self.layout.pipeline is None:
            return loss, accuracy
        both = tf.stack([loss, accuracy]) + self.layout.pipeline.fence()
        both = self.layout.mesh.pipeline_group.allreduce(both, "sum", name="pp_metrics")
        return both[0], both[1]

    def train_step(self, data):
        x, y = data
        variables = self.layout.variables
        if self.layout.pipeline is not None:
            loss, accuracy, grads = self.layout.pipeline.train(x, y, self._loss_and_accuracy, variables)
            loss, accuracy = self._over_pipeline(loss, accuracy)
            # the gradients' collectives after the pipeline's, on every rank (a data dependency: see fence())
            after = tf.minimum(tf.abs(loss), 0.0)
            grads = [g + after for g in grads]
        else:
            with tf.GradientTape() as tape:
                logits = self.module(x, training=True)
                loss, accuracy = self._loss_and_accuracy(y, logits)
            grads = tape.gradient(loss, variables)
        self._apply(grads)
        self.loss_tracker.update_state(loss)
        self.accuracy_tracker.update_state(accuracy)
        return {m.name: m.result() for m in self.metrics}

    def _apply(self, grads) -> None:
        if self.layout.zero is not None:
            self.layout.zero.apply_gradients(grads)
            return
        grads = self.layout.mesh.data_group.grouped_allreduce(
            [tf.zeros_like(v) if g is None else g for g, v in zip(grads, self.layout.variables)], "average")
        self.optimizer.apply_gradients(zip(grads, self.layout.variables))

    def test_step(self, data):
        x, y = data
        logits = self(x, training=False)
        loss, accuracy = self._loss_and_accuracy(y, logits)
        if self.layout.pipeline is not None and not self.layout.mesh.is_last_stage:
            loss, accuracy = loss * 0.0, accuracy * 0.0
        loss, accuracy = self._over_pipeline(loss, accuracy)
        self.loss_tracker.update_state(loss)
        self.accuracy_tracker.update_state(accuracy)
        return {m.name: m.result() for m in self.metrics}


def make_layout(cfg, model, mesh: Mesh):
    """The layout ``cfg.parallel`` asks for, around ``model`` (the full, one-process model)."""
    p = cfg.parallel
    if p.tensor > 1 or p.pipeline > 1 or p.recompute or p.shard_optimizer:
        return Parallel(cfg, model, mesh)
    return DataParallel(model, mesh)
