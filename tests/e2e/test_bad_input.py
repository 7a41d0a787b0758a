"""Bad input: one line that says what is wrong and how to fix it, the right exit code, nothing half-written.

Each case here is a row of the table in docs/reliability.md.
"""
import numpy as np
import pytest

from tests.helpers import BIN, horovodrun, run

pytestmark = pytest.mark.e2e


def hvdtrain(*args, check=False):
    return run([str(BIN / "hvdtrain"), *map(str, args)], check=check)


def one_line(proc, code, *words):
    assert proc.returncode == code, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def npz_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("npz")
    np.savez(d / "empty.npz", x=np.zeros((0, 8, 8), np.float32), y=np.zeros((0,), np.int64))
    np.savez(d / "one.npz", x=np.zeros((1, 8, 8), np.float32), y=np.zeros((1,), np.int64))
    np.savez(d / "six.npz", x=np.zeros((60, 6, 6), np.float32), y=np.arange(60) % 10)
    return d


def test_empty_dataset(tmp_path, npz_dir):
    proc = hvdtrain("train", "--recipe", "digits-mlp", "--set", "data.source=npz", "--set",
                    f"data.path={npz_dir / 'empty.npz'}", "--output", tmp_path / "o")
    one_line(proc, 1, "empty")
    assert not (tmp_path / "o").exists()


def test_more_ranks_than_examples(tmp_path, npz_dir):
    proc = horovodrun([BIN / "hvdtrain", "train", "--recipe", "digits-mlp", "--set", "data.source=npz",
                       "--set", f"data.path={npz_dir / 'one.npz'}", "--set", "data.test_fraction=0.0",
                       "--set", "data.validation_fraction=0.0", "--output", tmp_path / "o"],
                      np=2, extra=["--gloo"], check=False)
    assert proc.returncode != 0
    assert "cannot be shared by 2 ranks" in proc.stdout + proc.stderr
    assert not (tmp_path / "o").exists()


def test_corrupt_keras_file(tmp_path):
    bad = tmp_path / "model.keras"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    one_line(hvdtrain("evaluate", "--model", bad, "--recipe", "digits-cnn"), 1, "not a Keras model file")


def test_tflite_where_a_keras_model_is_needed(tmp_path):
    f = tmp_path / "m.tflite"
    f.write_bytes(b"\x1c\x00\x00\x00TFL3")
    one_line(hvdtrain("generate", "--model", f), 1, "is a TFLite model")


def test_missing_model_file(tmp_path):
    one_line(hvdtrain("evaluate", "--model", tmp_path / "nope.keras", "--recipe", "digits-cnn"), 1, "does not exist")


def test_images_whose_shape_does_not_fit_the_model(demo_run, npz_dir):
    # the README's main job's model (trained once per session, tests/conftest.py), evaluated on 6x6 images
    proc = hvdtrain("evaluate", "--model", demo_run[0], "--recipe", "digits-cnn", "--set", "data.source=npz",
                    "--set", f"data.path={npz_dir / 'six.npz'}")
    one_line(proc, 1, "(8, 8, 1)", "(6, 6, 1)")


def test_output_directory_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = hvdtrain("train", "--recipe", "digits-mlp", "--set", "train.epochs=1", "--output", blocker / "run")
    one_line(proc, 1, "cannot write to output directory", "choose another --output")


def test_wrong_value_type_and_unknown_key():
    one_line(hvdtrain("train", "--recipe", "digits-mlp", "--set", "data.batch_size_per_rank=big", "--output", "x"),
             2, "data.batch_size_per_rank: expected an integer")
