import json

import pytest

from hvdtrain import artifacts, storage


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "summary.json"
    artifacts.write_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with storage.atomic_local(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary left behind


def test_json_has_no_nan(tmp_path):
    artifacts.write_json(tmp_path / "x.json", {"loss": float("nan"), "n": 3})
    assert json.loads((tmp_path / "x.json").read_text()) == {"loss": None, "n": 3}


def test_table_and_plot(tmp_path):
    rows = [{"epoch": 1, "loss": 1.0, "val_loss": 1.2, "accuracy": 0.5, "lr": 0.1},
            {"epoch": 2, "loss": 0.5, "val_loss": 0.7, "accuracy": 0.8, "lr": 0.2}]
    table = artifacts.format_table(rows)
    assert table.splitlines()[0].split() == ["epoch", "loss", "val_loss", "accuracy", "lr"]
    artifacts.plot_curves(rows, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
