"""The GPT language model as a user runs it: gpt-tiny at 2 ranks, then `hvdtrain generate`."""
import json

import pytest

from hvdtrain.data import text
from tests.helpers import BIN, horovodrun, run

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt") / "run"
    horovodrun([BIN / "hvdtrain", "train", "--recipe", "gpt-tiny", "--set", "train.epochs=1", "--output", out],
               extra=["--gloo"], timeout=900)
    return out


def test_gpt_tiny_at_two_ranks_beats_the_unigram_entropy(gpt_run):
    summary = json.loads((gpt_run / "summary.json").read_text())
    rows = [json.loads(line) for line in (gpt_run / "metrics.jsonl").read_text().splitlines()]
    unigram = text.unigram_entropy_bits(text.embedded_corpus())  # 4.70 bits per byte
    assert summary["world_size"] == 2 and summary["task"] == "language_model"
    # Measured: about 2.9 bits per byte after one epoch, against 4.70 for the unigram entropy.
    assert rows[-1]["val_bits_per_byte"] < unigram - 1.0
    assert summary["test_bits_per_byte"] < unigram - 1.0
    assert summary["test_perplexity"] == pytest.approx(2 ** summary["test_bits_per_byte"], rel=1e-6)
    assert summary["tokens_per_sec"] > 0
    # model FLOPs utilization, every epoch and overall: gpt-tiny's 2.78 MFLOP per token (PaLM's count) at the
    # tokens/s of the run, against the peak both ranks measured at once (a float32 matmul probe on the CPU)
    assert summary["model_flops_per_token"] == 2_775_552 and summary["peak_source"].startswith("measured")
    assert summary["mfu"] == pytest.approx(summary["tokens_per_sec"] * 2_775_552 / summary["peak_flops"])
    assert 0 < summary["mfu"] < 1 and "hfu" not in summary  # no recomputation: hardware FLOPs are the model's
    assert rows[-1]["mfu"] == pytest.approx(rows[-1]["tokens_per_sec"] * 2_775_552 / summary["peak_flops"])


def test_generate_gives_the_requested_bytes_deterministically(gpt_run):
    def generate(seed):
        proc = run([str(BIN / "hvdtrain"), "generate", "--model", str(gpt_run), "--prompt", "The ",
                    "--max-tokens", "40", "--seed", str(seed)])
        return proc.stdout

    a, b, c = generate(1), generate(1), generate(2)
    assert a == b and a != c
    assert a.startswith("The ")


def test_generate_counts_bytes(gpt_run):
    from hvdtrain import formats
    from hvdtrain.serving import generate

    model = formats.load_model(gpt_run)
    out = generate.sample(model, b"def ", max_tokens=33, seed=3)
    assert len(out) == 33
    assert generate.sample(model, b"def ", max_tokens=33, seed=3) == out
    greedy = generate.sample(model, b"def ", max_tokens=10, temperature=0)
    assert greedy == generate.sample(model, b"def ", max_tokens=10, temperature=0, seed=99)


def test_generate_rejects_an_image_model(tmp_path):
    import models

    models.build("mlp", input_shape=(8, 8, 1), num_classes=10).save(tmp_path / "mlp.keras")
    proc = run([str(BIN / "hvdtrain"), "generate", "--model", str(tmp_path / "mlp.keras")], check=False)
    assert proc.returncode == 2 and "need a language model" in proc.stderr
