"""Training from users' own files through the CLI: TFRecord shards and .npz arrays."""
import json

import numpy as np
import pytest

from tests.helpers import BIN, run
from tests.unit.test_data_sources import write_shard

pytestmark = pytest.mark.e2e


def test_train_resnet_small_on_tfrecord_shards(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        write_shard(data / f"train-{i}", [1, 2, 3, 4] * 4, seed=i)
    write_shard(data / "validation-0", [1, 2, 3, 4])
    run([str(BIN / "hvdtrain"), "train", "--recipe", "synthetic-resnet-small", "--output", str(tmp_path / "run"),
         "--set", "data.source=tfrecord", "--set", f"data.path={data}", "--set", "data.num_classes=4",
         "--set", "data.label_offset=-1", "--set", "data.image_size=16", "--set", "data.batch_size_per_rank=8",
         "--set", "data.num_examples=0",
         "--set", "model.params={blocks_per_stage: 1}"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train_examples"] == 32 and summary["test_examples"] == 4
    assert 0.0 <= summary["test_accuracy"] <= 1.0


def test_tfrecords_without_validation_shards_say_once_there_is_no_test_split(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "train-0", [1, 2, 3, 4] * 4)
    proc = run([str(BIN / "hvdtrain"), "train", "--recipe", "synthetic-resnet-small", "--output", str(tmp_path / "run"),
                "--set", "data.source=tfrecord", "--set", f"data.path={data}", "--set", "data.num_classes=4",
                "--set", "data.label_offset=-1", "--set", "data.image_size=16", "--set", "data.batch_size_per_rank=8",
                "--set", "train.epochs=1", "--set", "model.params={blocks_per_stage: 1}"])
    notes = [ln for ln in proc.stdout.splitlines() if "no test split" in ln]
    assert len(notes) == 1
    assert "validation-*" in notes[0] and "test metrics are skipped" in notes[0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_examples"] == 0 and summary["test_accuracy"] is None


def test_train_on_npz(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(400) % 2
    x = (rng.random((400, 4, 4)) * 0.2 + y[:, None, None] * 0.8).astype(np.float32)  # separable classes
    np.savez(tmp_path / "d.npz", x=x, y=y)
    run([str(BIN / "hvdtrain"), "train", "--recipe", "digits-mlp", "--output", str(tmp_path / "run"),
         "--set", "data.source=npz", "--set", f"data.path={tmp_path / 'd.npz'}", "--set", "train.epochs=10"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.95


@pytest.mark.parametrize("sets, message", [
    (["data.source=npz", "data.path=/nonexistent.npz"], "does not exist"),
    (["data.source=tfrecord", "data.path=/nonexistent", "data.num_classes=3"], "no TFRecord training files"),
    (["data.source=npz"], "needs data.path"),
])
def test_data_errors_are_one_line(tmp_path, sets, message):
    args = [a for s in sets for a in ("--set", s)]
    proc = run([str(BIN / "hvdtrain"), "train", "--recipe", "digits-mlp", *args, "--output", str(tmp_path / "r")],
               check=False)
    assert proc.returncode in (1, 2) and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
