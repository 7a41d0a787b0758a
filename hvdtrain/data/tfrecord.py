"""Image classification from TFRecord shards in the common ImageNet layout.

Each record is a ``tf.train.Example`` with ``image/encoded`` (JPEG or PNG bytes) and ``image/class/label``
(int64). ``data.path`` is a directory holding ``train-*`` and ``validation-*`` shards (the layout of the usual
ImageNet conversion scripts), or a glob of training shards. Labels of that layout start at 1 (0 was
"background"): set ``data.label_offset=-1`` for them.

Local shards (and ``gs://``) are streamed by ``tf.data``; ``s3://`` shards are downloaded once into hvdtrain's cache
(:func:`hvdtrain.storage.local_copy`: each rank fetches the files it reads, ranks on one machine share them), as
TensorFlow itself has no S3 file system.

Training reads this rank's files (by file when there are at least as many files as ranks, else by example),
interleaved in parallel, shuffled with a per-rank seed, augmented (crop and flip) and normalised; evaluation
resizes and centre-crops only. The training stream repeats, so every rank runs the same number of steps per epoch
(computed from the total count) however uneven the files are.
"""
from __future__ import annotations

import tensorflow as tf

from hvdtrain import storage
from hvdtrain.data.sharding import shard_files
from hvdtrain.data.source import Source
from hvdtrain.errors import DataError

AUTOTUNE = tf.data.AUTOTUNE
IMAGE_KEY, LABEL_KEY = "image/encoded", "image/class/label"
MEAN = (0.485, 0.456, 0.406)  # ImageNet channel statistics, for inputs in [0, 1]
STD = (0.229, 0.224, 0.225)
CACHE_LIMIT_BYTES = 512 * 1024 * 1024  # cache the raw records in memory below this size


def find_files(path: str) -> tuple[list[str], list[str]]:
    """Training and validation shards under ``path`` (a directory, or a glob of training shards), local or on
    object storage."""
    if storage.is_dir(path):
        train = storage.glob(storage.join(path, "train*"))
        val = sorted(storage.glob(storage.join(path, "validation*")) + storage.glob(storage.join(path, "val-*")))
    else:
        train, val = storage.glob(path), []
    train = [f for f in train if not storage.is_dir(f)]
    if not train:
        raise DataError(
            f"no TFRecord training files at data.path='{path}'; give a directory with train-* shards or a glob"
        )
    return train, val


def check_features(path: str) -> None:
    """Fail clearly when the first record lacks the expected features (instead of deep inside tf.data)."""
    try:
        first = next(iter(tf.data.TFRecordDataset(storage.local_copy(path)).take(1)), None)
    except tf.errors.DataLossError:
        raise DataError(f"'{path}' is not a TFRecord file (or is corrupt)") from None
    if first is None:
        raise DataError(f"'{path}' holds no records; remove it or regenerate the shard")
    try:
        example = tf.train.Example.FromString(first.numpy())
    except Exception:  # noqa: BLE001 - any parse failure means "not an Example"
        raise DataError(f"records in '{path}' are not tf.train.Example protos") from None
    found = sorted(example.features.feature.keys())
    missing = [k for k in (IMAGE_KEY, LABEL_KEY) if k not in found]
    if missing:
        raise DataError(f"records in '{path}' lack {', '.join(missing)} (they have: {', '.join(found) or 'none'}); "
                        "hvdtrain reads the ImageNet layout: image/encoded and image/class/label")


def count_records(files: list[str]) -> int:
    """Number of records in ``files`` (one pass over the data)."""
    return sum(int(tf.data.TFRecordDataset(storage.local_copy(f)).reduce(0, lambda n, _: n + 1)) for f in files)


class TFRecordSource(Source):
    """Training / test image streams from TFRecord shards."""

    def __init__(self, path: str, image_size: int, num_classes: int, label_offset: int = 0, augment: bool = True,
                 num_examples: int = 0):
        if num_classes < 1:
            raise DataError("data.source=tfrecord needs data.num_classes (e.g. --set data.num_classes=1000)")
        self.train_files, self.test_files = find_files(path)
        check_features(self.train_files[0])
        self.image_size = image_size or 224
        self.input_shape = (self.image_size, self.image_size, 3)
        self.num_classes = num_classes
        self.label_offset = label_offset
        self.augment = augment
        self._counts = {"train": num_examples or count_records(self.train_files), "val": 0,
                        "test": count_records(self.test_files) if self.test_files else 0}
        if self._counts["train"] == 0:
            raise DataError(f"the TFRecord training files at '{path}' hold no records")
        self._cache = sum(storage.size(f) for f in self.train_files) < CACHE_LIMIT_BYTES

    def num_examples(self, name: str) -> int:
        """Records in ``train``, ``val`` (none: the validation shards serve as ``test``) or ``test``."""
        return self._counts[name]

    def _parse(self, record, training: bool):
        feats = tf.io.parse_single_example(record, {
            IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
            LABEL_KEY: tf.io.FixedLenFeature([], tf.int64),
        })
        image = tf.io.decode_image(feats[IMAGE_KEY], channels=3, expand_animations=False)
        image = tf.image.convert_image_dtype(image, tf.float32)
        size = self.image_size
        # Resize the shorter side to 1.14 x size (the usual 256 for 224), then crop size x size.
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = (size * 1.14) / tf.reduce_min(shape)
        image = tf.image.resize(image, tf.cast(tf.round(shape * scale), tf.int32))
        if training and self.augment:
            image = tf.image.random_crop(image, (size, size, 3))
            image = tf.image.random_flip_left_right(image)
        else:
            image = tf.image.resize_with_crop_or_pad(image, size, size)
        image = (image - MEAN) / STD
        label = tf.cast(feats[LABEL_KEY], tf.int32) + self.label_offset
        return image, label

    def _records(self, files: list[str], rank: int, size: int, seed: int | None) -> tf.data.Dataset:
        if len(files) >= size:
            mine = [storage.local_copy(f) for f in shard_files(files, rank, size)]
            ds = tf.data.Dataset.from_tensor_slices(mine)
            if seed is not None:
                ds = ds.shuffle(len(mine), seed=seed + rank, reshuffle_each_iteration=True)
            return ds.interleave(tf.data.TFRecordDataset, cycle_length=min(8, len(mine)),
                                 num_parallel_calls=AUTOTUNE)
        return tf.data.TFRecordDataset([storage.local_copy(f) for f in files]).shard(size, rank)

    def train_dataset(self, rank: int, size: int, batch_size: int, seed: int, shuffle_buffer: int,
                      start: int = 0) -> tf.data.Dataset:
        """This rank's endless, shuffled, augmented, batched training stream (``start``: batches skipped)."""
        ds = self._records(self.train_files, rank, size, seed)
        if self._cache:
            ds = ds.cache()
        ds = ds.shuffle(shuffle_buffer, seed=seed + rank, reshuffle_each_iteration=True).repeat()
        ds = ds.map(lambda r: self._parse(r, True), num_parallel_calls=AUTOTUNE)
        return ds.batch(batch_size, drop_remainder=True).skip(start).prefetch(AUTOTUNE)

    def missing_split_note(self, split: str) -> str | None:
        """The test split is the ``validation-*`` shards; there is no separate validation split."""
        if split == "test" and not self.test_files:
            return ("there is no test split: data.path has no validation-* (or val-*) shards, so test metrics are "
                    "skipped; put validation-* TFRecord shards next to the train-* ones to get them")
        return None

    def eval_dataset(self, name: str, rank: int, size: int, batch_size: int, equal: bool,
                     limit: int = 0) -> tf.data.Dataset | None:
        """This rank's part of the test shards, resized and centre-cropped (``equal`` is not guaranteed here; there
        is no validation split, so no ``limit`` to apply)."""
        if name != "test" or not self.test_files:
            return None
        ds = self._records(self.test_files, rank, size, None)
        return ds.map(lambda r: self._parse(r, False), num_parallel_calls=AUTOTUNE).batch(batch_size).prefetch(
            AUTOTUNE)
