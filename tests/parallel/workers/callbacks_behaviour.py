"""The default callbacks at N ranks: metric averaging, and the learning rate scaled and warmed up.

Each rank injects a rank-dependent metric before the averaging callback and records what the callbacks after it
see, plus the optimizer's learning rate at every step.
"""
import sys

import common
import tensorflow as tf

import hvdtrain
import models
from hvdtrain import callbacks as cb
from hvdtrain.data import digits
from hvdtrain.batch_plan import make_plan
from hvdtrain.schedule import WarmupSchedule

outdir = sys.argv[1]
hvdtrain.init()
rank, size = hvdtrain.rank(), hvdtrain.size()
splits = digits.load()
plan = make_plan(num_train_examples=splits.num_train, data_ranks=size, batch_size_per_rank=32, epochs=3,
                 learning_rate=0.01, lr_scaling="linear", warmup_epochs=2)
schedule = WarmupSchedule(plan.base_learning_rate, plan.learning_rate, plan.warmup_steps, plan.total_steps)



class Inject(tf.keras.callbacks.Callback):
    """Before averaging: a metric equal to the rank, and the rank's own loss."""

    def __init__(self):
        super().__init__()
        self.local_loss = []

    def on_epoch_end(self, epoch, logs=None):
        logs["rank_value"] = float(rank)
        self.local_loss.append(float(logs["loss"]))


class Record(tf.keras.callbacks.Callback):
    """After the default callbacks: what every later callback sees."""

    def __init__(self):
        super().__init__()
        self.logs, self.lrs = [], []

    def on_train_batch_end(self, batch, logs=None):
        # the rate the optimizer applied in the step just taken (Keras keeps it as the current learning rate)
        self.lrs.append(float(self.model.optimizer.learning_rate))

    def on_epoch_end(self, epoch, logs=None):
        self.logs.append({k: float(v) for k, v in logs.items()})


model = models.build("mlp", input_shape=(8, 8, 1), num_classes=10)
model.compile(hvdtrain.wrap_optimizer(tf.keras.optimizers.SGD(schedule)),
              tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
inject, record = Inject(), Record()
cbs = [inject, *cb.default_callbacks(steps_per_epoch=plan.steps_per_epoch), record]
ds = splits.train_dataset(rank, size, plan.batch_size_per_rank, seed=0, shuffle_buffer=2000)
model.fit(ds, epochs=plan.epochs, steps_per_epoch=plan.steps_per_epoch, callbacks=cbs, verbose=0)
common.report(outdir, rank, plan=plan.as_dict(), local_loss=inject.local_loss, logs=record.logs, lrs=record.lrs)
