"""What a data source hands to training: per-rank tf.data pipelines plus the shapes the model must fit.

:class:`Source` is the interface every source offers (in-memory arrays here as :class:`ArraySource`, TFRecord files
in ``tfrecord.py``): ``input_shape``, ``num_classes``, ``task``, ``num_examples(split)``, ``train_dataset(...)``
(endless, equal batches per rank), ``eval_dataset(...)`` (finite, this rank's part of a split), ``arrays(split)``
(a whole split in memory, for TFLite evaluation) and ``sample_inputs(...)`` (for int8 calibration).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from hvdtrain.data.sharding import shard_indices
from hvdtrain.errors import DataError

AUTOTUNE = tf.data.AUTOTUNE
CLASSIFICATION, LANGUAGE_MODEL = "classification", "language_model"


def without_autotune(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """``dataset`` with tf.data's autotuning off, for the benchmarks' timed windows: one ``model.fit`` each, over a
    repeated in-memory batch (nothing to tune).

    Measured here (TensorFlow 2.21 with tf-keras, docs/performance.md): with autotuning on, ``model.fit`` could
    return only at the autotuning thread's next tick after its last step, and that thread's period doubles from
    10 ms (ticks at 10 x (2^k - 1) ms after the iterator was made): 5 steps of a gpt of width 512 returned 20.48 s
    after ``fit`` began, every time, when the steps ended at 11-12 s; with it off, when the last step did.
    Training keeps autotuning: its one ``fit`` keeps one iterator for the run (2 interleaved pairs of 2-epoch
    gpt-tiny runs with it off were no faster: 15,535 and 17,897 against 19,936 and 19,016 tokens/s)."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


class Source(abc.ABC):
    """The interface of every data source.

    Attributes:
        input_shape: one example's shape (without the batch axis).
        num_classes: classes, or the vocabulary size of a language model.
        task: ``"classification"``, or ``"language_model"`` (targets are the next tokens; loss reported in bits).
    """

    input_shape: tuple[int, ...]
    num_classes: int
    task: str = CLASSIFICATION
    tokenizer = None  # language models over text: their tokenizer (hvdtrain.data.tokenizer)

    @property
    def is_language_model(self) -> bool:
        """True when targets are next tokens (metrics per token, bits per byte)."""
        return self.task == LANGUAGE_MODEL

    def bytes_of_token(self, split: str) -> float:
        """Bytes of text per token in ``split`` (1 for byte-level models): bits per byte are the loss in bits
        per token divided by it."""
        return float((getattr(self, "bytes_per_token", None) or {}).get(split, 1.0))

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return self.num_examples("train")

    @abc.abstractmethod
    def num_examples(self, split: str) -> int:
        """Number of examples in ``train``, ``val`` or ``test``."""

    @abc.abstractmethod
    def train_dataset(self, rank: int, size: int, batch_size: int, seed: int, shuffle_buffer: int,
                      start: int = 0) -> tf.data.Dataset:
        """An endless, shuffled, batched pipeline of this rank's equal shard of the training split, from its
        ``start``-th batch (a resumed run's data position)."""

    @abc.abstractmethod
    def eval_dataset(self, split: str, rank: int, size: int, batch_size: int, equal: bool,
                     limit: int = 0) -> tf.data.Dataset | None:
        """This rank's part of ``split`` (equal counts on every rank with ``equal``; of its first ``limit`` examples
        when given, the same ones at any number of ranks); None when it is empty."""

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The whole ``split`` as arrays (read from the pipeline for streamed sources)."""
        batches = list(self.eval_dataset(split, 0, 1, 256, equal=False) or [])
        if not batches:
            return np.zeros((0, *self.input_shape), np.float32), np.zeros((0,), np.int32)
        return np.concatenate([b[0].numpy() for b in batches]), np.concatenate([b[1].numpy() for b in batches])

    def sample_inputs(self, count: int, seed: int = 0) -> np.ndarray:
        """Up to ``count`` training inputs drawn with a fixed seed (int8 calibration)."""
        batches = self.train_dataset(0, 1, 32, seed, 1000)
        return np.concatenate([b[0].numpy() for b in batches.take(max(1, -(-count // 32)))])[:count]

    def missing_split_note(self, split: str) -> str | None:
        """Why ``split`` is empty and how to provide it (None when it is not empty)."""
        if self.num_examples(split):
            return None
        key = {"test": "data.test_fraction", "val": "data.validation_fraction"}.get(split, "the data")
        return f"there is no {split} split ({key} is 0); set {key} > 0 to hold out examples for it"


@dataclass
class ArraySource(Source):
    """In-memory train / validation / test arrays and the model's input shape and number of classes."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    input_shape: tuple[int, ...]
    num_classes: int
    task: str = CLASSIFICATION
    tokenizer: object = None  # language models: the tokenizer of the text (hvdtrain.data.tokenizer)
    bytes_per_token: dict = None  # language models: {split: text bytes per token} (bits per byte); None: 1

    def num_examples(self, name: str) -> int:
        """Number of examples in ``train``, ``val`` or ``test``."""
        return len(self.arrays(name)[0])

    def arrays(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The arrays of ``train``, ``val`` or ``test``."""
        return {
            "train": (self.x_train, self.y_train),
            "val": (self.x_val, self.y_val),
            "test": (self.x_test, self.y_test),
        }[name]

    def sample_inputs(self, count: int, seed: int = 0) -> np.ndarray:
        """Up to ``count`` training inputs drawn at random with a fixed seed."""
        return self.x_train[np.random.default_rng(seed).permutation(len(self.x_train))[:count]]

    def train_dataset(self, rank: int, size: int, batch_size: int, seed: int, shuffle_buffer: int,
                      start: int = 0) -> tf.data.Dataset:
        """An endless, batched pipeline of this replica's part of every global batch, from the ``start``-th.

        Each epoch is one permutation of the training split, drawn from ``(seed, epoch)`` the same way whatever
        the layout, cut into global batches of ``size x batch_size`` examples (the last, partial one is left
        out); replica ``rank`` takes examples ``rank x batch_size .. (rank + 1) x batch_size`` of each. So the
        global batches, and the training, are those of one process with the global batch, at any number of
        data-parallel replicas (tested). ``shuffle_buffer`` is not needed: the whole split is permuted.
        """
        x, y = tf.constant(self.x_train), tf.constant(self.y_train)
        return self.train_indices(rank, size, batch_size, seed).skip(start).map(
            lambda idx: (tf.gather(x, idx), tf.gather(y, idx)), num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)

    def train_indices(self, rank: int, size: int, batch_size: int, seed: int) -> tf.data.Dataset:
        """The training examples' indices in :meth:`train_dataset`'s batches (endless), for pipelines that gather
        more per example (distillation's cached teacher outputs)."""
        n, glob = self.num_train, size * batch_size
        steps = n // glob
        if steps < 1:
            raise DataError(f"{n} training examples are fewer than one global batch of {glob}; lower "
                            "data.batch_size_per_rank or use fewer ranks")

        def epoch(e):
            order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=tf.stack([tf.cast(seed, tf.int64), e]))
            return tf.data.Dataset.from_tensor_slices(
                tf.reshape(order[: steps * glob], [steps, size, batch_size])[:, rank])

        return tf.data.Dataset.range(2**62).flat_map(epoch)

    def eval_dataset(self, name: str, rank: int, size: int, batch_size: int, equal: bool,
                     limit: int = 0) -> tf.data.Dataset | None:
        """This rank's shard of ``val`` or ``test`` (of its first ``limit`` examples when given), batched; None
        when the split is empty.

        With ``equal`` every rank gets the same count (for averaged validation metrics); without it the shards
        cover the whole split (for exact test metrics summed over ranks). A split smaller than the number of
        ranks goes whole to rank 0.
        """
        x, y = self.arrays(name)
        if limit:
            x, y = x[:limit], y[:limit]
        if len(x) == 0:
            return None
        if len(x) < size:
            idx = np.arange(len(x)) if rank == 0 else np.arange(0)
        else:
            idx = shard_indices(len(x), rank, size, equal=equal)
        return tf.data.Dataset.from_tensor_slices((x[idx], y[idx])).batch(batch_size).prefetch(AUTOTUNE)


def split_arrays(
    x: np.ndarray,
    y: np.ndarray,
    *,
    test_fraction: float,
    validation_fraction: float,
    seed: int = 0,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    task: str = CLASSIFICATION,
) -> ArraySource:
    """Shuffle once with a fixed seed (the same on every rank) and cut into train / validation / test."""
    if len(x) == 0:
        raise DataError("the dataset is empty; check data.path")
    if len(x) != len(y):
        raise DataError(f"x has {len(x)} examples but y has {len(y)}; they must match")
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_test = int(round(len(x) * test_fraction))
    n_val = int(round(len(x) * validation_fraction))
    x_test, y_test = x[:n_test], y[:n_test]
    x_val, y_val = x[n_test : n_test + n_val], y[n_test : n_test + n_val]
    x_train, y_train = x[n_test + n_val :], y[n_test + n_val :]
    if len(x_train) == 0:
        raise DataError("no training examples are left after the test and validation splits; lower the fractions")
    if num_classes is None:
        num_classes = int(y.max()) + 1
    return ArraySource(
        x_train, y_train, x_val, y_val, x_test, y_test,
        input_shape=tuple(input_shape or x.shape[1:]), num_classes=num_classes, task=task,
    )
