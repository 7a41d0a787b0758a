"""Tensor- and pipeline-parallel training as a user runs it: `hvdtrain train` under horovodrun at 2 ranks, the
ordinary model.keras it ends with, resuming at another layout, a failing stage, bad layouts."""
import json
import re
import sys
import time

import pytest

from tests.helpers import BIN, ROOT, horovodrun, run

pytestmark = pytest.mark.e2e

SMALL_GPT = ["--set", "model.params={num_layers: 2, width: 64, num_heads: 4}", "--set", "data.context_length=32",
             "--set", "data.batch_size_per_rank=16"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 KB of the embedded corpus (CPython's pydoc topics): a few seconds per epoch."""
    from hvdtrain.data import text

    path = tmp_path_factory.mktemp("corpus") / "topics.txt"
    path.write_bytes(text.embedded_corpus()[:40_000])
    return path


def train(corpus, out, *sets, np=2, epochs=2, check=True):
    args = [BIN / "hvdtrain", "train", "--recipe", "gpt-tiny", "--set", f"data.path={corpus}",
            "--set", f"train.epochs={epochs}", *SMALL_GPT, *(a for s in sets for a in ("--set", s)),
            "--output", out]
    if np == 1:
        return run([str(a) for a in args], timeout=600, check=check)
    return horovodrun(args, np=np, extra=["--gloo"], timeout=600, check=check)


def summary(out):
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("tp") / "run"
    proc = train(corpus, out, "parallel.tensor=2")
    return out, proc


def test_tensor_parallel_run_has_the_usual_artifacts(tp_run):
    out, proc = tp_run
    s = summary(out)
    assert s["world_size"] == 2 and s["parallel"]["tensor"] == 2 and s["parallel"]["data"] == 1
    assert s["data_ranks"] == 1 and s["global_batch_size"] == 16  # both ranks share one replica's batch
    assert s["sharded_param_bytes_per_rank"] > 0 and s["optimizer_bytes_per_rank"] > 0
    assert "data 1 x tensor 2 x pipeline 1" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["loss"] < rows[0]["loss"]
    assert {"val_bits_per_byte", "lr"} <= set(rows[0])
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG" and any((out / "tensorboard").iterdir())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002"]


def test_tensor_parallel_run_ends_in_an_ordinary_full_model(tp_run):
    out, _ = tp_run
    from hvdtrain import modelio

    model = modelio.load_keras(out / "model.keras")
    assert model.get_layer("block_0").attn._query_dense.kernel.shape == (64, 4, 16)  # all 4 heads, unsharded
    # evaluated in one process, the gathered model gives the loss the 2 ranks measured together
    result = json.loads(run([str(BIN / "hvdtrain"), "evaluate", "--model", str(out)]).stdout.strip().splitlines()[-1])
    assert result["loss"] == pytest.approx(summary(out)["test_loss"], rel=1e-5)
    text = run([str(BIN / "hvdtrain"), "generate", "--model", str(out), "--prompt", "The ", "--max-tokens", "20"])
    assert text.stdout.startswith("The ") and len(text.stdout) > 20


def test_a_tensor_parallel_checkpoint_resumes_in_one_process(tp_run, corpus, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(tp_run[0], out)
    proc = train(corpus, out, np=1, epochs=3)  # the same run, continued at tensor=1
    assert "resuming after epoch 2" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert summary(out)["parallel"]["tensor"] == 1 and rows[2]["loss"] < rows[0]["loss"]


def test_pipeline_run_checkpoints_and_resumes(tmp_path, corpus):
    out = tmp_path / "run"
    proc = train(corpus, out, "parallel.pipeline=2", "parallel.microbatches=4", "parallel.schedule=1f1b")
    assert "pipeline (1f1b, 4 micro-batches): stage 0: embed, block_0" in proc.stdout
    assert "stage 1: block_1, ln_final, logits" in proc.stdout
    s = summary(out)
    assert s["parallel"]["pipeline"] == 2 and s["test_bits_per_byte"] < 8
    again = train(corpus, out, "parallel.pipeline=2", "parallel.microbatches=4", epochs=3)
    assert "resuming after epoch 2" in again.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[2]["loss"] < rows[0]["loss"]
    from hvdtrain import modelio

    assert modelio.load_keras(out / "model.keras").count_params() == s["param_bytes_full"] // 4


def test_a_failing_stage_stops_every_stage(tmp_path, corpus):
    start = time.time()
    proc = horovodrun([sys.executable, ROOT / "tests" / "parallel" / "workers" / "fail_stage.py", tmp_path / "out",
                       corpus], extra=["--gloo"], check=False, timeout=300)
    assert proc.returncode != 0
    assert "injected failure on stage 1" in proc.stdout + proc.stderr
    assert time.time() - start < 120  # no hang: the other stage is stopped too
    assert not (tmp_path / "out" / "summary.json").exists()


def test_a_layout_that_does_not_fit_the_ranks_fails_on_every_rank(tmp_path, corpus):
    out = tmp_path / "run"
    proc = train(corpus, out, "parallel.tensor=4", check=False)
    assert proc.returncode != 0
    for rank in (0, 1):  # horovodrun prefixes each rank's lines: [0]<stderr>: with Gloo, [1,0]<stderr>: with MPI
        lines = [ln for ln in proc.stderr.splitlines()
                 if re.match(rf"\[(1,)?{rank}\]<stderr>:hvdtrain: error:", ln)]
        assert len(lines) == 1 and "2 rank(s) cannot be laid out as tensor=4 x pipeline=1" in lines[0]
    assert not re.search(r"^\[(1,)?\d\]<stderr>:Traceback", proc.stderr, re.M)  # none from the ranks (horovodrun
    assert not out.exists()                                                    # prints its own for the exit)
