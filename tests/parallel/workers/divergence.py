"""A custom train_step at N ranks, on different data per rank, under the default callbacks (divergence guard on).

``apply_gradients`` (the trap: Horovod does not average it) must be stopped by the guard with one error naming
the variables; ``minimize(loss, vars, tape=tape)`` (averaged) must train to the end without tripping it. Both in
one launch (MODES, in order); each rank writes rank{r}.json: {mode: {...}}.
"""
import sys

import common
import tensorflow as tf

import hvdtrain
import models
from hvdtrain.data import digits
from hvdtrain.errors import HvdtrainError

outdir, modes = sys.argv[1], sys.argv[2].split(",")
hvdtrain.init()
rank, size = hvdtrain.rank(), hvdtrain.size()


class CustomStep(tf.keras.Model):
    def __init__(self, inner, mode):
        super().__init__()
        self.inner, self.mode = inner, mode

    def call(self, x, training=False):
        return self.inner(x, training=training)

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.compiled_loss(y, self.inner(x, training=True))
        variables = self.inner.trainable_variables
        if self.mode == "apply_gradients":
            self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        else:
            self.optimizer.minimize(loss, variables, tape=tape)
        return {"loss": loss}


splits = digits.load()
results = {}
for mode in modes:
    tf.keras.utils.set_random_seed(0)
    model = CustomStep(models.build("mlp", input_shape=(8, 8, 1), num_classes=10, dropout=0.0), mode)
    model.compile(hvdtrain.wrap_optimizer(tf.keras.optimizers.SGD(0.05)),
                  tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ds = splits.train_dataset(rank, size, batch_size=32, seed=0, shuffle_buffer=2000)
    callbacks = hvdtrain.callbacks.default_callbacks(steps_per_epoch=10)
    guard = next(c for c in callbacks if isinstance(c, hvdtrain.callbacks.DivergenceGuard))
    error, epochs_done = None, 0
    try:
        history = model.fit(ds, epochs=3, steps_per_epoch=10, callbacks=callbacks, verbose=0)
        epochs_done = len(history.history["loss"])
    except HvdtrainError as exc:
        error = str(exc)
    results[mode] = dict(error=error, epochs_done=epochs_done, guard_seconds=guard.seconds,
                         variables=[v.name for v in model.trainable_variables])
common.report(outdir, rank, **results)
