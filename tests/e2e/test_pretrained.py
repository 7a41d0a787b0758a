"""Fine-tuning a Hugging Face checkpoint as a user runs it: `hvdtrain train` from the shipped builtin:tiny-llama (a
LlamaForCausalLM made and trained by transformers) at tensor=2 and pipeline=2, full and LoRA, each SIGKILLed after
its first checkpoint and resumed at the other layout, each ending with every logged metric of the same run in one
process; the first logged validation loss is the pretrained model's own. The runs go back out as Hugging Face
directories (`hvdtrain export --format huggingface`): transformers' own tensor names, shapes and dtypes, the run's
logits when read back, a PEFT adapter for the LoRA run; bad checkpoints and settings are one line each and write
nothing. (The same exports loaded in transformers and PEFT themselves: the last test, where the reference venv of
scripts/reference exists; docs/pretrained.md records its figures.)"""
import json
import shutil

import numpy as np
import pytest
import yaml

from tests.helpers import BIN, ROOT, env, hvdtrain_at, run

pytestmark = pytest.mark.e2e

FIXTURES = ROOT / "tests" / "fixtures" / "hf"
SHIPPED = ROOT / "hvdtrain" / "pretrained" / "tiny-llama"
# 8 KB of the corpus in windows of 16 tokens: 7 steps of 16 examples per epoch, 2 epochs
SMALL = ["data.context_length=16", "train.epochs=2", "train.lr_scaling=none"]
COMPARED = ("loss", "accuracy", "val_loss", "val_accuracy", "val_bits_per_byte", "lr")
LAYOUTS = {"one": (1, []), "tp2": (2, ["parallel.tensor=2"]),
           "pp2": (2, ["parallel.pipeline=2", "parallel.microbatches=2"]),
           "dp2xtp2": (4, ["data.batch_size_per_rank=8", "parallel.tensor=2", "parallel.shard_optimizer=true",
                           "parallel.sequence=true"])}
LORA_DROPOUT = "train.lora_dropout=0.1"  # the adapters' input masks: each layout draws its part of one process's


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from hvdtrain.data import text

    path = tmp_path_factory.mktemp("corpus") / "topics.txt"
    path.write_bytes(text.embedded_corpus()[:8_000])
    return path


def train(corpus, out, recipe, layout, *sets, failpoint=None, check=True):
    np_, layout_sets = LAYOUTS[layout]
    return hvdtrain_at(np_, ["train", "--recipe", recipe, "--set", f"data.path={corpus}",
                             *(a for s in [*SMALL, *layout_sets, *sets] for a in ("--set", s)), "--output", out],
                       failpoint, check)


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(out, reference):
    got, want = rows(out), rows(reference)
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want] == [0, 1, 2]
    for g, w in zip(got, want):
        for key in COMPARED:
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), (g["epoch"], key)


def resumed(corpus, tmp_path_factory, recipe, first, then, name, *sets):
    """The run killed right after its first checkpoint at layout ``first``, then run again at ``then``."""
    out = tmp_path_factory.mktemp(name) / "run"
    killed = train(corpus, out, recipe, first, *sets, failpoint="after-checkpoint@1", check=False)
    assert killed.returncode != 0 and [r["epoch"] for r in rows(out)] == [0, 1]
    again = train(corpus, out, recipe, then, *sets)
    assert "resuming after epoch 1" in again.stdout
    return out, killed, again


@pytest.fixture(scope="module")
def full(corpus, tmp_path_factory):
    """Full fine-tuning: one process, and tensor=2 killed then resumed at pipeline=2."""
    one = tmp_path_factory.mktemp("full-one") / "run"
    train(corpus, one, "llama-finetune", "one")
    return one, resumed(corpus, tmp_path_factory, "llama-finetune", "tp2", "pp2", "full-tp2-pp2")


@pytest.fixture(scope="module")
def lora(corpus, tmp_path_factory):
    """LoRA with dropout on the adapters' input: one process, and pipeline=2 killed then resumed at tensor=2."""
    one = tmp_path_factory.mktemp("lora-one") / "run"
    train(corpus, one, "llama-lora", "one", LORA_DROPOUT)
    return one, resumed(corpus, tmp_path_factory, "llama-lora", "pp2", "tp2", "lora-pp2-tp2", LORA_DROPOUT)


def pretrained_validation_loss(run_dir) -> float:
    """The shipped checkpoint's loss on the run's validation split, computed here in one process through Keras
    (not through the run's layout)."""
    from hvdtrain import config, data, formats
    from hvdtrain.exact_metrics import local_sums

    cfg = config.load(config_file=str(run_dir / "config.yaml"))
    source = data.load(cfg.data, seed=0, model_name=cfg.model.name)
    model = formats.load_model(SHIPPED, context_length=cfg.data.context_length)
    loss, _, count = local_sums(model, source.eval_dataset("val", 0, 1, 16, equal=False))
    return loss / count


def test_a_full_finetune_at_tensor_2_resumed_at_pipeline_2_is_the_one_process_run(full):
    one, (out, killed, again) = full
    assert "model: llama" in killed.stdout and "from builtin:tiny-llama" in killed.stdout
    assert_same_metrics(out, one)
    start = rows(one)[0]["val_loss"]
    assert start == pytest.approx(pretrained_validation_loss(one), rel=1e-5)
    assert start < np.log(384) - 3  # the pretrained model, far from a random one's ln(384) = 5.95
    assert rows(one)[2]["loss"] < rows(one)[1]["loss"]  # it trains
    manifest = json.loads((out / "checkpoints" / "epoch-0002" / "manifest.json").read_text())
    assert manifest["model"]["pretrained"] == "builtin:tiny-llama" and manifest["model"]["lora"] is None
    assert (out / "tokenizer.json").read_bytes() == (SHIPPED / "tokenizer.json").read_bytes()


def test_a_lora_finetune_at_pipeline_2_resumed_at_tensor_2_is_the_one_process_run(lora):
    import tensorflow as tf

    import models  # noqa: F401 - registers the families' layers for load_model

    one, (out, killed, again) = lora
    assert "LoRA: rank 8, alpha 16 on attn/query/kernel, attn/key/kernel, attn/value/kernel, attn/output/kernel" \
        in killed.stdout
    assert_same_metrics(out, one)
    assert rows(one)[0]["val_loss"] == pytest.approx(pretrained_validation_loss(one), rel=1e-5)
    assert rows(one)[2]["val_loss"] < rows(one)[0]["val_loss"] - 0.01  # the adapters learn
    # checkpoints hold the adapters (and their optimizer state) only: the base is the pretrained checkpoint's
    manifest = json.loads((out / "checkpoints" / "epoch-0002" / "manifest.json").read_text())
    assert manifest["variables"] and all(n.endswith(("/lora_a", "/lora_b")) for n in manifest["variables"])
    assert manifest["model"]["lora"]["rank"] == 8
    # model.keras is the merged model: plain Keras loads it, and it differs from the pretrained one
    merged = tf.keras.models.load_model(out / "model.keras", compile=False)
    base = models.from_pretrained(SHIPPED, context_length=16)
    x = np.arange(32, dtype=np.int32).reshape(2, 16) % 384
    assert np.abs(merged(x).numpy() - base(x).numpy()).max() > 1e-3


def test_lora_at_data_2_x_tensor_2_with_zero_and_sequence_parallelism_is_the_one_process_run(corpus, lora, tmp_path):
    """The adapters' optimizer state sharded over the data-parallel pair (ZeRO), their factors split over the
    tensor pair, the positions too between split regions: the factor a member holds whole has a gradient that covers
    its heads (and, with sequence parallelism, its positions) only, summed over the group once."""
    out = tmp_path / "run"
    train(corpus, out, "llama-lora", "dp2xtp2", LORA_DROPOUT)
    assert_same_metrics(out, lora[0])


def test_the_exports_are_the_format_transformers_and_peft_read(full, lora, tmp_path):
    """The tensor=2 fine-tune as a Hugging Face directory: the shipped checkpoint's tensor names, shapes and dtypes
    (transformers wrote those), its config, the run's logits read back, in shards with an index above
    --max-shard-size; generate and evaluate take it as --model. The LoRA run as a PEFT adapter over the checkpoint
    it started from (its A/B shapes as PEFT's fixture adapter has them) giving the run's logits, or merged."""
    from hvdtrain import formats
    from models import hub

    out = full[1][0]
    exported = tmp_path / "full"
    run([str(BIN / "hvdtrain"), "export", "--model", str(out), "--format", "huggingface", "--output", str(exported),
         "--max-shard-size", "200KB"])
    assert (exported / hub.INDEX).exists() and not (exported / hub.WEIGHTS).exists()
    ours, theirs = hub.Weights(hub.LocalFiles(exported)), hub.Weights(hub.LocalFiles(SHIPPED))
    assert {n: (s.shape, s.dtype) for n, s in ours.stored.items()} == {
        n: (s.shape, s.dtype) for n, s in theirs.stored.items()}
    config = json.loads((exported / "config.json").read_text())
    assert {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")} == {
        k: v for k, v in json.loads((SHIPPED / "config.json").read_text()).items() if k != "dtype"}
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (exported / name).read_bytes() == (SHIPPED / name).read_bytes()
    x = np.arange(32, dtype=np.int32).reshape(2, 16) % 384
    trained = formats.load_model(out)(x).numpy()
    assert np.abs(formats.load_model(exported, context_length=16)(x).numpy() - trained).max() < 1e-5
    text = run([str(BIN / "hvdtrain"), "generate", "--model", str(exported), "--prompt", "The for statement",
                "--max-tokens", "12", "--temperature", "0"])
    assert text.stdout.startswith("The for statement") and len(text.stdout) > len("The for statement")
    # a Hugging Face directory has no run: the recipe llama-finetune's data (here the run's corpus and window)
    corpus = yaml.safe_load((out / "config.yaml").read_text())["data"]["path"]
    result = run([str(BIN / "hvdtrain"), "evaluate", "--model", str(exported), "--set", f"data.path={corpus}",
                  "--set", "data.context_length=16"])
    assert json.loads(result.stdout.splitlines()[-1])["loss"] == pytest.approx(
        json.loads((out / "summary.json").read_text())["test_loss"], rel=1e-5)

    lora_run = lora[1][0]
    adapter = tmp_path / "adapter"
    run([str(BIN / "hvdtrain"), "export", "--model", str(lora_run), "--format", "huggingface", "--output",
         str(adapter)])
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    peft = json.loads((adapter / "adapter_config.json").read_text())
    assert (peft["r"], peft["lora_alpha"], peft["peft_type"], sorted(peft["target_modules"])) == (
        8, 16.0, "LORA", ["k_proj", "o_proj", "q_proj", "v_proj"])
    fixture = hub.AdapterWeights(hub.LocalFiles(FIXTURES / "llama-gqa-lora"))  # PEFT's own, r=4
    mine = hub.AdapterWeights(hub.LocalFiles(adapter))
    assert sorted(mine.stored) == sorted(fixture.stored)
    for name, s in fixture.stored.items():  # lora_A [r, in], lora_B [out, r]
        assert mine.shape(name) == ((8, s.shape[1]) if "lora_A" in name else (s.shape[0], 8))
    trained = formats.load_model(lora_run)(x).numpy()
    from hvdtrain.formats import huggingface

    via_peft = huggingface.load_model(str(SHIPPED), 16, adapter=str(adapter))
    assert np.abs(via_peft(x).numpy() - trained).max() < 1e-5
    merged = tmp_path / "merged"
    run([str(BIN / "hvdtrain"), "export", "--model", str(lora_run), "--format", "huggingface", "--merge",
         "--output", str(merged)])
    assert np.abs(formats.load_model(merged, context_length=16)(x).numpy() - trained).max() < 1e-5


def one_line_error(proc, code=2):
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith(("I0000", "W0000", "WARNING"))]
    assert proc.returncode == code and len(lines) == 1 and lines[0].startswith("hvdtrain: error:"), proc.stderr
    return lines[0]


def test_bad_checkpoints_and_settings_are_one_line_and_write_nothing(corpus, tmp_path):
    """A directory without config.json, an unsupported architecture, a --set that contradicts the checkpoint, a
    missing shard, a tokenizer larger than the embedding: one line each, exit 1 or 2, no run directory."""
    def copy(name):
        target = tmp_path / name
        shutil.copytree(FIXTURES / name, target)
        return target

    falcon = copy("mistral")
    cfg = json.loads((falcon / "config.json").read_text())
    (falcon / "config.json").write_text(json.dumps({**cfg, "architectures": ["FalconForCausalLM"]}))
    sharded = copy("llama-tied-bf16")
    (sharded / "model-00003-of-00004.safetensors").unlink()
    big_tokenizer = copy("gpt2")
    cfg = json.loads((big_tokenizer / "config.json").read_text())
    (big_tokenizer / "config.json").write_text(json.dumps({**cfg, "vocab_size": 256}))
    for i, (pretrained, extra, code, match) in enumerate([
            (tmp_path, [], 2, "has no config.json: give a Hugging Face model directory"),
            (falcon, [], 2, "architecture FalconForCausalLM is not supported"),
            (FIXTURES / "qwen2", ["model.params.kv_heads=4"], 2, "--set model.params.kv_heads=4 contradicts"),
            (sharded, [], 1, "model-00003-of-00004.safetensors is missing"),
            (big_tokenizer, [], 1, "has 384 tokens, more than the model's vocabulary of 256")]):
        out = tmp_path / f"run{i}"
        proc = run([str(BIN / "hvdtrain"), "train", "--recipe", "llama-finetune", "--set",
                    f"model.pretrained={pretrained}", "--set", f"data.path={corpus}", "--set", "data.context_length=16",
                    *(a for s in extra for a in ("--set", s)), "--output", str(out)], check=False)
        assert match in one_line_error(proc, code)
        assert not out.exists()


def test_exports_load_in_transformers_and_peft(full, lora, tmp_path):
    """The checks the tests above make against transformers' files, made by transformers and PEFT themselves
    (scripts/reference/check_export.py in the reference venv, which CI does not install: run
    `bash scripts/reference/setup.sh` to have this test run)."""
    reference = ROOT / ".venv-reference" / "bin" / "python"
    if not reference.exists():
        pytest.skip("no .venv-reference (bash scripts/reference/setup.sh makes it): transformers is not installed")
    from hvdtrain import formats

    x = np.arange(32, dtype=np.int32).reshape(2, 16) % 384
    for name, run_dir, merge in [("full", full[1][0], False), ("adapter", lora[1][0], False)]:
        exported = tmp_path / name
        run([str(BIN / "hvdtrain"), "export", "--model", str(run_dir), "--format", "huggingface", "--output",
             str(exported), *(["--merge"] if merge else [])])
        np.savez(tmp_path / f"{name}.npz", input_ids=x, logits=formats.load_model(run_dir)(x).numpy())
        model = ["--model", str(SHIPPED), "--adapter", str(exported)] if name == "adapter" else ["--model",
                                                                                                 str(exported)]
        proc = run([str(reference), str(ROOT / "scripts" / "reference" / "check_export.py"), *model, "--inputs",
                    str(tmp_path / f"{name}.npz"), "--tolerance", "1e-4"], env={**env(), "PYTHONPATH": ""})
        assert json.loads(proc.stdout.strip().splitlines()[-1])["ok"]
