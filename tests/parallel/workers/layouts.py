"""Train a small gpt for a few steps at a parallel layout, several cases per launch (one mesh), then the same
models in one process with plain Keras on the same global batches (the distinct ones shared out over the ranks);
report the weights of both and what each rank held.

Usage: layouts.py OUTDIR CASES
  CASES   name:key=value&key=value;name2:...   parallel.* (the layout), train.* and model.* overrides per case,
          and negative=...:
          g (Megatron's g written as a plain Horovod allreduce, whose registered gradient sums over the group),
          drop_grad (a pipeline stage loses the gradient it sends back), ce_g (the vocabulary-parallel loss sums
          its normalizer with a plain allreduce), clip_twice (replicated weights counted on every tensor rank in the
          gradient norm), reference_fp32 (the one-process reference trains in float32), zero_sum (ZeRO's
          reduce-scatter sums where it averages), local_masks (each tensor member draws the dropout mask of split
          activations as if it held them whole), ordered_receives (every pipeline receive waits for the stage's
          earlier transfers, as before transfers were ordered by their data: values unchanged, the graph check
          below sees it; combined with drop_grad in one case), sequence_unsummed (with sequence parallelism, the
          gradients of the replicated weights that saw a member's positions only are not summed over the group),
          stale_gather (sharded parameters: every step computes with the weights gathered at the first, while
          the gradients still reach the slices), unreplicated (hybrid sharding: the slices' gradients are not
          averaged across the shard groups).

The parallel run's weights are read back from the sharded checkpoint it writes (every rank its part), through
the same reader a resumed run uses. Each rank writes rank{r}.json: {case: {...}}. Cases at different layouts share
the launch (the meshes of one world size use the same process sets).
"""
import dataclasses
import re
import sys
import time
from pathlib import Path

import common
import numpy as np
import tensorflow as tf

from hvdtrain import config, data, distributed, runtime
from hvdtrain.formats import checkpoint
from hvdtrain.distributed import fsdp, pipeline, sharded, tensor
from hvdtrain.distributed.mesh import Group, Traffic
from hvdtrain.rundir import RunDir

outdir = Path(sys.argv[1])
cases = [c.split(":", 1) for c in sys.argv[2].split(";") if c]
steps = 3
SMALL = ["data.context_length=16", "data.batch_size_per_rank=8",
         "model.params={num_layers: 2, width: 32, num_heads: 4, mlp_ratio: 4, dropout: 0.0}", "train.optimizer=adam",
         "train.learning_rate=0.001", "train.warmup_epochs=0", "train.schedule=constant", "train.lr_scaling=none",
         "data.path=" + str(outdir / "corpus.txt")]

original = {"g": tensor.reduce_from_group, "transfer": pipeline.Pipeline._transfer, "ctx": tensor.TensorContext,
            "reducescatter": Group.reducescatter, "nothing": pipeline.Pipeline._nothing, "gather": fsdp.gather,
            "grouped_allreduce": Group.grouped_allreduce}
TRANSFER = re.compile(r"pp_[fb]\d+_m\d+")


def negative(kinds: str) -> None:
    """Put every operator back, then break those named (``+``-separated)."""
    tensor.reduce_from_group = original["g"]
    pipeline.Pipeline._transfer = original["transfer"]
    pipeline.Pipeline._nothing = original["nothing"]
    Group.reducescatter = original["reducescatter"]
    fsdp.gather = original["gather"]
    Group.grouped_allreduce = original["grouped_allreduce"]
    tensor.TensorContext = sharded.TensorContext = original["ctx"]
    for kind in kinds.split("+"):
        break_(kind)


def break_(kind: str) -> None:
    """Break one operator (the kinds in this module's docstring; others are handled where they act)."""
    if kind == "zero_sum":
        Group.reducescatter = lambda self, t, op="average", name=None: original["reducescatter"](self, t, "sum", name)
    elif kind == "stale_gather":
        def stale(variable, group, flat, dtype, scattered=None):
            live = original["gather"](variable, group, flat, dtype, scattered)
            with tf.init_scope():  # run once, when the step is traced: the weights of the first step
                first = original["gather"](variable, group, flat, dtype)
            return first + (live - tf.stop_gradient(live))

        fsdp.gather = stale
    elif kind == "unreplicated":  # hybrid sharding without the slices' gradients averaged across the shard groups
        def unreplicated(self, tensors, op="average", name=None):
            if name == "replicate_gradients":
                return list(tensors)
            return original["grouped_allreduce"](self, tensors, op, name)

        Group.grouped_allreduce = unreplicated
    elif kind == "g":
        tensor.reduce_from_group = lambda x, group: group.allreduce(x, "sum")
    elif kind == "ordered_receives":
        # the step's start plus a zero that exists once the stage's earlier transfers are done (GPipe only: under
        # 1F1B a receive would wait for a send that waits for it)
        pipeline.Pipeline._nothing = lambda self, began, index: original["nothing"](
            self, began + tf.cast(self.fence(), tf.float64), index)
    elif kind == "drop_grad":
        pipeline.Pipeline._transfer = lambda self, edge, t, name, nothing: original["transfer"](
            self, edge, t if t is None or not name.startswith("pp_b") else t * 0.0, name, nothing)
    elif kind == "ce_g":  # the normalizer of the softmax through a plain allreduce: its gradient sums over the group
        class Plain(tensor.TensorContext):
            def exit(self, x):
                return self.group.allreduce(x, "sum") if self.size > 1 else x

        tensor.TensorContext = Plain
    elif kind == "local_masks":
        class Local(tensor.TensorContext):
            def dropout(self, x, rate, site, split_axis=None):
                return super().dropout(x, rate, site, None)

        tensor.TensorContext = sharded.TensorContext = Local


def transfer_waits(model) -> dict[str, list[str]]:
    """For each pipeline transfer in the traced train step (its alltoall, named pp_f{edge}_m{i} or pp_b{edge}_m{i}),
    the other transfers it waits for: those among its ancestors through data or control edges."""
    (function,) = model.train_function._list_all_concrete_functions()
    ops = function.graph.get_operations()
    transfers = {op: TRANSFER.search(op.name).group(0) for op in ops
                 if op.type == "HorovodAlltoall" and TRANSFER.search(op.name)}
    waits = {}
    for op, name in transfers.items():
        seen, todo = set(), [i.op for i in op.inputs] + list(op.control_inputs)
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo += [i.op for i in node.inputs] + list(node.control_inputs)
        waits[name] = sorted(transfers[a] for a in seen if a in transfers)
    return waits


results = {}
pending = {}  # one reference per distinct one-process run (negative controls share their case's): key -> its cases
mesh = None
for name, settings in cases:
    began, before = time.perf_counter(), Traffic.snapshot()
    overrides = dict(kv.split("=", 1) for kv in settings.split("&") if kv) if settings else {}
    kind = overrides.pop("negative", "")
    cfg = config.load("gpt-tiny", overrides=[*SMALL, *(f"{k}={v}" for k, v in overrides.items())])
    if mesh is None:
        runtime.init(cfg, dynamic_process_sets=True)
    mesh = runtime.make_mesh(cfg)
    negative(kind)
    tf.keras.mixed_precision.set_global_policy(cfg.train.precision)
    source = data.load(cfg.data, seed=0, model_name=cfg.model.name)
    per_replica, global_batch = cfg.data.batch_size_per_rank, cfg.data.batch_size_per_rank * mesh.data
    layout = runtime.make_layout(cfg, source, mesh)
    if kind == "clip_twice":  # every tensor rank counts the replicated weights in the norm
        layout.entries[:] = [dataclasses.replace(e, counted=True) for e in layout.entries]
    if kind == "sequence_unsummed":
        layout.module.partial[:] = []
    model = runtime.prepare(layout.training_model, cfg, cfg.train.learning_rate, layout=layout)
    ds = source.train_dataset(mesh.data_rank, mesh.data, per_replica, cfg.train.seed, 0)
    cbs = [c for c in [layout.broadcast_callback()] if c is not None]
    model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=cbs)
    run = outdir / "runs" / name
    if distributed.rank() == 0:
        run.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    chief = RunDir(run) if distributed.rank() == 0 else None
    if layout.collective_checkpoint or chief is not None:
        checkpoint.save(str(run), chief, 1, layout, {"metrics": []}, distributed.rank())
    distributed.barrier()
    result = {"global_rank": mesh.rank, "stage": mesh.stage, "tensor_rank": mesh.tensor_rank,
              "data_rank": mesh.data_rank, "memory": layout.memory(),
              "loss": float(model.history.history["loss"][-1]),
              "traces": model.train_function.experimental_get_tracing_count(),
              "module_variables": [e.name for e in getattr(layout, "entries", [])],
              "traffic": {k: {n: v[n] - before.get(k, {}).get(n, 0) for n in v}
                          for k, v in Traffic.snapshot().items()}}  # this case's collectives, counted in the graph
    if getattr(layout, "pipeline", None) is not None:
        result["sent"] = int(layout.pipeline.sent.numpy())
        result["received"] = int(layout.pipeline.received.numpy())
        result["busy_seconds"] = float(np.sum(np.diff(layout.pipeline.timings.numpy(), axis=1)))
        result["transfer_waits"] = transfer_waits(model)
    plan = runtime.model_plan(cfg.model, source)
    if mesh.rank == 0:
        reader = checkpoint.Reader(checkpoint.latest(str(run)))
        result["parallel"] = [reader.read(w.name).ravel().tolist() for w in plan.weights]
        result["reference_param_bytes"] = 4 * plan.parameters
        result["names"] = [w.name for w in plan.weights]
    # the one-process run depends on neither the layout nor the distributed settings, and its precision is its own
    reference_precision = "float32" if kind == "reference_fp32" else cfg.train.precision
    same = dataclasses.replace(cfg, parallel=config.ParallelConfig(), distributed=config.DistributedConfig(),
                               train=dataclasses.replace(cfg.train, precision=reference_precision))
    pending.setdefault((config.to_yaml(same), global_batch), (same, global_batch, []))[2].append(name)
    result["seconds"] = time.perf_counter() - began
    results[name] = result

# The references: the same models in one process, plain Keras, the whole global batch per step; the distinct ones
# shared out over the ranks (each trains its share while the others train theirs), then gathered on rank 0.
negative("")
mine = {}
for i, (same, global_batch, names) in enumerate(pending.values()):
    if i % distributed.size() != distributed.rank():
        continue
    from models.plan import initialize, keras_variables

    tf.keras.mixed_precision.set_global_policy(same.train.precision)
    source = data.load(same.data, seed=0, model_name=same.model.name)
    plan = runtime.model_plan(same.model, source)
    reference = runtime.build_model(same.model, source)
    initialize(reference, plan, same.train.seed)
    variables = keras_variables(reference, plan)
    initial = [variables[w.name].numpy().ravel().tolist() for w in plan.weights]
    optimizer = runtime.make_optimizer(same.train, same.train.learning_rate)
    if same.train.precision == "mixed_float16":
        optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
    reference.compile(optimizer, tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    checkpoint.build_optimizer(optimizer, reference.trainable_variables)  # one trace of the step, not two (-30%)
    reference.fit(source.train_dataset(0, 1, global_batch, same.train.seed, 0), epochs=1, steps_per_epoch=steps,
                  verbose=0)
    trained = [variables[w.name].numpy().ravel().tolist() for w in plan.weights]
    mine.update({n: (initial, trained) for n in names})
gathered = distributed.allgather_object(mine)
if distributed.rank() == 0:
    for part in gathered:
        for n, (initial, trained) in part.items():
            results[n]["initial"], results[n]["reference"] = initial, trained
common.report(outdir, distributed.rank(), **results)
