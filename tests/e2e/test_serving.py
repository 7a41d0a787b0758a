"""Serving a language model: a llama-tiny over its own byte-level BPE (512 tokens); cached and speculative decoding
against the full-window reference, a distilled llama draft made at 2 ranks, and the SavedModel (token and text
signatures, the tokenizer in the graph) and TFLite exports loaded back in fresh processes. (The gpt's decoder is the
same code through its own plan: tests/unit/test_decoding.py.)"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import BIN, env, run

pytestmark = pytest.mark.e2e

CONTEXT = 32
TEXTS = ["The ", "def f(x):", "", "A list is"]
VOCAB = 512


@pytest.fixture(scope="module")
def lm_run(llama_run):
    return llama_run


@pytest.fixture(scope="module")
def tokenizer(lm_run):
    from hvdtrain.data import tokenizer as T

    return T.load_beside(str(lm_run))


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def draft_run(llama_draft):
    return llama_draft


@pytest.fixture(scope="module")
def models_(lm_run, draft_run):
    from hvdtrain import formats

    return formats.load_model(lm_run), formats.load_model(draft_run[0] / "student.keras")


def test_distilling_a_llama_reports_bits_per_byte_with_and_without_the_teacher(draft_run, lm_run):
    out, stdout = draft_run
    d = json.loads((out / "compression_report.json").read_text())["distillation"]
    assert d["metric"] == "bits_per_byte" and len(d["distilled"]) == len(d["without_teacher"]) == 1
    assert d["student_params"] * 4 < d["teacher_params"]
    # the report says by how much the teacher helped (or not), for each seed and on average
    assert all(0 < v < 8 for v in d["distilled"] + d["without_teacher"])
    assert "distillation (bits_per_byte, mean over seeds [0]): with teacher" in stdout
    # 2 ranks trained one student: the divergence guard (on in fine-tuning) would have stopped a drift
    assert "ranks diverged" not in stdout
    # the compressed models read text as the teacher does: the same tokenizer beside them
    assert (out / "tokenizer.json").read_text() == (lm_run / "tokenizer.json").read_text()


def test_cached_greedy_text_equals_the_full_window(models_, prompts):
    from hvdtrain.serving import decoding, generate

    model, _ = models_
    for prompt in prompts:
        n = CONTEXT - max(1, len(prompt))
        assert decoding.sample_cached(model, [prompt], n, 0)[0] == generate.sample(model, prompt, n, 0), prompt


def test_cached_sampling_with_a_seed_equals_the_full_window(models_, prompts):
    from hvdtrain.serving import decoding, generate

    model, _ = models_
    for prompt, seed in zip(prompts, range(4)):
        n = CONTEXT - max(1, len(prompt))
        assert decoding.sample_cached(model, [prompt], n, 0.8, 40, seed)[0] == generate.sample(
            model, prompt, n, 0.8, 40, seed), prompt


def test_a_batch_of_prompts_gives_each_prompt_its_own_text(models_, prompts):
    from hvdtrain.serving import decoding

    model, _ = models_
    together = decoding.sample_cached(model, prompts, 60, 0.8, 40, seed=5)  # past the context: rows slide
    assert together == [decoding.sample_cached(model, [p], 60, 0.8, 40, seed=5)[0] for p in prompts]
    long_prompt = [7] * 50  # longer than the context: the first token is read from its last 32 tokens, as before
    from hvdtrain.serving import generate

    assert decoding.sample_cached(model, [long_prompt], 1, 0)[0] == generate.sample(model, long_prompt, 1, 0)


def test_speculative_greedy_text_is_the_models_greedy_text(models_, prompts):
    from hvdtrain.serving import decoding, speculative

    model, draft = models_
    stats = decoding.Stats()
    spec = speculative.sample_speculative(model, draft, prompts, 100, 0, k=4, stats=stats)
    assert spec == decoding.sample_cached(model, prompts, 100, 0)  # 100 tokens: past the context, sliding alike
    s = stats.as_dict()
    assert s["generated"] == 400 and s["proposed"] > 0 and 0 < s["acceptance_rate"] <= 1
    assert s["tokens_per_model_call"] > 1  # fewer calls of the large model than tokens


def test_speculative_sampling_follows_the_models_distribution(models_, prompts):
    """The first sampled token after a prompt, over 3000 independent rows: a chi-square test against the model's
    own distribution passes, and against the draft's distribution (the negative control) fails."""
    from scipy.stats import chisquare

    from hvdtrain.serving import sampling, speculative

    model, draft = models_
    prompt, rows = prompts[0], 3000
    texts = speculative.sample_speculative(model, draft, [prompt] * rows, 1, temperature=1.0, top_k=8, seed=11, k=3)
    counts = np.bincount([t[0] for t in texts], minlength=VOCAB)

    def expected(m):
        logits = m(np.array([list(prompt) + [0] * (CONTEXT - len(prompt))], np.int32))[0, len(prompt) - 1].numpy()
        return sampling.transform(logits, 1.0, 8)

    for probs, should_pass in ((expected(model), True), (expected(draft), False)):
        support = probs > 0
        assert counts[~support].sum() == 0 or not should_pass
        mask = support & (probs * rows >= 5)
        observed = counts[mask]
        exp = probs[mask] / probs[mask].sum() * observed.sum()
        p_value = chisquare(observed, exp).pvalue
        assert (p_value > 1e-3) if should_pass else (p_value < 1e-6), (should_pass, p_value)


def test_generate_cli_cached_speculative_and_full_window_agree_greedily(lm_run, draft_run):
    base = [str(BIN / "hvdtrain"), "generate", "--model", str(lm_run), "--prompt", "The ", "--prompt", "def ",
            "--max-tokens", "24", "--temperature", "0"]
    cached = run(base).stdout
    assert run([*base, "--full-window"]).stdout == cached
    spec = run([*base, "--draft", str(draft_run[0] / "student.keras")])
    assert spec.stdout == cached and cached.startswith("The ") and "\n\ndef " in cached
    assert "proposed tokens accepted" in spec.stderr and "tokens per model call" in spec.stderr


def test_saved_model_reloads_in_a_fresh_process_with_the_keras_logits_and_greedy_text(lm_run, models_, tmp_path,
                                                                                       tokenizer):
    from hvdtrain.serving import decoding

    model, _ = models_
    run([str(BIN / "hvdtrain"), "export", "--model", str(lm_run), "--format", "saved_model", "--output",
         str(tmp_path / "export")])
    saved = tmp_path / "export" / "1"  # a TensorFlow Serving model base path: version 1
    again = run([str(BIN / "hvdtrain"), "export", "--model", str(lm_run), "--format", "saved_model", "--output",
                 str(tmp_path / "export")], check=False)
    assert again.returncode == 2 and "/1 exists: give another --version" in again.stderr
    assert (tmp_path / "export" / "tokenizer.json").read_text() == (lm_run / "tokenizer.json").read_text()
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(3, CONTEXT)).astype(np.int32)
    np.save(tmp_path / "tokens.npy", tokens)
    # TensorFlow's command-line runner of SavedModels (TF Serving's loader) runs the default signature
    run([str(BIN / "saved_model_cli"), "run", "--dir", str(saved), "--tag_set", "serve", "--signature_def",
         "serving_default", "--inputs", f"tokens={tmp_path / 'tokens.npy'}", "--outdir", str(tmp_path / "cli")])
    np.testing.assert_allclose(np.load(tmp_path / "cli" / "logits.npy"), model(tokens).numpy(), atol=1e-4)
    prompts = [tokenizer.encode("The "), tokenizer.encode("def f(x):")]
    code = f"""
import json, numpy as np, tensorflow as tf
m = tf.saved_model.load({str(saved)!r})
logits = m.signatures["serving_default"](tokens=tf.constant(np.load({str(tmp_path / 'tokens.npy')!r})))["logits"]
np.save({str(tmp_path / 'logits.npy')!r}, logits.numpy())
prompts = {prompts!r}
width = max(map(len, prompts))
padded = np.array([p + [0] * (width - len(p)) for p in prompts], np.int32)
out = m.signatures["generate"](prompt=tf.constant(padded), lengths=tf.constant([len(p) for p in prompts]),
                               max_new_tokens=tf.constant(16), temperature=tf.constant(0.0), top_k=tf.constant(0),
                               seed=tf.constant(0, tf.int64))["tokens"]
text = m.signatures["generate_text"](prompt=tf.constant(["The ", "def f(x):"]), max_new_tokens=tf.constant(16),
                                     temperature=tf.constant(0.0), top_k=tf.constant(0),
                                     seed=tf.constant(0, tf.int64))["text"]
print(json.dumps([[t.decode("utf-8", errors="replace") for t in text.numpy()], out.numpy().tolist(),
                  sorted(m.signatures)]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), check=True,
                          timeout=300)
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), model(tokens).numpy(), atol=1e-4)
    texts, generated, signatures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert signatures == ["generate", "generate_text", "serving_default"]  # what TF Serving lists
    expected = decoding.sample_cached(model, prompts, 16, 0)
    assert generated == expected
    # text in, text out: the tokenizer runs inside the graph and gives the tokens' text
    assert texts == [tokenizer.decode(e) for e in expected] and all(texts)


def test_tflite_int8_export_runs_in_the_interpreter_close_to_keras(lm_run, models_, tmp_path, monkeypatch, capsys):
    """In LiteRT's interpreter, with no deprecation warning; where LiteRT is missing, in TensorFlow's, said once."""
    import warnings

    from hvdtrain.serving.tflite import TFLiteModel

    model, _ = models_
    for fmt in ("tflite", "tflite-int8"):
        run([str(BIN / "hvdtrain"), "export", "--model", str(lm_run), "--format", fmt, "--output", str(tmp_path)])
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=(4, CONTEXT)).astype(np.int32)
    keras_logits = model(tokens).numpy()
    f32, int8 = tmp_path / "model.tflite", tmp_path / "model-int8.tflite"
    np.testing.assert_allclose(TFLiteModel(f32)(tokens), keras_logits, atol=1e-3)
    assert np.abs(TFLiteModel(int8)(tokens) - keras_logits).mean() < 0.1  # int8 weights: close, not equal
    assert f32.stat().st_size > 3 * int8.stat().st_size
    assert "int8" in TFLiteModel(int8).tensor_types()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert type(TFLiteModel(f32).interpreter).__module__.startswith("ai_edge_litert")
        monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # LiteRT missing
        fallback = [TFLiteModel(f32), TFLiteModel(f32)]
    np.testing.assert_allclose(fallback[1](tokens), keras_logits, atol=1e-3)
    assert not [w for w in seen if "deprecat" in str(w.message).lower()]
    assert capsys.readouterr().err.count("LiteRT (pip install ai-edge-litert) is not installed") == 1


def test_export_and_generate_reject_an_unknown_format_and_an_image_model(lm_run, tmp_path):
    proc = run([str(BIN / "hvdtrain"), "export", "--model", str(lm_run), "--format", "onnx", "--output",
                str(tmp_path / "x")], check=False)
    assert proc.returncode == 2 and "unknown --format 'onnx'" in proc.stderr and not (tmp_path / "x").exists()
    import models

    models.build("mlp", input_shape=(8, 8, 1), num_classes=10).save(tmp_path / "mlp.keras")
    proc = run([str(BIN / "hvdtrain"), "export", "--model", str(tmp_path / "mlp.keras"), "--output",
                str(tmp_path / "y")], check=False)
    assert proc.returncode == 2 and "need a language model" in proc.stderr and not (tmp_path / "y").exists()
    assert f"--model {tmp_path / 'mlp.keras'} takes inputs of shape (8, 8, 1)" in proc.stderr
    proc = run([str(BIN / "hvdtrain"), "generate", "--model", str(lm_run), "--draft", str(tmp_path / "mlp.keras"),
                "--prompt", "The "], check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and proc.stdout == ""
    assert f"--draft {tmp_path / 'mlp.keras'} takes inputs of shape (8, 8, 1)" in proc.stderr


def test_a_model_trained_here_goes_out_as_a_hugging_face_checkpoint_and_one_comes_in_as_a_savedmodel(lm_run, models_,
                                                                                                     tmp_path):
    """The llama trained from scratch over its own BPE is written as a LlamaForCausalLM directory (config made from
    its settings, its tokenizer.json with a tokenizer_config.json transformers reads) that reads back with its
    logits; a checkpoint of transformers' with a published tokenizer (Llama 3's regex pre-split) exports as a
    SavedModel whose token signature gives its logits, and says why it has no text signature."""
    import tensorflow as tf

    from hvdtrain import formats

    model, _ = models_
    out = tmp_path / "hf"
    run([str(BIN / "hvdtrain"), "export", "--model", str(lm_run), "--format", "huggingface", "--output", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == VOCAB
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    tokens = np.random.default_rng(2).integers(0, VOCAB, size=(2, CONTEXT)).astype(np.int32)
    np.testing.assert_allclose(formats.load_model(out, context_length=CONTEXT)(tokens).numpy(), model(tokens).numpy(),
                               atol=1e-5)
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "hf" / "llama-gqa"
    proc = run([str(BIN / "hvdtrain"), "export", "--model", str(fixture), "--format", "saved_model", "--output",
                str(tmp_path / "sm")])
    assert "no generate_text signature" in proc.stdout
    assert "its pre-tokenizer is Sequence" in proc.stdout
    served = tf.saved_model.load(str(tmp_path / "sm" / "1")).signatures["serving_default"]
    reference = np.load(fixture / "reference.npz")
    ids = np.zeros((2, 128), np.int32)
    ids[:, :12] = reference["input_ids"]
    logits = served(tokens=tf.constant(ids))["logits"].numpy()[:, :12]
    assert np.abs(logits - reference["logits"]).max() < 1e-5 * np.abs(reference["logits"]).mean()
