"""`hvdtrain train` as a user runs it: under horovodrun at 2 ranks, and as one process."""
import json
import re
import sys

import pytest
import yaml

from tests.helpers import BIN, horovodrun, run

pytestmark = pytest.mark.e2e

WRITE_CALLS = r"(openat\(.*O_(WRONLY|RDWR|CREAT)|mkdir|rename|unlink|rmdir)"


def writes_under(trace: str, folder: str) -> list[str]:
    """System calls in an strace log that create, change or remove anything under ``folder``."""
    return [line for line in trace.splitlines() if folder in line and re.search(WRITE_CALLS, line)]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The README's main job (digits-cnn at 2 ranks, Gloo), each rank under strace to see what it writes."""
    base = tmp_path_factory.mktemp("demo")
    out, traces = base / "run", base / "traces"
    traces.mkdir()
    calls = "openat,open,creat,mkdir,mkdirat,rename,renameat,renameat2,unlink,unlinkat,rmdir"
    wrapped = (f"exec strace -f -qq -e trace={calls} -o {traces}/rank$HOROVOD_RANK.txt "
               f"{BIN}/hvdtrain train --recipe digits-cnn --output {out}")
    proc = horovodrun(["sh", "-c", wrapped], extra=["--gloo"], timeout=600)
    return out, traces, proc


def test_digits_cnn_at_two_ranks_reaches_97_percent(demo_run):
    out, _, proc = demo_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 64
    assert summary["test_accuracy"] >= 0.97  # measured 0.992 (60 epochs)
    for key in ("epochs", "test_loss", "examples_per_sec", "wall_seconds"):
        assert summary[key] is not None and summary[key] > 0
    assert "test_accuracy" in proc.stdout  # the summary table


def test_run_artifacts(demo_run):
    out, _, _ = demo_run
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"]["name"] == "cnn"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, cfg["train"]["epochs"] + 1))
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "lr"} <= set(rows[0])
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert any((out / "tensorboard" / "train").iterdir())
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    last = cfg["train"]["epochs"]
    assert ckpts == [f"epoch-{e:04d}" for e in range(last - 2, last + 1)]  # the last 3 kept
    import tensorflow as tf

    model = tf.keras.models.load_model(out / "model.keras")
    assert model.output_shape == (None, 10)


def test_only_rank_0_writes_files(demo_run):
    out, traces, _ = demo_run
    chief = writes_under((traces / "rank0.txt").read_text(), str(out))
    other = writes_under((traces / "rank1.txt").read_text(), str(out))
    assert len(chief) > 10  # the trace does see the chief's writes
    assert other == []
    assert not [p for p in out.rglob("*") if p.name.startswith(".") and p.name != ".old"]  # no temporaries left


def test_progress_only_on_rank_0(demo_run):
    _, _, proc = demo_run
    assert "[1,0]<stdout>:Epoch 1/" in proc.stdout or "Epoch 1/" in proc.stdout
    assert "[1,1]<stdout>:Epoch" not in proc.stdout


def test_single_process_without_horovodrun(tmp_path):
    out = tmp_path / "one"
    run([str(BIN / "hvdtrain"), "train", "--recipe", "digits-mlp", "--set", "train.epochs=2", "--output", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["global_batch_size"] == 32
    assert summary["learning_rate"] == summary["base_learning_rate"]


@pytest.mark.parametrize("args, message", [
    (["--recipe", "digits-cnn", "--set", "train.epoch=3"], "did you mean 'train.epochs'"),
    (["--recipe", "digit-cnn"], "unknown recipe 'digit-cnn' (did you mean 'digits-cnn'?)"),
    (["--recipe", "digits-cnn", "--set", "model.params.filterz=[8]"], "did you mean 'model.params.filters'"),
    (["--config", "/nonexistent/x.yaml"], "does not exist"),
    (["--recipe", "digits-mlp", "--set", "train.jit_compile=true"], "needs a GPU"),
    (["--recipe", "digits-mlp", "--set", "distributed.reduce_op=adasum"], "use average or sum"),
    (["--recipe", "digits-mlp", "--set", "train.precision=mixed_float16",
      "--set", "distributed.backward_passes_per_step=2"], "loss scales disagree"),
])
def test_usage_errors_are_one_line_with_exit_2(tmp_path, args, message):
    out = tmp_path / "bad"
    proc = run([str(BIN / "hvdtrain"), "train", *args, "--output", str(out)], check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_runs_from_the_cli(tmp_path, precision):
    out = tmp_path / precision
    run([str(BIN / "hvdtrain"), "train", "--recipe", "digits-mlp", "--set", "train.epochs=2",
         "--set", f"train.precision={precision}", "--output", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == precision and summary["test_accuracy"] > 0.5


def test_debug_shows_the_traceback(tmp_path):
    proc = run([str(BIN / "hvdtrain"), "train", "--recipe", "nope", "--output", str(tmp_path), "--debug"],
               check=False)
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_recipes_and_models_listing():
    assert "digits-cnn" in run([str(BIN / "hvdtrain"), "recipes"]).stdout
    assert "filters" in run([str(BIN / "hvdtrain"), "models"]).stdout
    assert sys.executable
