"""Hugging Face checkpoints in and out, checked against the libraries that define them.

The fixtures in tests/fixtures/hf were written by transformers and PEFT (PyTorch), with their logits and greedy
continuations (scripts/reference/make_hf_fixtures.py; README.md there): hvdtrain must give transformers' logits and
greedy tokens, PEFT's logits for an adapter, and write back files with transformers' names, shapes and values. The
safetensors reader and writer are checked against the safetensors library itself.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import models
from hvdtrain import config, formats
from hvdtrain.errors import ConfigError, DataError, ModelFileError
from models import hub

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hf"
FAMILIES = ["llama-gqa", "llama-tied-bf16", "gpt2", "qwen2", "mistral"]
CONTEXT = 32  # the window the tests build (the fixtures allow 128)


def padded(ids: np.ndarray) -> np.ndarray:
    """Token ids right-padded to the model's window (causal: the padding changes no earlier logit)."""
    out = np.zeros((ids.shape[0], CONTEXT), np.int32)
    out[:, : ids.shape[1]] = ids
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_and_greedy_tokens_are_transformers(name):
    """Llama with grouped-query attention and Llama 3.1's rope scaling, a tied bfloat16 Llama in 4 shards, GPT-2
    (its Conv1D weights transposed, GELU's tanh form), Qwen2 (biases on q, k, v) and Mistral: the same logits as
    transformers (float32; measured 1.4e-6 to 4.2e-6 of the mean absolute logit, within 1e-5 of it: GPT-2's exact
    GELU in place of its tanh form lands 5e-5 away, the Llama without its rope scaling 1.1) and the same 20 greedy
    tokens from the cached decoder."""
    from hvdtrain.serving import decoding

    reference = np.load(FIXTURES / name / "reference.npz")
    model = models.from_pretrained(FIXTURES / name, context_length=CONTEXT)
    ids = reference["input_ids"]
    logits = model(padded(ids)).numpy()[:, : ids.shape[1]]
    scale = float(np.abs(reference["logits"]).mean())
    assert float(np.abs(logits - reference["logits"]).max()) < 1e-5 * scale
    greedy = decoding.sample_cached(model, [list(reference["greedy_prompt"][0])], 20, 0.0, 0, 0)[0]
    assert list(greedy) == reference["greedy"][0].tolist()


@pytest.mark.parametrize("adapter,base", [("llama-gqa-lora", "llama-gqa"), ("gpt2-lora", "gpt2")])
def test_a_peft_adapter_gives_pefts_logits(adapter, base):
    """PEFT's LoRA adapters over the fixtures (q, k, v, o of the Llama; GPT-2's fused c_attn with fan_in_fan_out):
    merged into the base, PEFT's logits; and the adapter does change them."""
    reference = np.load(FIXTURES / adapter / "reference.npz")
    model = models.from_pretrained(FIXTURES / base, context_length=CONTEXT, adapter=FIXTURES / adapter)
    ids = reference["input_ids"]
    logits = model(padded(ids)).numpy()[:, : ids.shape[1]]
    scale = float(np.abs(reference["logits"]).mean())
    assert float(np.abs(logits - reference["logits"]).max()) < 1e-5 * scale
    assert float(np.abs(reference["logits"] - reference["base_logits"]).max()) > 1e-3 * scale


def test_the_safetensors_reader_and_writer_agree_with_the_library(tmp_path):
    """Boxes of float32 and float16 tensors read by byte ranges equal the library's ``get_slice``; a file written
    one tensor at a time reads back in the library; bfloat16 (which the library's NumPy API cannot return) reads
    as the raw bytes say."""
    import ml_dtypes
    from safetensors import safe_open
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {"a": rng.normal(size=(40, 24)).astype(np.float32), "b": rng.normal(size=(16,)).astype(np.float16),
               "c": rng.normal(size=(6, 10)).astype(np.float32)}
    save_file(tensors, str(tmp_path / "lib.safetensors"))
    files = hub.LocalFiles(tmp_path)
    stored = hub.Weights.__new__(hub.Weights)
    stored.files, stored.stored = files, hub.read_header(files, "lib.safetensors")
    with safe_open(str(tmp_path / "lib.safetensors"), framework="numpy") as f:
        for start, size in [((0, 0), (40, 24)), ((10, 0), (20, 24)), ((0, 12), (40, 12)), ((5, 3), (7, 9))]:
            want = f.get_slice("a")[start[0]:start[0] + size[0], start[1]:start[1] + size[1]]
            assert np.array_equal(stored.read("a", (start, size)), want)
        assert np.array_equal(stored.read("b", ((4,), (8,))), f.get_slice("b")[4:12].astype(np.float32))
    specs = [("x", "F32", (3, 5)), ("y", "BF16", (4,)), ("z", "F16", (2, 2))]
    values = {"x": rng.normal(size=(3, 5)), "y": rng.normal(size=(4,)), "z": rng.normal(size=(2, 2))}
    with hub.SafetensorsWriter(tmp_path / "ours.safetensors", specs) as writer:
        for name, _, _ in specs:
            writer.write(name, values[name])
    with safe_open(str(tmp_path / "ours.safetensors"), framework="numpy") as f:
        assert sorted(f.keys()) == ["x", "y", "z"]
        assert np.array_equal(f.get_tensor("x"), values["x"].astype(np.float32))
        assert np.array_equal(f.get_tensor("z"), values["z"].astype(np.float16))
    ours = hub.read_header(hub.LocalFiles(tmp_path), "ours.safetensors")["y"]
    raw = (tmp_path / "ours.safetensors").read_bytes()[ours.start:ours.stop]
    assert np.array_equal(np.frombuffer(raw, ml_dtypes.bfloat16), values["y"].astype(ml_dtypes.bfloat16))


class Counting(hub.LocalFiles):
    """Local files that count the bytes read."""

    read_bytes = 0

    def read_range(self, name, start, stop):
        self.read_bytes += stop - start
        return super().read_range(name, start, stop)


def test_a_rank_reads_only_the_bytes_of_its_share():
    """Each tensor-parallel member's slices (heads, MLP units, vocabulary rows) equal the slices of the whole
    weights, and reading them costs about its share of the bytes (column slices read blocks of whole rows: small
    tensors here, so each is one block)."""
    from hvdtrain.distributed.sharded import Entry

    whole_files = Counting(FIXTURES / "llama-gqa")
    whole = hub.Checkpoint(whole_files, CONTEXT)
    plan = whole.plan()
    everything = {w.name: whole.read(plan, w.name) for w in plan.weights}
    rows_only = {w.name for w in plan.weights if w.split == 0 or w.split is None}
    shares = []
    for part in range(2):
        files = Counting(FIXTURES / "llama-gqa")
        checkpoint = hub.Checkpoint(files, CONTEXT)
        for w in plan.weights:
            split = w.split is not None
            entry = Entry(w.name, w.shape, w.split if split else None, part if split else 0, 2 if split else 1)
            start, size = entry.box()
            mine = checkpoint.read(plan, w.name, (start, size))
            assert np.array_equal(mine, everything[w.name][tuple(slice(a, a + n) for a, n in zip(start, size))])
        shares.append(files.read_bytes)
    assert all(s < 0.8 * whole_files.read_bytes for s in shares)
    assert rows_only  # (norms are read whole by every member: replicated)


def test_a_model_written_back_is_the_checkpoint_transformers_wrote(tmp_path):
    """hvdtrain's writer gives transformers' own files back: the same tensor names, shapes, dtypes and values, in
    float32 (GPT-2's fused c_attn assembled from query, key and value) and in bfloat16 over several shards (a
    tied Llama: no lm_head), with an index naming every tensor's file."""
    from safetensors import safe_open

    for name, dtype, shard in [("gpt2", "float32", 5 * 2**30), ("llama-tied-bf16", "bfloat16", 70_000)]:
        model = models.from_pretrained(FIXTURES / name, context_length=CONTEXT)
        out = tmp_path / name
        written = hub.save_pretrained(model, out, dtype=dtype, max_shard_bytes=shard)
        theirs = hub.Weights(hub.LocalFiles(FIXTURES / name))
        ours = hub.Weights(hub.LocalFiles(out))
        assert sorted(ours.stored) == sorted(theirs.stored)
        for tensor in theirs.stored:
            assert ours.shape(tensor) == theirs.shape(tensor) and ours.dtype(tensor) == theirs.dtype(tensor)
            assert np.array_equal(ours.read(tensor), theirs.read(tensor)), tensor
        if name == "llama-tied-bf16":
            assert hub.INDEX in written and len([w for w in written if w.startswith("model-")]) >= 3
            with safe_open(str(out / ours.stored["model.norm.weight"].file), framework="numpy") as f:
                assert "model.norm.weight" in f.keys()
        config, reference = json.loads((out / "config.json").read_text()), json.loads(
            (FIXTURES / name / "config.json").read_text())
        for key in ("architectures", "model_type", "vocab_size", "tie_word_embeddings"):
            assert config[key] == reference[key]
    # float16 (Qwen2's q/k/v biases too): read back within float16's rounding of transformers' logits
    model = models.from_pretrained(FIXTURES / "qwen2", context_length=CONTEXT)
    hub.save_pretrained(model, tmp_path / "half", dtype="float16")
    half = hub.Weights(hub.LocalFiles(tmp_path / "half"))
    assert {s.dtype for s in half.stored.values()} == {"F16"} and "model.layers.0.self_attn.q_proj.bias" in half
    reference = np.load(FIXTURES / "qwen2" / "reference.npz")
    logits = models.from_pretrained(tmp_path / "half", context_length=CONTEXT)(padded(reference["input_ids"]))
    assert np.abs(logits.numpy()[:, :12] - reference["logits"]).max() < 0.02 * np.abs(reference["logits"]).mean()


def test_checkpoints_that_cannot_be_read_give_one_line_each(tmp_path):
    """A missing shard, a shape that disagrees with config.json, an unsupported architecture, rope scaling or a
    quantized checkpoint, no weights at all: one line naming what is wrong."""
    def copy(name):
        target = tmp_path / name
        shutil.copytree(FIXTURES / name, target)
        return target

    def edit(folder, **changes):
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(changes)
        (folder / "config.json").write_text(json.dumps(cfg))

    def fails(folder, match, error=ModelFileError):
        with pytest.raises(error, match=match) as exc:
            formats.load_model(folder, context_length=CONTEXT)
        assert "\n" not in str(exc.value)

    sharded = copy("llama-tied-bf16")
    (sharded / "model-00002-of-00004.safetensors").unlink()
    fails(sharded, "model-00002-of-00004.safetensors is missing")
    wide = copy("gpt2")
    edit(wide, n_embd=128)
    fails(wide, r"transformer.wte.weight has shape \(384, 64\) in the checkpoint, but config.json says \(384, 128\)")
    other = copy("mistral")
    edit(other, architectures=["FalconForCausalLM"])
    fails(other, "architecture FalconForCausalLM is not supported; supported: GPT2LMHeadModel, LlamaForCausalLM")
    yarn = copy("llama-gqa")
    edit(yarn, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    fails(yarn, "rope scaling of type 'yarn' is not supported")
    edit(yarn, rope_parameters=None, quantization_config={"quant_method": "gptq"})
    fails(yarn, r"a quantized checkpoint \(gptq\) cannot be read")
    with pytest.raises(hub.PretrainedError, match="a gpt with untied embeddings has a logits layer with a bias"):
        hub.family_of("gpt").write_config({"tie_embeddings": False}, 256, 64)  # no GPT2LMHeadModel for it
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((FIXTURES / "gpt2" / "config.json").read_text())
    fails(empty, "has config.json but neither model.safetensors nor model.safetensors.index.json")


def test_the_checkpoints_config_decides_the_model_and_a_contradicting_set_is_an_error():
    """model.pretrained: the family, its sizes, the vocabulary and the tokenizer come from the checkpoint (the
    recipe's give way, each a note); a --set that contradicts them, a window longer than its positions, or a
    tokenizer larger than its embedding are one-line errors."""
    cfg = config.load("gpt-tiny", overrides=[f"model.pretrained={FIXTURES / 'llama-gqa'}"])
    assert cfg.model.name == "llama" and cfg.model.params["kv_heads"] == 2 and cfg.model.params["width"] == 64
    assert cfg.model.params["rope_scaling"]["rope_type"] == "llama3" and cfg.data.num_classes == 384
    assert cfg.data.tokenizer == str(FIXTURES / "llama-gqa" / "tokenizer.json")
    assert any(n.startswith("model.name: llama from the pretrained checkpoint, not gpt") for n in cfg.notes)
    assert "mlp_ratio" not in cfg.model.params  # the recipe's gpt parameters give way
    with pytest.raises(ConfigError, match=r"--set model.params.width=128 contradicts model.pretrained=.*says 64"):
        config.load("gpt-tiny", overrides=[f"model.pretrained={FIXTURES / 'llama-gqa'}", "model.params.width=128"])
    with pytest.raises(ConfigError, match="data.context_length=256 is longer than the pretrained model's 128"):
        config.load("llama-finetune", overrides=["data.context_length=256"])
    with pytest.raises(ConfigError, match="train.lora_rank adapts a pretrained model"):
        config.load("llama-tiny", overrides=["train.lora_rank=4"])
    with pytest.raises(ConfigError, match="'w_proj' is not a projection of the llama model; targets: q_proj"):
        config.load("llama-lora", overrides=["train.lora_targets=[w_proj]"])
    from hvdtrain.data import text

    with pytest.raises(DataError, match="has 384 tokens, more than the model's vocabulary of 256"):
        text.load("", 16, 0.05, 0.05, str(FIXTURES / "gpt2" / "tokenizer.json"), num_classes=256)


def test_published_tokenizers_say_why_they_stay_out_of_the_graph():
    """GPT-2's and Llama 3's regex pre-split cannot run in TensorFlow's graph (lookaheads), so the SavedModel keeps
    its token signatures; a byte-level BPE without it encodes in the graph exactly as tokenizers does."""
    import tensorflow as tf

    from hvdtrain.data import tokenizer as T

    for name, reason in [("gpt2", "a regex pre-split"), ("llama-gqa", "its pre-tokenizer is Sequence")]:
        with pytest.raises(DataError, match=reason):
            T.InGraph(T.make(str(FIXTURES / name / "tokenizer.json")))
    bpe = T.make(str(FIXTURES / "llama-tied-bf16" / "tokenizer.json"))
    graph = T.InGraph(bpe)
    text_in = "The for statement is used to iterate over the elements of a sequence."
    encode = tf.function(graph.encode, input_signature=[tf.TensorSpec([], tf.string)])
    assert encode(tf.constant(text_in)).numpy().tolist() == bpe.encode(text_in)
    # prompts take the tokenizer's template: Llama 3's begin-of-text first; training windows do not
    llama = T.load_beside(str(FIXTURES / "llama-gqa"))
    assert llama.encode("The", special=True)[0] == 0 and llama.encode("The")[0] != 0 and llama.eos == (1,)
