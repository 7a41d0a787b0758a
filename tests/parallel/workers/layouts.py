"""Train a small gpt for a few steps at a parallel layout, and (rank 0) the same model in one process on the same
global batches; report both full weights and what each rank held.

Usage: layouts.py OUTDIR KEY=VALUE... (parallel.* and train.* overrides). Negative controls: ``negative=g`` writes
Megatron's g as a plain Horovod allreduce (whose registered gradient sums over the group); ``negative=drop_grad``
loses the gradient a pipeline stage sends back to the previous one.
"""
import sys

import common
import numpy as np
import tensorflow as tf

from hvdtrain import config, data, distributed, parallel, runtime
from hvdtrain.distributed import tensor

outdir, args = sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:])
negative = args.pop("negative", "")
steps = int(args.pop("steps", "3"))
if negative == "g":
    tensor.reduce_from_group = lambda x, group: group.allreduce(x, "sum")  # Horovod's own gradient: a sum
if negative == "drop_grad":
    from hvdtrain.distributed import pipeline

    exchange = pipeline.Pipeline._exchange
    pipeline.Pipeline._exchange = lambda self, edge, fwd, bwd, name, like: exchange(
        self, edge, fwd, None if bwd is None else bwd * 0.0, name, like)

layers = args.pop("layers", "2")
SMALL = ["data.context_length=16", "data.batch_size_per_rank=8", f"model.params={{num_layers: {layers}, width: 32, "
         "num_heads: 4, mlp_ratio: 4, dropout: 0.0}", "train.optimizer=adam"]
cfg = config.load("gpt-tiny", overrides=[*SMALL, *(f"{k}={v}" for k, v in args.items())])
runtime.init(cfg)
mesh = runtime.make_mesh(cfg)
source = data.load(cfg.data, seed=0, model_name="gpt")
per_replica = cfg.data.batch_size_per_rank
global_batch = per_replica * mesh.data
x_all, y_all = source.x_train[: steps * global_batch], source.y_train[: steps * global_batch]
# step i: the global batch is rows [i*G, (i+1)*G); replica d takes its slice of it
mine = np.concatenate([np.arange(i * global_batch + mesh.data_rank * per_replica,
                                 i * global_batch + (mesh.data_rank + 1) * per_replica) for i in range(steps)])
dataset = tf.data.Dataset.from_tensor_slices((x_all[mine], y_all[mine])).batch(per_replica)

lr = 1e-3
tf.keras.utils.set_random_seed(0)
layout = parallel.make_layout(cfg, runtime.build_model(cfg.model, source), mesh)
model = runtime.prepare(layout.training_model, cfg, lr, layout=layout)
model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
layout.gather()
memory = layout.memory()

result = {"global_rank": mesh.rank, "stage": mesh.stage, "tensor_rank": mesh.tensor_rank, "data_rank": mesh.data_rank,
          "memory": memory, "loss": float(model.history.history["loss"][-1]),
          "module_variables": [v.name for v in layout.variables]}
if layout.pipeline is not None:
    result["sent"] = int(layout.pipeline.sent.numpy())
    result["received"] = int(layout.pipeline.received.numpy())
    result["timings"] = layout.pipeline.timings.numpy().tolist()
if mesh.rank == 0:
    full = layout.full_model()
    result["parallel"] = [w.ravel().tolist() for w in full.get_weights()]
    result["names"] = [v.name for v in full.weights]
    # the reference: the same model, one process, plain Keras, the whole global batch per step
    tf.keras.utils.set_random_seed(0)
    reference = runtime.build_model(cfg.model, source)
    result["initial"] = [w.ravel().tolist() for w in reference.get_weights()]
    reference.compile(runtime.make_optimizer(cfg.train, lr),
                      tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    reference.fit(tf.data.Dataset.from_tensor_slices((x_all, y_all)).batch(global_batch), epochs=1,
                  steps_per_epoch=steps, verbose=0)
    result["reference"] = [w.ravel().tolist() for w in reference.get_weights()]
    result["reference_optimizer_bytes"] = parallel.variable_bytes(
        [v for v in reference.optimizer.variables if v is not reference.optimizer.iterations])
    result["reference_param_bytes"] = parallel.variable_bytes(reference.trainable_variables)
distributed.barrier()
common.report(outdir, mesh.rank, **result)
