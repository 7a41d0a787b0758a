"""hvdtrain's Adam and AdamW (TensorFlow's fused kernel per variable) against Keras' own, step for step."""
import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from hvdtrain import config, runtime

# Measured: 3.6e-7 (Adam) and 4.8e-7 (AdamW) apart after 4 steps that moved the weights by 0.040, float32 rounding in
# another order; a step count off by one lands 5.5e-3 apart (the negative control)
RELATIVE = 1e-4  # of how far the steps moved the weights


def train(optimizer, steps: int = 4, graph: bool = False):
    """A few steps on an embedding (sparse gradients) and a dense kernel; returns both variables' final values."""
    tf.keras.utils.set_random_seed(0)
    table, kernel = tf.Variable(tf.random.normal((10, 4))), tf.Variable(tf.random.normal((4, 3)))

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(tf.gather(table, [1, 2, 2, 5]) @ kernel - 1.0))
        optimizer.apply_gradients(zip(tape.gradient(loss, [table, kernel]), [table, kernel]))

    step = tf.function(step) if graph else step
    for _ in range(steps):
        step()
    return np.concatenate([table.numpy().ravel(), kernel.numpy().ravel()]), step


def ours(name: str):
    return runtime.make_optimizer(dataclasses.replace(config.load("gpt-tiny").train, optimizer=name), 0.01)


@pytest.mark.parametrize("name, graph", [("adam", False), ("adam", True), ("adamw", True)])
def test_fused_adam_updates_as_keras_does(name, graph):
    keras = (tf.keras.optimizers.Adam(0.01) if name == "adam"
             else tf.keras.optimizers.AdamW(0.01, weight_decay=config.load("gpt-tiny").train.weight_decay))
    start, _ = train(tf.keras.optimizers.SGD(0.0), graph=graph)
    expected, _ = train(keras, graph=graph)
    got, step = train(ours(name), graph=graph)
    moved = np.abs(expected - start).max()
    assert moved > 0.01 and np.abs(got - expected).max() < RELATIVE * moved
    if graph:  # the fused kernel really ran (the sparse gradient took Keras' update)
        ops = {op.type for op in step.get_concrete_function().graph.get_operations()}
        assert "ResourceApplyAdam" in ops


def test_negative_control_a_step_count_off_by_one_is_seen():
    """The bias correction depends on the step: Keras' Adam started one step later lands far outside the tolerance."""
    start, _ = train(tf.keras.optimizers.SGD(0.0))
    expected, _ = train(tf.keras.optimizers.Adam(0.01))
    late = tf.keras.optimizers.Adam(0.01)
    late.iterations.assign(1)
    shifted, _ = train(late)
    assert np.abs(shifted - expected).max() > 100 * RELATIVE * np.abs(expected - start).max()


def test_same_slots_as_keras():
    """Checkpoints hold the same slot variables (m, v per weight) as with Keras' Adam."""
    variable = tf.Variable(tf.ones((3, 2)))
    names = []
    for optimizer in (tf.keras.optimizers.Adam(0.01), ours("adam")):
        optimizer.build([variable])
        names.append(sorted(v.name for v in optimizer.variables))
    assert names[0] == names[1]
