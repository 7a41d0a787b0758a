"""mixed_float16 at N ranks: gradients overflow on rank 1 only; every rank must skip that step alike.

Reports, per rank: weights and loss scale before and after a normal step and after the overflowing step.
"""
import sys

import common
import numpy as np
import tensorflow as tf

import hvdtrain
import models
from hvdtrain import distributed

outdir = sys.argv[1]
accumulate = int(sys.argv[2]) if len(sys.argv) > 2 else 1
hvdtrain.init()
rank = hvdtrain.rank()
tf.keras.mixed_precision.set_global_policy("mixed_float16")
tf.keras.utils.set_random_seed(7)
model = models.build("mlp", input_shape=(8, 8, 1), num_classes=10, dropout=0.0)
optimizer = hvdtrain.wrap_optimizer(tf.keras.optimizers.SGD(0.1), precision="mixed_float16",
                                    backward_passes_per_step=accumulate)
model.compile(optimizer, tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
distributed.broadcast_variables(model.variables)

rng = np.random.default_rng(rank)
x = rng.random((16, 8, 8, 1), dtype=np.float32)
y = np.arange(16) % 10


def weights():
    return np.concatenate([w.numpy().astype(np.float64).ravel() for w in model.trainable_weights])


def scale():
    return float(model.optimizer.loss_scale.numpy()) if hasattr(model.optimizer, "loss_scale") else None


start, scale0 = weights(), scale()
for _ in range(accumulate):
    model.train_on_batch(x, y)
after_normal, scale1 = weights(), scale()
# Rank 1 alone feeds inputs so large that its float16 gradients overflow to inf.
bad = x * (6e4 if rank == 1 else 1.0)
for _ in range(accumulate):
    model.train_on_batch(bad, y)
after_overflow, scale2 = weights(), scale()
common.report(outdir, rank, start=start.tolist(), after_normal=after_normal.tolist(),
              after_overflow=after_overflow.tolist(), scales=[scale0, scale1, scale2],
              wrapper=type(model.optimizer).__name__)
