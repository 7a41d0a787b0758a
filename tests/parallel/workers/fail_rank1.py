"""Rank 1 raises in the middle of training; the other ranks must not hang."""
import sys

import common  # noqa: F401
import tensorflow as tf

import hvdtrain
from hvdtrain import config, train

hvdtrain.init()


class Boom(tf.keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if hvdtrain.rank() == 1 and batch == 5:
            raise RuntimeError("injected failure on rank 1")


cfg = config.load("digits-mlp", overrides=["train.epochs=50"])
original = train.cb_extra if hasattr(train, "cb_extra") else None
import hvdtrain.callbacks as cb  # noqa: E402

default = cb.default_callbacks
cb.default_callbacks = lambda **kw: [*default(**kw), Boom()]
train.run(cfg, sys.argv[1])
