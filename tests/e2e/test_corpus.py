"""A corpus prepared once (`hvdtrain data prepare`) and trained on by steps (`data.source=tokens`, `train.steps`),
as a user runs them: a 2-rank run SIGKILLed as its step-20 checkpoint appears resumes, at another layout, to every
metric of the run never interrupted; memory and start-up do not grow with the corpus. (The same with the shards and
checkpoints on S3: tests/e2e/test_object_storage.py.)"""
import json
import subprocess
import sys

import pytest

from tests.helpers import BIN, ROOT, env, hvdtrain_at, run

pytestmark = pytest.mark.e2e

STEPS = ["train.steps=30", "train.eval_every_steps=10", "train.checkpoint_every_steps=20", "train.eval_batches=2",
         "train.lr_scaling=none", "data.context_length=32", "data.batch_size_per_rank=8",
         "model.params={num_layers: 1, width: 32, num_heads: 4, kv_heads: 2}"]
COMPARED = ("loss", "accuracy", "val_loss", "val_accuracy", "val_bits_per_byte", "lr", "epoch")


def corpus_files(folder, megabytes: float):
    """Real English text (CPython's pydoc topics) in 3 files, repeated up to ``megabytes``."""
    from hvdtrain.data import text

    folder.mkdir(parents=True, exist_ok=True)
    data = text.embedded_corpus()
    whole = data * (1 + int(megabytes * 1e6) // len(data))
    whole = whole[: int(megabytes * 1e6)]
    third = len(whole) // 3
    for i in range(3):
        (folder / f"part-{i}.txt").write_bytes(whole[i * third:(i + 1) * third])
    return folder


def prepare_command(inputs, output, *extra):
    return [str(BIN / "hvdtrain"), "data", "prepare", "--input", f"{inputs}/*.txt", "--output", str(output),
            "--documents", "blank-line", "--vocab-size", "512", "--validation-fraction", "0.05", "--test-fraction",
            "0.02", *extra]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("corpus")
    files = corpus_files(base / "in", 1.0)
    proc = run(prepare_command(files, base / "tokens"))
    assert "BPE of 512 tokens trained on the corpus' first 1.0 MB (--sample-bytes)" in proc.stdout
    return base / "tokens"


def train(prepared, out, np_, *sets, failpoint=None, check=True):
    args = ["train", "--recipe", "llama-tiny", "--set", "data.source=tokens", "--set", f"data.path={prepared}",
            *(a for s in [*STEPS, *sets] for a in ("--set", s)), "--output", out]
    return hvdtrain_at(np_, args, failpoint, check)


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_killed_at_its_step_20_checkpoint_it_resumes_at_another_layout_to_the_run_never_interrupted(prepared,
                                                                                                     tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "run"
    train(prepared, reference, 2)
    assert [r["step"] for r in rows(reference)] == [10, 20, 30]
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == ["step-00000020", "step-00000030"]
    killed = train(prepared, out, 2, failpoint="after-checkpoint@20", check=False)
    assert killed.returncode != 0 and [r["step"] for r in rows(out)] == [10, 20]
    assert "validation every 10 steps, checkpoints every 20" in killed.stdout
    assert "step 20/30: 10 steps" in killed.stdout and "tokens/s, ETA" in killed.stdout
    again = train(prepared, out, 2, "parallel.tensor=2", "data.batch_size_per_rank=16")  # the same global batch
    assert "resuming after step 20" in again.stdout
    got, want = rows(out), rows(reference)
    assert [r["step"] for r in got] == [10, 20, 30]
    for g, w in zip(got, want):
        for key in COMPARED:
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), (g["step"], key)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total_steps"] == 30 and summary["unit"] == "step" and summary["vocab_size"] == 512
    assert rows(reference)[-1]["loss"] < rows(reference)[0]["loss"]  # it trains


def peak_of_prepare(inputs, output) -> tuple[int, float]:
    """The peak resident set of a prepare in a process of its own (hvdtrain.memory: not ru_maxrss, which the
    kernel carries over from the test runner that started the process), and its seconds."""
    code = ("import sys, time\nfrom hvdtrain import memory\nfrom hvdtrain.data import prepare as P\n"
            "s = P.Settings(input=sys.argv[1] + '/*.txt', tokenizer='bpe', vocab_size=512, validation_fraction=0.05,"
            " test_fraction=0.02, documents='blank-line', text_key='text', sample_bytes=2_000_000,"
            " segment_bytes=2_000_000, eod='')\nt = time.perf_counter()\nP.prepare(s, sys.argv[2], progress='off')\n"
            "print(memory.peak_bytes(), time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code, str(inputs), str(output)], capture_output=True, text=True,
                         check=True, env=env(), cwd=ROOT).stdout.split()
    return int(out[-2]), float(out[-1])


def test_memory_and_start_up_do_not_grow_with_the_corpus(tmp_path):
    """A corpus of 2 MB and one of 40 MB: the prepare's peak memory is a segment's, not the corpus' (measured: 206
    against 228 MB); a 2-rank run of 20 steps on each has the same peak memory per rank and starts as fast. Holding
    the larger corpus would cost 108 MB more to prepare (its text and 17M uint32 tokens) and 136 MB more per rank to
    train (inputs and targets as int32, as the in-memory text source keeps them): the bounds, 60 MB and 2 s, see
    it. (8 MB against 160 MB: docs/data-pipeline.md.)"""
    found = {}
    for megabytes in (2, 40):
        inputs = corpus_files(tmp_path / f"in{megabytes}", megabytes)
        peak, seconds = peak_of_prepare(inputs, tmp_path / f"tokens{megabytes}")
        out = tmp_path / f"run{megabytes}"
        train(tmp_path / f"tokens{megabytes}", out, 2, "train.steps=20", "train.eval_every_steps=20",
              "train.checkpoint_every_steps=20")
        summary = json.loads((out / "summary.json").read_text())
        manifest = json.loads((tmp_path / f"tokens{megabytes}" / "manifest.json").read_text())
        found[megabytes] = {"prepare_peak": peak, "prepare_seconds": seconds, "tokens": manifest["splits"]["train"][
            "tokens"], "peak": max(summary["peak_memory_bytes_per_rank"]),
            "start": summary["startup_seconds"]}
    small, large = found[2], found[40]
    print(json.dumps(found))
    assert large["tokens"] > 19 * small["tokens"]
    assert large["prepare_peak"] < small["prepare_peak"] + 60 * 2**20
    assert abs(large["peak"] - small["peak"]) < 60 * 2**20
    assert large["start"] < small["start"] + 2
