"""Knowledge distillation (Hinton et al., 2015) into any registered student, data-parallel.

loss = alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

With ``standardize_logits`` (the default for classifiers) both logit vectors are first standardized per example
(zero mean,
unit standard deviation; Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024): the student
then matches the teacher's ranking and relative gaps of classes rather than the scale of its logits, which a
small student reaches only slowly. ``standardize_logits=false`` is Hinton's loss as written above.

The custom ``train_step`` goes through ``optimizer.minimize(loss, vars, tape=tape)``: Horovod averages gradients
inside the optimizer's gradient computation, which ``apply_gradients`` alone would skip (each rank would then
train its own student; see ../shared/STACK.md). The teacher is frozen and only run in inference mode, so its
outputs are a function of the example: over in-memory data (:class:`~hvdtrain.data.source.ArraySource`) they are
computed once per training example before fine-tuning (:func:`with_teacher_outputs`) and gathered with each batch,
instead of running the teacher's forward pass in every step of every epoch.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

import models
from hvdtrain import distributed
from hvdtrain.compression.common import fine_tune
from hvdtrain.config import Config


def standardize(logits):
    """Per-example zero mean and unit standard deviation (float32, whatever the compute policy)."""
    logits = tf.cast(logits, tf.float32)
    mean, var = tf.nn.moments(logits, axes=[-1], keepdims=True)
    return (logits - mean) / tf.sqrt(var + 1e-6)


class Distiller(tf.keras.Model):
    """Trains ``student`` against labels and a frozen ``teacher``; evaluates the student alone."""

    def __init__(self, student: tf.keras.Model, teacher: tf.keras.Model, alpha: float, temperature: float,
                 standardize_logits: bool = True):
        super().__init__()
        self.student, self.teacher = student, teacher
        self.teacher.trainable = False
        self.alpha, self.temperature, self.standardize_logits = alpha, temperature, standardize_logits
        self.hard_loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.soft_loss = tf.keras.losses.KLDivergence()
        self.loss_tracker = tf.keras.metrics.Mean(name="loss")
        self.accuracy = tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy]

    def call(self, x, training=False):
        return self.student(x, training=training)

    def distillation_loss(self, y, student_logits, teacher_logits):
        """The weighted sum of the hard-label loss and the softened KL term (``teacher_logits`` is None when
        ``alpha`` is 1: labels alone)."""
        t = self.temperature
        hard = self.hard_loss(y, student_logits)
        if self.alpha >= 1.0:
            return hard
        if self.standardize_logits:
            teacher_logits, student_logits = standardize(teacher_logits), standardize(student_logits)
        soft = self.soft_loss(tf.nn.softmax(teacher_logits / t), tf.nn.softmax(student_logits / t))
        return self.alpha * hard + (1.0 - self.alpha) * t * t * soft

    def train_step(self, data):
        x, y = data
        if isinstance(y, (tuple, list)):  # the teacher's outputs, computed once (with_teacher_outputs)
            y, teacher_logits = y
        else:
            # the no-teacher baseline (alpha=1) does not run the teacher: its forward pass is most of a step's work
            teacher_logits = self.teacher(x, training=False) if self.alpha < 1.0 else None
        with tf.GradientTape() as tape:
            student_logits = self.student(x, training=True)
            loss = self.distillation_loss(y, student_logits, teacher_logits)
        # minimize(), not apply_gradients(): Horovod's averaging lives in the gradient computation it calls.
        self.optimizer.minimize(loss, self.student.trainable_variables, tape=tape)
        self.loss_tracker.update_state(loss)
        self.accuracy.update_state(y, student_logits)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        x, y = data
        logits = self.student(x, training=False)
        self.loss_tracker.update_state(self.hard_loss(y, logits))
        self.accuracy.update_state(y, logits)
        return {m.name: m.result() for m in self.metrics}


# the most memory the cached teacher outputs may take (a language model's are context x vocabulary per example)
TEACHER_CACHE_BYTES = 256 * 2**20


class TeacherOutputs:
    """A training source whose batches carry the frozen teacher's outputs beside the labels: ``(x, (y, logits))``.

    The outputs are computed once for the whole training split (every rank computes them all: a rank's batches
    come from anywhere in the split), then gathered by the same indices as the examples, so the batches are those
    of the source itself (same order, any number of ranks).
    """

    def __init__(self, source, logits: np.ndarray):
        self.source, self.logits = source, logits

    @property
    def num_train(self) -> int:
        return self.source.num_train

    def train_dataset(self, rank: int, size: int, batch_size: int, seed: int, shuffle_buffer: int) -> tf.data.Dataset:
        x, y = tf.constant(self.source.x_train), tf.constant(self.source.y_train)
        t = tf.constant(self.logits)
        return self.source.train_indices(rank, size, batch_size, seed).map(
            lambda idx: (tf.gather(x, idx), (tf.gather(y, idx), tf.gather(t, idx))),
            num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def with_teacher_outputs(distiller: Distiller, source, epochs: int, ranks: int, batch_size: int = 256):
    """``source`` with ``distiller``'s teacher's outputs cached (:class:`TeacherOutputs`) when the loss uses them
    (alpha < 1) and caching costs less than running the teacher in every step: the source is in memory, the
    outputs fit :data:`TEACHER_CACHE_BYTES`, and ``epochs`` passes over a rank's share of the split (``1 / ranks``
    of it) are more than the one pass over the whole split that computing them takes. Otherwise ``source``
    unchanged (the teacher runs in each step, or not at all)."""
    teacher = distiller.teacher
    if distiller.alpha >= 1.0 or not hasattr(source, "train_indices") or epochs <= ranks:
        return source
    x = source.x_train
    per_example = int(np.prod(teacher.outputs[0].shape[1:])) * 4
    if per_example * len(x) > TEACHER_CACHE_BYTES:
        return source
    logits = np.concatenate([np.asarray(teacher(x[i: i + batch_size], training=False), np.float32)
                             for i in range(0, len(x), batch_size)])
    return TeacherOutputs(source, logits)


def make_distiller(student, teacher, cfg: Config, source, alpha: float | None = None) -> Distiller:
    """A built :class:`Distiller` with the configured loss (``alpha`` overrides the config's)."""
    from hvdtrain.config import standardize_logits

    c = cfg.compression
    distiller = Distiller(student, teacher, c.alpha if alpha is None else alpha, c.temperature,
                          standardize_logits(cfg))
    distiller(tf.zeros((1, *source.input_shape), teacher.inputs[0].dtype))  # build before compile
    return distiller


def build_student(cfg: Config, source, seed: int) -> tf.keras.Model:
    """The configured student (see :func:`hvdtrain.config.student_of`), initialised with ``seed`` (the same on every
    rank)."""
    from hvdtrain.config import student_of

    tf.keras.utils.set_random_seed(seed)
    name, params, _, _ = student_of(cfg)
    return models.build(name, input_shape=source.input_shape, num_classes=source.num_classes, **params)


def distill(teacher, source, cfg: Config, seed: int | None = None, alpha: float | None = None,
            epochs: int | None = None) -> tf.keras.Model:
    """Train a student from ``teacher`` (``alpha=1`` trains it on labels alone, the no-teacher baseline)."""
    from hvdtrain.config import student_of

    student = build_student(cfg, source, cfg.train.seed if seed is None else seed)
    distiller = make_distiller(student, teacher, cfg, source, alpha)
    epochs = epochs or student_of(cfg)[2]
    source = with_teacher_outputs(distiller, source, epochs, distributed.size())
    fine_tune(distiller, source, cfg, epochs, cfg.train.learning_rate, loss=None)
    return student
