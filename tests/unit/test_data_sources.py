"""Data sources: TFRecord (real JPEG/PNG), text corpora, .npz; sharding across 2 ranks."""
import numpy as np
import pytest
import tensorflow as tf

from hvdtrain.data import npz, text
from hvdtrain.data.sharding import shard_files
from hvdtrain.data.tfrecord import TFRecordSource
from hvdtrain.errors import DataError
from hvdtrain.batch_plan import make_plan


def write_shard(path, labels, size=(20, 28), fmt="jpeg", seed=0):
    """A TFRecord shard in the ImageNet layout; each image is a flat colour derived from its label."""
    rng = np.random.default_rng(seed)
    with tf.io.TFRecordWriter(str(path)) as w:
        for label in labels:
            img = np.full((*size, 3), (label * 40) % 256, np.uint8)
            img[..., 1] = rng.integers(0, 256)
            data = tf.io.encode_jpeg(img) if fmt == "jpeg" else tf.io.encode_png(img)
            ex = tf.train.Example(features=tf.train.Features(feature={
                "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data.numpy()])),
                "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
            }))
            w.write(ex.SerializeToString())


@pytest.fixture
def imagenet_dir(tmp_path):
    # uneven shards: 10, 3 and 7 records; labels 1-based as in the ImageNet layout; file i holds label i + 1
    for i, n in enumerate((10, 3, 7)):
        write_shard(tmp_path / f"train-{i:05d}-of-00003", [i + 1] * n, fmt="jpeg" if i != 1 else "png", seed=i)
    write_shard(tmp_path / "validation-00000-of-00001", [1, 2, 3, 1], size=(40, 30))
    return tmp_path


def test_tfrecord_shapes_labels_and_counts(imagenet_dir):
    src = TFRecordSource(str(imagenet_dir), image_size=16, num_classes=3, label_offset=-1)
    assert src.num_train == 20 and src.num_examples("test") == 4
    assert src.input_shape == (16, 16, 3)
    x, y = next(iter(src.train_dataset(0, 1, batch_size=5, seed=0, shuffle_buffer=64)))
    assert x.shape == (5, 16, 16, 3) and x.dtype == tf.float32
    assert set(y.numpy()) <= {0, 1, 2}
    xs, ys = zip(*src.eval_dataset("test", 0, 1, batch_size=4, equal=False))
    assert sorted(np.concatenate(ys).tolist()) == [0, 0, 1, 2]


def test_augmentation_only_in_training(tmp_path):
    # random noise images, so that crops and flips change pixels
    rng = np.random.default_rng(0)
    with tf.io.TFRecordWriter(str(tmp_path / "train-0")) as w:
        for label in range(4):
            img = rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)
            ex = tf.train.Example(features=tf.train.Features(feature={
                "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[tf.io.encode_png(img).numpy()])),
                "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
            }))
            w.write(ex.SerializeToString())
    import shutil
    shutil.copy(tmp_path / "train-0", tmp_path / "validation-0")
    plain = TFRecordSource(str(tmp_path), image_size=16, num_classes=4, augment=False)
    aug = TFRecordSource(str(tmp_path), image_size=16, num_classes=4, augment=True)
    test_x = np.concatenate([b[0] for b in plain.eval_dataset("test", 0, 1, 4, False)])
    again = np.concatenate([b[0] for b in plain.eval_dataset("test", 0, 1, 4, False)])
    np.testing.assert_array_equal(test_x, again)  # evaluation is deterministic
    x_plain = next(iter(plain.train_dataset(0, 1, 4, seed=0, shuffle_buffer=1)))[0].numpy()
    np.testing.assert_allclose(x_plain, test_x, atol=1e-6)  # no augmentation: training sees the eval view
    x_aug = next(iter(aug.train_dataset(0, 1, 4, seed=0, shuffle_buffer=1)))[0].numpy()
    assert np.abs(x_aug - test_x).max() > 0.1  # with augmentation it does not


def test_tfrecord_sharding_by_file_is_disjoint_complete_and_equal(imagenet_dir):
    src = TFRecordSource(str(imagenet_dir), image_size=8, num_classes=3, label_offset=-1)
    files = [shard_files(src.train_files, r, 2) for r in range(2)]
    assert not set(files[0]) & set(files[1])
    assert sorted(files[0] + files[1]) == sorted(src.train_files)
    plan = make_plan(num_train_examples=src.num_train, data_ranks=2, batch_size_per_rank=2, epochs=2,
                     learning_rate=0.1)
    labels = []
    for r in range(2):
        batches = list(src.train_dataset(r, 2, 2, seed=0, shuffle_buffer=8).take(plan.total_steps))
        assert len(batches) == plan.total_steps == 10  # the same on both ranks, however uneven the files
        labels.append({int(v) for _, y in batches for v in y.numpy()})
    # rank 0 reads files 0 and 2 (labels 0, 2), rank 1 file 1 (label 1)
    assert labels == [{0, 2}, {1}]


def test_tfrecord_fewer_files_than_ranks_shards_by_example(tmp_path):
    write_shard(tmp_path / "train-0", list(range(6)))
    src = TFRecordSource(str(tmp_path), image_size=8, num_classes=6)
    seen = [{int(v) for _, y in src.train_dataset(r, 2, 1, seed=0, shuffle_buffer=1).take(3) for v in y.numpy()}
            for r in range(2)]
    assert seen == [{0, 2, 4}, {1, 3, 5}]


def test_tfrecord_errors(tmp_path):
    with pytest.raises(DataError, match="no TFRecord training files"):
        TFRecordSource(str(tmp_path / "nothing"), 8, 3)
    with tf.io.TFRecordWriter(str(tmp_path / "train-0")) as w:
        ex = tf.train.Example(features=tf.train.Features(feature={
            "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x"]))}))
        w.write(ex.SerializeToString())
    with pytest.raises(DataError, match="lack image/encoded, image/class/label"):
        TFRecordSource(str(tmp_path), 8, 3)
    with pytest.raises(DataError, match="needs data.num_classes"):
        TFRecordSource(str(tmp_path), 8, 0)


def test_text_windows_are_shifted_by_one_and_held_out_contiguously(tmp_path):
    (tmp_path / "a.txt").write_bytes(bytes(range(100)))
    (tmp_path / "b.txt").write_bytes(bytes(range(100, 200)))
    s = text.load(str(tmp_path / "*.txt"), context_length=8, validation_fraction=0.1, test_fraction=0.1)
    np.testing.assert_array_equal(s.y_train[:, :-1], s.x_train[:, 1:])
    np.testing.assert_array_equal(s.x_train[1, 0], s.y_train[0, -1])
    assert s.x_train.max() < s.x_val.min() <= s.x_val.max() < s.x_test.min()  # train, then val, then test
    assert s.num_classes == 256 and s.task == "language_model"
    with pytest.raises(DataError, match="no text files match"):
        text.load(str(tmp_path / "*.md"), 8, 0.1, 0.1)


def test_embedded_corpus_ships_with_python():
    corpus = text.embedded_corpus()
    assert len(corpus) > 400_000
    assert 4.0 < text.unigram_entropy_bits(corpus) < 5.5
    assert text.unigram_entropy_bits(b"aaaa") == 0.0


def test_npz_source(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 255, (50, 6, 6), dtype=np.uint8), y=np.arange(50) % 4)
    s = npz.load(str(tmp_path / "d.npz"), test_fraction=0.2, validation_fraction=0.0)
    assert s.input_shape == (6, 6, 1) and s.num_classes == 4 and s.num_train == 40
    assert s.x_train.max() <= 1.0
    np.savez(tmp_path / "bad.npz", images=np.zeros((3, 2)), y=np.zeros(3, int))
    with pytest.raises(DataError, match="needs x and y"):
        npz.load(str(tmp_path / "bad.npz"), 0.2, 0.0)
    with pytest.raises(DataError, match="raise it to 4"):
        npz.load(str(tmp_path / "d.npz"), 0.2, 0.0, num_classes=3)
    with pytest.raises(DataError, match="does not exist"):
        npz.load(str(tmp_path / "missing.npz"), 0.2, 0.0)


def test_digits_read_from_scikit_learns_file_equal_its_loader():
    """The digits come from the file inside scikit-learn, read without importing it (1.5 s of CPU per process)."""
    from sklearn.datasets import load_digits

    from hvdtrain.data import digits

    images, target = digits.read()
    bunch = load_digits()
    assert images.shape == (1797, 8, 8) and np.array_equal(images, bunch.images)
    assert np.array_equal(target, bunch.target)


def test_digits_without_scikit_learn_say_what_to_install(monkeypatch):
    import importlib.util

    from hvdtrain.data import digits

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install scikit-learn"):
        digits.read()
