"""A 2-stage pipeline run where the last stage (rank 1) raises at its fourth step; the first must not hang."""
import sys

import common  # noqa: F401
import tensorflow as tf

import hvdtrain
from hvdtrain import config, train


class Boom(tf.keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if hvdtrain.rank() == 1 and batch == 3:
            raise RuntimeError("injected failure on stage 1")


cfg = config.load("gpt-tiny", overrides=[
    f"data.path={sys.argv[2]}", "data.context_length=32", "data.batch_size_per_rank=16", "train.epochs=20",
    "model.params={num_layers: 2, width: 64, num_heads: 4}", "parallel.pipeline=2", "parallel.microbatches=2"])
train.run(cfg, sys.argv[1], callbacks=[Boom()])
