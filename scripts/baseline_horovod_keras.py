"""The canonical Horovod + Keras pattern, for `hvdtrain benchmark --compare-baseline`.

Written the way Horovod's own Keras examples are (examples/tensorflow2/tensorflow2_keras_mnist.py): hvd.init,
pin threads, scale the learning rate by hvd.size(), hvd.DistributedOptimizer, BroadcastGlobalVariablesCallback and
MetricAverageCallback, a ModelCheckpoint on rank 0, a repeated tf.data pipeline per rank, plain model.fit. Same
model, data, batch and epochs as
the hvdtrain run it is compared with; it reports the median examples/s over epochs after the first.

This file imports Horovod directly on purpose: it *is* the hand-written boilerplate hvdtrain replaces.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import horovod.tensorflow.keras as hvd  # noqa: E402
import tensorflow as tf  # noqa: E402

import models  # noqa: E402
from hvdtrain.data import digits  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="cnn")
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--batch-size-per-rank", type=int, default=32)
parser.add_argument("--learning-rate", type=float, default=0.001)
parser.add_argument("--result", required=True)
parser.add_argument("--checkpoint-dir", required=True)
args = parser.parse_args()

hvd.init()
tf.config.threading.set_intra_op_parallelism_threads(max(1, len(os.sched_getaffinity(0)) // hvd.local_size()))

data = digits.load(test_fraction=0.2, validation_fraction=0.0)
n = len(data.x_train) // hvd.size()
dataset = (tf.data.Dataset.from_tensor_slices((data.x_train, data.y_train)).shard(hvd.size(), hvd.rank())
           .repeat().shuffle(10000).batch(args.batch_size_per_rank))
steps = n // args.batch_size_per_rank

model = models.build(args.model, input_shape=(8, 8, 1), num_classes=10)
opt = hvd.DistributedOptimizer(tf.keras.optimizers.Adam(args.learning_rate * hvd.size()))
model.compile(loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), optimizer=opt,
              metrics=["accuracy"], experimental_run_tf_function=False)


class EpochTimer(tf.keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self.start)


timer = EpochTimer()
callbacks = [hvd.callbacks.BroadcastGlobalVariablesCallback(0), hvd.callbacks.MetricAverageCallback()]
if hvd.rank() == 0:  # as in Horovod's examples: checkpoints on rank 0 only
    callbacks.append(tf.keras.callbacks.ModelCheckpoint(os.path.join(args.checkpoint_dir, "checkpoint-{epoch}.h5")))
callbacks.append(timer)
model.fit(dataset, steps_per_epoch=steps, epochs=args.epochs, callbacks=callbacks,
          verbose=2 if hvd.rank() == 0 else 0)
if hvd.rank() == 0:
    rates = [steps * args.batch_size_per_rank * hvd.size() / t for t in timer.times[1:] or timer.times]
    Path(args.result).write_text(json.dumps({"examples_per_sec": statistics.median(rates), "epochs": timer.times}))
