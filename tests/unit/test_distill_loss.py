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
