"""Train at N ranks on different data per rank, from different initial weights; report the final weights.

Through hvdtrain: the optimizer wrapped, the state broadcast from rank 0, the metrics averaged. With ``--plain``
also, in the same launch, plain (nothing wrapped or broadcast): the negative control, whose ranks must end with
different weights (so the test of the real path can fail). Each rank writes rank{r}.json: the wrapped run's
findings, and the plain run's under "plain".
"""
import socket
import sys

import common  # noqa: F401  (sets the path and log level)
import numpy as np
import tensorflow as tf

import hvdtrain
import models
from hvdtrain.data import digits

outdir, with_plain = sys.argv[1], "--plain" in sys.argv
hvdtrain.init()
rank, size = hvdtrain.rank(), hvdtrain.size()
splits = digits.load()
ds = splits.train_dataset(rank, size, batch_size=32, seed=0, shuffle_buffer=2000)
first_labels = next(iter(ds))[1].numpy().tolist()
from hvdtrain import distributed  # noqa: E402

results = {}
for variant in ("wrapped", "plain") if with_plain else ("wrapped",):
    tf.keras.utils.set_random_seed(100 + rank)  # a different init on each rank: the broadcast must undo it
    model = models.build("mlp", input_shape=(8, 8, 1), num_classes=10, dropout=0.0)
    init = np.concatenate([w.ravel() for w in model.get_weights()])
    opt = tf.keras.optimizers.SGD(0.05, momentum=0.9)
    callbacks = []
    if variant == "wrapped":
        opt = hvdtrain.wrap_optimizer(opt)
        callbacks = [hvdtrain.callbacks.broadcast_initial_state(0), hvdtrain.callbacks.metric_average()]
    model.compile(opt, tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(ds, epochs=2, steps_per_epoch=10, callbacks=callbacks, verbose=0)
    final = np.concatenate([w.ravel() for w in model.get_weights()])
    results[variant] = dict(size=size, host=socket.gethostname(), controller=distributed.controller(),
                            first_labels=first_labels, init=init.tolist(), final=final.tolist())
common.report(outdir, rank, **results["wrapped"], **({"plain": results["plain"]} if with_plain else {}))
