"""`hvdtrain.train.run` at N ranks, where rank 1 raises at its sixth step; the other ranks must not hang."""
import sys

import common  # noqa: F401
import tensorflow as tf

import hvdtrain
from hvdtrain import config, train


class Boom(tf.keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if hvdtrain.rank() == 1 and batch == 5:
            raise RuntimeError("injected failure on rank 1")


train.run(config.load("digits-mlp", overrides=["train.epochs=50", "train.steps_per_execution=1"]), sys.argv[1],
          callbacks=[Boom()])
