"""Communication options at N ranks, from the same initial weights and the same per-rank batches:

- ``accumulated``: backward_passes_per_step=K over K batches of size B, SGD;
- ``large_batch``: one step on the K batches joined (size K*B), SGD — must match ``accumulated``;
- ``fp32`` and ``fp16``: several steps without and with fp16 gradient compression — must stay close;
- ``tape_local`` / ``tape_averaged``: a custom loop's gradients, plain and through ``distributed.gradient_tape``;
- ``reducescatter``: Horovod's reduce-scatter of a tensor nothing else reads (patched: Gloo reduces in its buffer)
  and of one read again afterwards (which must be left as it was).
"""
import sys

import common
import numpy as np
import tensorflow as tf

import hvdtrain
import models
from hvdtrain import distributed

outdir = sys.argv[1]
K, B, STEPS = 4, 8, 5
hvdtrain.init()
rank = hvdtrain.rank()
rng = np.random.default_rng(rank)
xs = rng.random((K, B, 8, 8, 1), dtype=np.float32)
ys = rng.integers(0, 10, (K, B))
tf.keras.utils.set_random_seed(3)
init = models.build("mlp", input_shape=(8, 8, 1), num_classes=10, dropout=0.0).get_weights()
init = distributed.broadcast_object(init)


def trained(steps_fn, **wrap):
    model = models.build("mlp", input_shape=(8, 8, 1), num_classes=10, dropout=0.0)
    model.set_weights(init)
    model.compile(hvdtrain.wrap_optimizer(tf.keras.optimizers.SGD(0.5), **wrap),
                  tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    steps_fn(model)
    return np.concatenate([w.ravel() for w in model.get_weights()]).tolist()


def k_small(model):
    for i in range(K):
        model.train_on_batch(xs[i], ys[i])


def one_large(model):
    model.train_on_batch(xs.reshape(K * B, 8, 8, 1), ys.reshape(K * B))


def several(model):
    for s in range(STEPS):
        model.train_on_batch(xs[s % K], ys[s % K])


def tape_gradients(wrap: bool):
    """Gradients of this rank's first batch from a custom loop's tape, plain or through Horovod."""
    model = models.build("mlp", input_shape=(8, 8, 1), num_classes=10, dropout=0.0)
    model.set_weights(init)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_fn(ys[0], model(xs[0], training=True))
    tape = distributed.gradient_tape(tape) if wrap else tape
    grads = tape.gradient(loss, model.trainable_variables)
    return np.concatenate([g.numpy().ravel() for g in grads]).tolist()


def reduce_scattered() -> dict:
    """Each rank's tensor is ``[a, a]`` with ``a = arange(12) * (rank + 1)``; the sum over 2 ranks is ``3 [a, a]``."""
    import horovod.tensorflow as hvd

    a = tf.constant(np.arange(12, dtype=np.float32) * (rank + 1))

    @tf.function
    def alone(a):  # the concatenation's buffer goes to the reduce-scatter only: TensorFlow can hand it over
        return hvd.reducescatter(tf.concat([a, a], 0), op=hvd.Sum)

    @tf.function
    def read_again(a):  # read by two reduce-scatters and returned: no op may write in it
        x = tf.concat([a, a], 0)
        return hvd.reducescatter(x, op=hvd.Sum), hvd.reducescatter(x, op=hvd.Average), x

    summed, averaged, x = read_again(a)
    return {"alone": alone(a).numpy().tolist(), "summed": summed.numpy().tolist(),
            "averaged": averaged.numpy().tolist(), "input": x.numpy().tolist()}


common.report(
    outdir, rank,
    reducescatter=reduce_scattered(),
    tape_local=tape_gradients(False),
    tape_averaged=tape_gradients(True),
    init=np.concatenate([w.ravel() for w in init]).tolist(),
    accumulated=trained(k_small, backward_passes_per_step=K),
    large_batch=trained(one_large),
    fp32=trained(several),
    fp16=trained(several, grad_compression="fp16"),
)
