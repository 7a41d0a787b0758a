"""The distillation loss: Hinton's form, and the standardized-logit form that ignores the logits' scale."""
import numpy as np
import pytest
import tensorflow as tf

import models
from hvdtrain.compression.distill import Distiller, standardize


def distiller(standardize_logits, alpha=0.0, temperature=2.0):
    student = models.build("mlp", input_shape=(4,), num_classes=3, hidden_units=[4])
    return Distiller(student, models.build("mlp", input_shape=(4,), num_classes=3, hidden_units=[4]),
                     alpha, temperature, standardize_logits)


def test_standardize_gives_zero_mean_unit_deviation_per_example():
    z = standardize(tf.constant([[1.0, 2.0, 6.0], [-3.0, 0.0, 30.0]])).numpy()
    np.testing.assert_allclose(z.mean(-1), 0.0, atol=1e-6)
    np.testing.assert_allclose(z.std(-1), 1.0, atol=1e-4)


def test_standardized_loss_ignores_the_teacher_logit_scale_and_hintons_does_not():
    y = tf.constant([0, 2])
    s = tf.constant([[2.0, 0.5, -1.0], [0.0, 1.0, 0.3]])
    t = tf.constant([[3.0, 1.0, -2.0], [-1.0, 0.5, 2.5]])
    std = distiller(True)
    assert float(std.distillation_loss(y, s, t)) == pytest.approx(float(std.distillation_loss(y, s, 5.0 * t + 7.0)),
                                                                   rel=1e-5)
    hinton = distiller(False)
    assert float(hinton.distillation_loss(y, s, t)) != pytest.approx(float(hinton.distillation_loss(y, s, 5.0 * t)),
                                                                      rel=1e-3)


def test_hinton_loss_matches_the_formula():
    y, s, t = tf.constant([1]), tf.constant([[0.2, 1.0, -0.5]]), tf.constant([[0.0, 2.0, 1.0]])
    d = distiller(False, alpha=0.3, temperature=2.0)
    ps, pt = tf.nn.softmax(s / 2.0).numpy()[0], tf.nn.softmax(t / 2.0).numpy()[0]
    hard = -np.log(tf.nn.softmax(s).numpy()[0][1])
    expected = 0.3 * hard + 0.7 * 4.0 * np.sum(pt * np.log(pt / ps))
    assert float(d.distillation_loss(y, s, t)) == pytest.approx(expected, rel=1e-5)


def _fit(teacher, source, seed=3):
    """A student trained 1 epoch (4 steps of plain SGD) from ``source``'s batches against ``teacher``."""
    tf.keras.utils.set_random_seed(seed)
    student = models.build("mlp", input_shape=(4,), num_classes=3, hidden_units=[8])
    d = Distiller(student, teacher, 0.3, 2.0, True)
    d.compile(optimizer=tf.keras.optimizers.SGD(0.5))
    d.fit(source.train_dataset(0, 1, 16, 0, 0), epochs=1, steps_per_epoch=4, verbose=0)
    return np.concatenate([w.ravel() for w in student.get_weights()])


def test_cached_teacher_outputs_train_the_student_the_teacher_would():
    from hvdtrain.compression.distill import TeacherOutputs, with_teacher_outputs
    from hvdtrain.data.source import ArraySource

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)).astype(np.float32), rng.integers(0, 3, 64)
    source = ArraySource(x, y, x[:0], y[:0], x[:0], y[:0], input_shape=(4,), num_classes=3)
    tf.keras.utils.set_random_seed(1)
    teacher = models.build("mlp", input_shape=(4,), num_classes=3, hidden_units=[16])
    student = models.build("mlp", input_shape=(4,), num_classes=3, hidden_units=[8])
    cached = with_teacher_outputs(Distiller(student, teacher, 0.3, 2.0), source, epochs=3, ranks=2)
    assert isinstance(cached, TeacherOutputs) and cached.logits.shape == (64, 3)
    np.testing.assert_allclose(cached.logits, teacher(x).numpy(), atol=1e-6)
    assert with_teacher_outputs(Distiller(student, teacher, 0.3, 2.0), source, epochs=2, ranks=2) is source
    assert with_teacher_outputs(Distiller(student, teacher, 1.0, 2.0), source, epochs=3, ranks=2) is source
    live = _fit(teacher, source)
    np.testing.assert_allclose(_fit(teacher, cached), live, atol=1e-5)
    # negative control: another teacher's outputs in the cache train another student
    other = TeacherOutputs(source, cached.logits[::-1].copy())
    assert np.abs(_fit(teacher, other) - live).max() > 1e-3
