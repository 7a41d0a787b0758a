#!/usr/bin/env python3
"""Make small Hugging Face-format checkpoints and their reference outputs for hvdtrain's tests.

A one-off generator, run in the reference venv (scripts/reference/setup.sh makes it; PyTorch, transformers 5.x,
PEFT, tokenizers, safetensors, numpy):

    .venv-reference/bin/python scripts/reference/make_hf_fixtures.py [--output tests/fixtures/hf]

hvdtrain's tests (which have no PyTorch) read what it writes: each fixture directory is what transformers'
`save_pretrained` writes for a model (config.json, generation_config.json, model.safetensors or shards with
model.safetensors.index.json), the tokenizer as transformers saves it (tokenizer.json, tokenizer_config.json), and
reference.npz (input_ids, logits, greedy_prompt, greedy). Two more directories hold PEFT LoRA adapters over two of
the bases. README.md in the output directory says how they were made and what each holds.

Everything is made locally (no model hub): the tokenizers are trained with the `tokenizers` library on CPython's own
pydoc_data.topics, the models are built from configs with fixed seeds, and one (llama-gqa) is trained for a short
while on that text. Deterministic: fixed seeds, one intra-op thread (--threads), the same text (its SHA-256 is in the
README: it is the text of the Python that runs this, 3.11.7 here).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

# Python's string hashing is randomised per process, and PEFT writes target_modules (a set) in hash order: fix it,
# so that a second run writes the same bytes.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from pydoc_data.topics import topics  # noqa: E402
from safetensors import safe_open  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

REPO = Path(__file__).resolve().parents[2]

# Sizes shared by every fixture.
VOCAB = 384
HIDDEN = 64
LAYERS = 2
HEADS = 4  # head size 16
INTERMEDIATE = 128
MAX_POS = 128
SEQ = 12  # reference input length
PROMPT_LEN = 6
NEW_TOKENS = 20

# Qwen2's pre-tokenizer pattern: Llama 3's with single digits (transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3's pre-tokenizer pattern, as in its tokenizer.json.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # 64 rather than Llama 3.1's 8192 (and rather than 32): at head size 16 and theta 500000 the wavelengths are
    # 6.3, 32.4, 167, 862, ... positions; with 64 the bands are < 16 (kept), 16..64 (smoothed) and > 64 (divided by
    # 8), so each of the three branches of the formula acts on at least one frequency. With 32 none is smoothed.
    "original_max_position_embeddings": 64,
}

# Reference inputs: two sentences of the corpus (its line breaks read as spaces), and a prompt for greedy decoding.
SENTENCES = [
    "Assert statements are a convenient way to insert debugging assertions into a program:",
    "The value for the built-in variable is determined when the interpreter starts.",
]
PROMPT = "The current code generator emits no code for an assert statement"

# Training of llama-gqa.
TRAIN = dict(
    context=64,  # tokens per sequence, BOS first, then 63 consecutive tokens of the text
    batch=32,
    steps=2000,
    lr=3e-3,
    warmup=30,
    min_lr_ratio=0.1,  # cosine decay from lr to lr * min_lr_ratio after the warm-up
    weight_decay=0.01,
    betas=(0.9, 0.95),
    grad_clip=1.0,
    seed=1234,
)
VAL_FRACTION = 0.05

LORA_STD = 0.05


def log(msg: str) -> None:
    print(f"[fixtures] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# corpus and tokenizers


def corpus() -> str:
    return "\n\n".join(topics[k] for k in sorted(topics))


def split_corpus(text: str) -> tuple[str, str]:
    cut = int(len(text) * (1 - VAL_FRACTION))
    return text[:cut], text[cut:]


def train_tokenizer(kind: str, text: str) -> Tokenizer:
    """kind: 'llama3' (regex Split + ByteLevel without regex, BOS prepended), 'bytelevel' (ByteLevel without any
    regex pre-split, no post-processor), 'gpt2' (ByteLevel with GPT-2's regex)."""
    if kind == "llama3":
        tok = Tokenizer(models.BPE(ignore_merges=True))  # as Llama 3's tokenizer.json
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
            ]
        )
        specials = ["<|begin_of_text|>", "<|end_of_text|>"]
        items = [text]
    elif kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        specials = ["<|endoftext|>"]
        # with no pre-split, each training item is one "word": the paragraphs, so that merges cross spaces but the
        # trainer does not work on one 440 KB word
        items = [p for p in text.split("\n\n") if p]
    elif kind == "gpt2":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        specials = ["<|endoftext|>"]
        items = [text]
    elif kind == "qwen2":
        # what transformers' Qwen2Tokenizer builds (AutoTokenizer rebuilds any model_type "qwen2" tokenizer that
        # way from tokenizer.json's vocab and merges, whatever tokenizer_config.json declares): NFC, Qwen2's regex,
        # ByteLevel without regex, no post-processor, <|endoftext|> as EOS/PAD/UNK and no BOS
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        specials = ["<|endoftext|>"]
        items = [text]
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        assert QWEN2_PATTERN == PRETOKENIZE_REGEX, "transformers' Qwen2 pattern changed"
    else:
        raise ValueError(kind)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(items, trainer=trainer)
    if kind == "llama3":
        bos = "<|begin_of_text|>"
        bos_id = tok.token_to_id(bos)
        # as Llama 3's tokenizer.json: ByteLevel (offsets only) then BOS prepended
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
                processors.TemplateProcessing(
                    single=f"{bos}:0 $A:0",
                    pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                    special_tokens=[(bos, bos_id)],
                ),
            ]
        )
    assert tok.get_vocab_size() == VOCAB, (kind, tok.get_vocab_size())
    return tok


def hf_tokenizer(tok: Tokenizer, kind: str) -> PreTrainedTokenizerFast:
    if kind == "llama3":
        special = dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    elif kind == "gpt2":  # as GPT-2's: the one special token is BOS, EOS and UNK
        special = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    elif kind == "qwen2":  # as Qwen2's (base models): no BOS; EOS, PAD and UNK <|endoftext|>
        special = dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    else:
        special = dict(eos_token="<|endoftext|>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=MAX_POS, **special)


def special_ids(tok: Tokenizer, kind: str) -> tuple[int | None, int]:
    if kind == "llama3":
        return tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|end_of_text|>")
    eot = tok.token_to_id("<|endoftext|>")
    return (eot if kind in ("gpt2", "qwen2") else None), eot


def reference_ids(tok: Tokenizer, flat_text: str) -> tuple[np.ndarray, np.ndarray]:
    rows = []
    for s in SENTENCES:
        assert s in flat_text, s
        ids = tok.encode(s).ids
        assert len(ids) >= SEQ, (s, len(ids))
        rows.append(ids[:SEQ])
    assert PROMPT in flat_text
    prompt = tok.encode(PROMPT).ids
    assert len(prompt) >= PROMPT_LEN
    return np.asarray(rows, dtype=np.int32), np.asarray([prompt[:PROMPT_LEN]], dtype=np.int32)


# ---------------------------------------------------------------------------------------------------------------
# models


def seeded(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def perturb_(model: torch.nn.Module, seed: int, bias_std: float, norm_std: float) -> list[str]:
    """Makes every norm weight 1 + N(0, norm_std), every norm bias and every Linear/Conv1D bias N(0, bias_std), so
    that the references exercise them (the initialisation leaves them at 1 and 0). Returns what it changed."""
    g = torch.Generator().manual_seed(seed)
    changed = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            is_norm = any(k in name for k in ("norm", "ln_"))
            if is_norm and leaf == "weight":
                p.copy_(1.0 + norm_std * torch.randn(p.shape, generator=g))
                changed.append(name)
            elif leaf == "bias":
                p.copy_(bias_std * torch.randn(p.shape, generator=g))
                changed.append(name)
    return changed


def save_fixture(model, hf_tok, out: Path, **save_kwargs) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.save_pretrained(out, **save_kwargs)
    hf_tok.save_pretrained(out)


def load_f32(path: Path):
    # transformers 5 calls the argument `dtype`; `torch_dtype` is its deprecated alias (same behaviour, a warning)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


@torch.no_grad()
def logits_of(model, ids: np.ndarray) -> np.ndarray:
    return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


@torch.no_grad()
def greedy_of(model, prompt: np.ndarray) -> tuple[np.ndarray, float]:
    """20 new tokens of greedy decoding with EOS stopping disabled; checked against a plain argmax loop."""
    p = torch.as_tensor(prompt, dtype=torch.long)
    out = model.generate(
        p,
        attention_mask=torch.ones_like(p),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        eos_token_id=None,  # applied last by generate(): no stopping criterion on EOS, no EOS logit processor
        pad_token_id=0,  # unused (one row, no stopping); set to silence the "setting pad to eos" notice
    )
    new = out[:, p.shape[1] :].numpy().astype(np.int32)
    assert new.shape == (1, NEW_TOKENS), new.shape
    # the same by hand: full forward pass each step, argmax of the last position's logits, no processors
    ids, margins = p, []
    for _ in range(NEW_TOKENS):
        last = model(ids).logits[:, -1]
        top2 = last.topk(2, dim=-1).values
        margins.append(float((top2[:, 0] - top2[:, 1]).min()))
        ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
    manual = ids[:, p.shape[1] :].numpy().astype(np.int32)
    assert np.array_equal(new, manual), (new, manual)
    # the smallest gap between the best and second-best logit over the 20 steps: how far from a tie greedy is
    return new, min(margins)


def tensor_listing(path: Path) -> list[tuple[str, str, list[int], str]]:
    rows = []
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as sf:
            for k in sorted(sf.keys()):
                sl = sf.get_slice(k)
                rows.append((f.name, k, list(sl.get_shape()), sl.get_dtype()))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# llama-gqa training


def windows_for_eval(ids: np.ndarray, bos: int, context: int) -> torch.Tensor:
    n = context - 1
    k = len(ids) // n
    w = ids[: k * n].reshape(k, n)
    return torch.as_tensor(np.concatenate([np.full((k, 1), bos), w], axis=1), dtype=torch.long)


@torch.no_grad()
def eval_loss(model, windows: torch.Tensor) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), 64):
        x = windows[i : i + 64]
        logits = model(x).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += x[:, 1:].numel()
    return total / count


def train_llama(model, tok: Tokenizer, train_text: str, val_text: str, bos: int) -> dict:
    cfg = TRAIN
    train_ids = np.asarray(tok.encode(train_text, add_special_tokens=False).ids, dtype=np.int64)
    val_ids = np.asarray(tok.encode(val_text, add_special_tokens=False).ids, dtype=np.int64)
    val_windows = windows_for_eval(val_ids, bos, cfg["context"])
    train_eval = windows_for_eval(train_ids[: len(val_ids)], bos, cfg["context"])  # a same-size slice of the train text
    before = eval_loss(model, val_windows)
    before_train = eval_loss(model, train_eval)
    log(f"llama-gqa: {len(train_ids)} training tokens, {len(val_ids)} validation tokens ({len(val_windows)} "
        f"windows); validation loss before training {before:.4f} (ln {VOCAB} = {math.log(VOCAB):.4f})")

    g = torch.Generator().manual_seed(cfg["seed"])
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg["lr"], betas=cfg["betas"],
    )

    def lr_at(step: int) -> float:
        if step < cfg["warmup"]:
            return cfg["lr"] * (step + 1) / cfg["warmup"]
        t = (step - cfg["warmup"]) / max(1, cfg["steps"] - cfg["warmup"])
        lo = cfg["lr"] * cfg["min_lr_ratio"]
        return lo + 0.5 * (cfg["lr"] - lo) * (1 + math.cos(math.pi * t))

    n = cfg["context"] - 1
    bos_col = torch.full((cfg["batch"], 1), bos, dtype=torch.long)
    data = torch.as_tensor(train_ids)
    t0 = time.time()
    model.train()
    losses, curve = [], []
    for step in range(cfg["steps"]):
        starts = torch.randint(0, len(data) - n, (cfg["batch"],), generator=g)
        x = torch.cat([bos_col, torch.stack([data[s : s + n] for s in starts.tolist()])], dim=1)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        out = model(input_ids=x, labels=x)  # transformers shifts the labels: next-token cross-entropy
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        losses.append(out.loss.item())
        if (step + 1) % 250 == 0:
            curve.append((step + 1, float(np.mean(losses[-250:])), eval_loss(model, val_windows)))
            model.train()
            log(f"llama-gqa: step {step + 1}/{cfg['steps']}: train loss (mean of the last 250) {curve[-1][1]:.4f}, "
                f"validation loss {curve[-1][2]:.4f}, {time.time() - t0:.0f} s")
    seconds = time.time() - t0
    model.eval()
    after = eval_loss(model, val_windows)
    after_train = eval_loss(model, train_eval)
    log(f"llama-gqa: validation loss after training {after:.4f} ({seconds:.0f} s)")
    return dict(
        train_tokens=int(len(train_ids)),
        val_tokens=int(len(val_ids)),
        val_windows=int(len(val_windows)),
        val_loss_before=before,
        val_loss_after=after,
        train_slice_loss_before=before_train,
        train_slice_loss_after=after_train,
        curve=curve,
        seconds=seconds,
    )


# ---------------------------------------------------------------------------------------------------------------
# rope


def llama3_frequencies(cfg: LlamaConfig) -> list[dict]:
    """Which rotary frequencies the llama3 scaling changes, from transformers' own function."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg)
    head = cfg.head_dim
    base = cfg.rope_parameters["rope_theta"]
    plain = 1.0 / (base ** (torch.arange(0, head, 2, dtype=torch.int64).float() / head))
    rp = cfg.rope_parameters
    lo_w = rp["original_max_position_embeddings"] / rp["low_freq_factor"]
    hi_w = rp["original_max_position_embeddings"] / rp["high_freq_factor"]
    rows = []
    for i, (a, b) in enumerate(zip(plain.tolist(), scaled.tolist())):
        wl = 2 * math.pi / a
        regime = "unchanged (wavelength < %g)" % hi_w if wl < hi_w else (
            "divided by factor (wavelength > %g)" % lo_w if wl > lo_w else "smoothed (between)")
        rows.append(dict(i=i, inv_freq=a, wavelength=wl, scaled_inv_freq=b, ratio=b / a, regime=regime))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# fixtures


def write_reference(out: Path, model_dir: Path, tok: Tokenizer, flat_text: str) -> dict:
    ids, prompt = reference_ids(tok, flat_text)
    model = load_f32(model_dir)
    logits = logits_of(model, ids)
    greedy, margin = greedy_of(model, prompt)
    # eager attention as a cross-check of the default (sdpa) path
    eager = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    eager_diff = float(np.abs(logits_of(eager, ids) - logits).max())
    np.savez(out / "reference.npz", input_ids=ids, logits=logits.astype(np.float32), greedy_prompt=prompt,
             greedy=greedy)
    return dict(
        attn_implementation=model.config._attn_implementation,
        eager_vs_default_max_abs=eager_diff,
        logits_mean_abs=float(np.abs(logits).mean()),
        logits_std=float(logits.std()),
        input_ids=ids.tolist(),
        greedy_prompt=prompt.tolist(),
        greedy=greedy.tolist(),
        greedy_min_top2_margin=margin,
        greedy_text=tok.decode(greedy[0].tolist(), skip_special_tokens=False),
        loaded_dtype=str(model.dtype),
    )


TOKENIZER_PROBES = [
    SENTENCES[0] + " " + SENTENCES[1],
    "H\u00e9llo  w\u00f6rld 12345 \u2014 na\u00efve caf\u00e9\n\n  x = 3.14159;\tdone\r\n",
    "decomposed e\u0301 and composed \u00e9, ligature \ufb01, fullwidth \uff21, emoji \U0001f600",
    "   leading and trailing spaces   ",
    "it's they'll WE'RE don't 1234567 (a[b]){c} <|endoftext|> <|end_of_text|>",
]


def check_tokenizer_roundtrip(out: Path, tok: Tokenizer) -> dict:
    """The tokenizer as transformers saved it encodes like the one trained, and so does AutoTokenizer."""
    saved = Tokenizer.from_file(str(out / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(out)
    for sample in TOKENIZER_PROBES:
        a, b, c = tok.encode(sample).ids, saved.encode(sample).ids, auto(sample)["input_ids"]
        assert a == b == c, (out.name, sample, a, b, c)
        for skip in (False, True):  # (the two libraries' defaults differ: transformers False, tokenizers True)
            da, db = auto.decode(c, skip_special_tokens=skip), saved.decode(b, skip_special_tokens=skip)
            assert da == db, (out.name, sample, skip, da, db)
    assert len(auto) == saved.get_vocab_size() == VOCAB, (out.name, len(auto), saved.get_vocab_size())
    return dict(auto_class=type(auto).__name__, probes_equal=len(TOKENIZER_PROBES), auto_len=len(auto))


def make_lora(name: str, base_dir: Path, out: Path, target_modules: list[str], seed: int, base_ref: Path) -> dict:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rel_base = os.path.relpath(base_dir, out)
    # base loaded by its path relative to the adapter directory, so that PEFT records that relative path
    with chdir(out):
        base = AutoModelForCausalLM.from_pretrained(rel_base, dtype=torch.float32).eval()
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=target_modules, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed)
    names = []
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.copy_(LORA_STD * torch.randn(p.shape, generator=g))
                names.append(n)
    model.eval()
    ref = np.load(base_ref)
    ids = ref["input_ids"]
    base_logits = ref["logits"]
    with chdir(out):  # PEFT reads the base's config through base_model_name_or_path when saving
        model.save_pretrained(".")
    # references from the saved adapter over a freshly loaded base: what a user of the files gets
    fresh = PeftModel.from_pretrained(load_f32(base_dir), out).eval()
    logits = logits_of(fresh, ids)
    in_memory = logits_of(model, ids)
    merged = fresh.merge_and_unload().eval()
    merged_logits = logits_of(merged, ids)
    np.savez(out / "reference.npz", input_ids=ids, logits=logits, merged_logits=merged_logits, base_logits=base_logits)
    return dict(
        lora_params=len(names),
        fan_in_fan_out=bool(model.peft_config["default"].fan_in_fan_out),
        scaling=float(next(
            m.scaling["default"] for m in model.modules() if isinstance(getattr(m, "scaling", None), dict))),
        unmerged_vs_merged_max_abs=float(np.abs(logits - merged_logits).max()),
        saved_vs_in_memory_max_abs=float(np.abs(logits - in_memory).max()),
        adapter_vs_base_max_abs=float(np.abs(logits - base_logits).max()),
        adapter_vs_base_mean_abs=float(np.abs(logits - base_logits).mean()),
        logits_mean_abs=float(np.abs(logits).mean()),
        base_model_name_or_path=json.loads((out / "adapter_config.json").read_text()).get("base_model_name_or_path"),
    )


@contextmanager
def chdir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def llama_common(**kw) -> dict:
    return dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=MAX_POS, **kw,
    )


def dtype_experiment(bf16_dir: Path, reference: Path) -> dict:
    """Does from_pretrained load a directory whose config says float32 but whose safetensors are bfloat16?"""
    res = {}
    ref = np.load(reference)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "m"
        shutil.copytree(bf16_dir, d)
        saved = json.loads((d / "config.json").read_text())
        res["config_dtype_key_written"] = [k for k in ("dtype", "torch_dtype") if k in saved]
        # as saved (config says bfloat16), no dtype argument: transformers 5 defaults to dtype="auto"
        m = AutoModelForCausalLM.from_pretrained(d).eval()
        res["config_bf16/no_dtype_arg"] = dict(loads=True, dtype=str(m.dtype))
        variants = {
            "config_dtype_float32": {"dtype": "float32"},
            "config_torch_dtype_float32": {"torch_dtype": "float32"},  # the 4.x key
            "config_without_dtype": {},
        }
        for vname, extra in variants.items():
            cfg = {k: v for k, v in saved.items() if k not in ("dtype", "torch_dtype")}
            cfg.update(extra)
            (d / "config.json").write_text(json.dumps(cfg, indent=2))
            for label, kwargs in (("no_dtype_arg", {}), ("dtype_float32", {"dtype": torch.float32}),
                                  ("dtype_auto", {"dtype": "auto"})):
                try:
                    m = AutoModelForCausalLM.from_pretrained(d, **kwargs).eval()
                    diff = float(np.abs(logits_of(m, ref["input_ids"]) - ref["logits"]).max())
                    res[f"{vname}/{label}"] = dict(loads=True, dtype=str(m.dtype), max_abs_vs_reference=diff)
                except Exception as e:  # noqa: BLE001
                    res[f"{vname}/{label}"] = dict(loads=False, error=f"{type(e).__name__}: {e}"[:300])
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default=str(REPO / "tests" / "fixtures" / "hf"))
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: the same numbers everywhere)")
    args = ap.parse_args()
    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    root = Path(args.output).resolve()
    root.mkdir(parents=True, exist_ok=True)
    facts: dict = {"fixtures": {}}

    text = corpus()
    flat = " ".join(text.split())
    train_text, val_text = split_corpus(text)
    facts["corpus"] = dict(
        chars=len(text), sha256=hashlib.sha256(text.encode()).hexdigest(), python=platform.python_version(),
        train_chars=len(train_text), val_chars=len(val_text),
    )
    log(f"corpus: {len(text)} characters of pydoc_data.topics (Python {platform.python_version()}), "
        f"sha256 {facts['corpus']['sha256'][:16]}...; tokenizers trained on the first {len(train_text)}")

    toks = {k: train_tokenizer(k, train_text) for k in ("llama3", "bytelevel", "gpt2", "qwen2")}
    hf_toks = {k: hf_tokenizer(t, k) for k, t in toks.items()}

    # 1. llama-gqa: trained
    name = "llama-gqa"
    bos, eos = special_ids(toks["llama3"], "llama3")
    cfg = LlamaConfig(**llama_common(
        num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE), bos_token_id=bos, eos_token_id=eos,
    ))
    seeded(1)
    model = LlamaForCausalLM(cfg)
    facts["llama3_rope"] = llama3_frequencies(cfg)
    facts["training"] = train_llama(model, toks["llama3"], train_text, val_text, bos)
    save_fixture(model, hf_toks["llama3"], root / name)
    facts["fixtures"][name] = write_reference(root / name, root / name, toks["llama3"], flat)
    facts["fixtures"][name]["tokenizer"] = check_tokenizer_roundtrip(root / name, toks["llama3"])
    log(f"{name}: done")

    # 2. llama-tied-bf16: random, larger init, bfloat16 in shards
    name = "llama-tied-bf16"
    bos, eos = special_ids(toks["bytelevel"], "bytelevel")
    cfg = LlamaConfig(**llama_common(
        num_key_value_heads=4, rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=10000.0,
        bos_token_id=bos, eos_token_id=eos, initializer_range=0.1,
    ))
    seeded(2)
    model = LlamaForCausalLM(cfg)
    perturbed = perturb_(model, 2, bias_std=0.02, norm_std=0.1)
    model = model.to(torch.bfloat16)
    save_fixture(model, hf_toks["bytelevel"], root / name, max_shard_size="70KB")
    facts["fixtures"][name] = write_reference(root / name, root / name, toks["bytelevel"], flat)
    facts["fixtures"][name]["perturbed"] = perturbed
    facts["fixtures"][name]["tokenizer"] = check_tokenizer_roundtrip(root / name, toks["bytelevel"])
    log(f"{name}: done")

    # 3. gpt2: GPT-2's init, then non-zero biases and LayerNorm parameters
    name = "gpt2"
    bos, eos = special_ids(toks["gpt2"], "gpt2")
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=MAX_POS,
        activation_function="gelu_new", bos_token_id=bos, eos_token_id=eos,
    )
    seeded(3)
    model = GPT2LMHeadModel(cfg)
    perturbed = perturb_(model, 3, bias_std=0.02, norm_std=0.1)
    save_fixture(model, hf_toks["gpt2"], root / name)
    facts["fixtures"][name] = write_reference(root / name, root / name, toks["gpt2"], flat)
    facts["fixtures"][name]["perturbed"] = perturbed
    facts["fixtures"][name]["tokenizer"] = check_tokenizer_roundtrip(root / name, toks["gpt2"])
    log(f"{name}: done")

    # 4. qwen2: random, q/k/v biases filled
    name = "qwen2"
    bos, eos = special_ids(toks["qwen2"], "qwen2")  # both <|endoftext|>, as Qwen2's config.json
    cfg = Qwen2Config(**llama_common(
        num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=False, rope_theta=1000000.0,
        rms_norm_eps=1e-6, bos_token_id=bos, eos_token_id=eos, initializer_range=0.1,
    ))
    seeded(4)
    model = Qwen2ForCausalLM(cfg)
    qkv_bias_zero_at_init = all(
        float(p.detach().abs().max()) == 0.0 for n, p in model.named_parameters() if n.endswith("_proj.bias"))
    perturbed = perturb_(model, 4, bias_std=0.1, norm_std=0.1)
    save_fixture(model, hf_toks["qwen2"], root / name)
    facts["fixtures"][name] = write_reference(root / name, root / name, toks["qwen2"], flat)
    facts["fixtures"][name]["qkv_bias_zero_at_init"] = qkv_bias_zero_at_init
    facts["fixtures"][name]["perturbed"] = perturbed
    facts["fixtures"][name]["tokenizer"] = check_tokenizer_roundtrip(root / name, toks["qwen2"])
    log(f"{name}: done")

    # 5. mistral: random, untied, sliding window larger than any context
    name = "mistral"
    bos, eos = special_ids(toks["llama3"], "llama3")
    cfg = MistralConfig(**llama_common(
        num_key_value_heads=2, sliding_window=4096, tie_word_embeddings=False, rope_theta=10000.0,
        rms_norm_eps=1e-5, bos_token_id=bos, eos_token_id=eos, initializer_range=0.1, head_dim=HIDDEN // HEADS,
    ))
    seeded(5)
    model = MistralForCausalLM(cfg)
    perturbed = perturb_(model, 5, bias_std=0.02, norm_std=0.1)
    save_fixture(model, hf_toks["llama3"], root / name)
    facts["fixtures"][name] = write_reference(root / name, root / name, toks["llama3"], flat)
    facts["fixtures"][name]["perturbed"] = perturbed
    facts["fixtures"][name]["tokenizer"] = check_tokenizer_roundtrip(root / name, toks["llama3"])
    log(f"{name}: done")

    # 6, 7. LoRA adapters
    facts["fixtures"]["llama-gqa-lora"] = make_lora(
        "llama-gqa-lora", root / "llama-gqa", root / "llama-gqa-lora", ["q_proj", "k_proj", "v_proj", "o_proj"], 6,
        root / "llama-gqa" / "reference.npz")
    log("llama-gqa-lora: done")
    facts["fixtures"]["gpt2-lora"] = make_lora(
        "gpt2-lora", root / "gpt2", root / "gpt2-lora", ["c_attn"], 7, root / "gpt2" / "reference.npz")
    log("gpt2-lora: done")

    facts["dtype_experiment"] = dtype_experiment(root / "llama-tied-bf16", root / "llama-tied-bf16" / "reference.npz")
    facts["seconds"] = time.time() - t_start
    facts["versions"] = versions()
    facts["threads"] = args.threads
    write_readme(root, facts)
    # the facts behind the README, for whoever writes the tests (not a fixture: regenerated every run)
    (root / "facts.json").write_text(json.dumps(facts, indent=2, default=str) + "\n")
    log(f"done in {facts['seconds']:.0f} s; {dir_size(root) / 1024:.0f} KiB in {root}")
    return 0


def versions() -> dict:
    import importlib.metadata as md

    v = {"python": platform.python_version()}
    for d in ("torch", "transformers", "peft", "tokenizers", "safetensors", "numpy", "huggingface_hub"):
        v[d] = md.version(d)
    return v


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------------------------
# README


def _wrap(text: str, indent: str = "") -> str:
    """One paragraph or list item, wrapped at 116 columns (list items' continuation lines indented)."""
    first = indent
    rest = indent + ("  " if text.startswith("- ") else "")
    return textwrap.fill(text, width=116, initial_indent=first, subsequent_indent=rest,
                         break_long_words=False, break_on_hyphens=False)


def write_readme(root: Path, facts: dict) -> None:
    v = facts["versions"]
    tr = facts["training"]
    fx = facts["fixtures"]
    c = facts["corpus"]
    t = TRAIN
    out: list[str] = []

    def para(*texts: str) -> None:  # paragraphs (a blank line after each) and list items (none between), wrapped
        for i, x in enumerate(texts):
            out.append(_wrap(x))
            nxt = texts[i + 1] if i + 1 < len(texts) else ""
            if not (x.startswith("- ") and nxt.startswith("- ")):
                out.append("")

    def raw(*lines: str) -> None:  # tables, code: as they are
        out.extend(lines)
        out.append("")

    n_shards = len(list((root / "llama-tied-bf16").glob("model-*.safetensors")))
    raw("# Hugging Face reference fixtures")
    para("Small checkpoints in Hugging Face format, with reference outputs computed by PyTorch + transformers + PEFT, "
         "for hvdtrain's tests, which have no PyTorch: they read these files with safetensors, tokenizers and numpy "
         "and compare. Generated, not edited by hand. To make them all again:")
    raw("```sh",
        "bash scripts/reference/setup.sh   # .venv-reference: torch 2.13.0 (CPU), transformers 5.x, peft, ...",
        ".venv-reference/bin/python scripts/reference/make_hf_fixtures.py --output tests/fixtures/hf",
        "```")
    para("To check an export of hvdtrain's against transformers: `.venv-reference/bin/python "
         "scripts/reference/check_export.py --model DIR [--adapter ADAPTER_DIR] --inputs FILE.npz --tolerance 1e-4`.")

    raw("## Made with")
    para(f"Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
         f"tokenizers {v['tokenizers']}, safetensors {v['safetensors']}, numpy {v['numpy']} (huggingface_hub "
         f"{v['huggingface_hub']}); {facts['threads']} intra-op thread, `torch.use_deterministic_algorithms(True)`, "
         f"PYTHONHASHSEED=0; {facts['seconds']:.0f} s in all on a machine of 2 shared CPU cores. Two runs write the "
         "same bytes (all but this README's timings and facts.json).",
         f"Text: CPython's `pydoc_data.topics` (Python {c['python']}), "
         "`\"\\n\\n\".join(topics[k] for k in sorted(topics))`: "
         f"{c['chars']} characters, SHA-256 `{c['sha256']}` (another Python release ships other text, and would give "
         f"other tokenizers and weights). The first 95% ({c['train_chars']} characters) trains the tokenizers and "
         f"llama-gqa; the last 5% ({c['val_chars']} characters) is llama-gqa's validation text.",
         "Every fixture: hidden size 64, 2 layers, 4 attention heads (head size 16), MLP intermediate size 128 "
         "(gpt2: GPT-2's `n_inner=null`, so 4 x 64 = 256), vocabulary 384 (each tokenizer trained with "
         "`vocab_size=384`, its special tokens included), 128 positions.")

    raw("## reference.npz")
    para("- `input_ids`: int32 (2, 12): the first 12 ids of each of two sentences of the text (its line breaks read "
         "as spaces), encoded with the fixture's own tokenizer, its post-processor included (the Llama-3-style ones "
         "start with `<|begin_of_text|>`), no padding: " + " and ".join(f"`{s}`" for s in SENTENCES) + ".",
         "- `logits`: float32 (2, 12, 384): `model(input_ids).logits` with the model loaded by "
         "`AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float32)` (`torch_dtype` is the deprecated name "
         "of `dtype` in transformers 5), `model.eval()`, no attention mask, the default attention implementation "
         f"(`{fx['llama-gqa']['attn_implementation']}`). llama-tied-bf16's bfloat16 weights are upcast on loading "
         "and computed in float32.",
         f"- `greedy_prompt`: int32 (1, 6): the first 6 ids of `{PROMPT}`; `greedy`: int32 (1, 20): the 20 new ids "
         "of `model.generate(prompt, attention_mask=ones, max_new_tokens=20, do_sample=False, "
         "eos_token_id=None)`. Exactly 20: `generate()` applies the `eos_token_id=None` argument after the model's "
         "generation_config, so there is no EOS stopping criterion and no EOS logit processor; and checked: the "
         "script asserts 20 new ids and that they equal a plain loop of full forward passes taking the argmax of "
         "the last position's logits (no cache, no logit processor).")
    para("The LoRA directories' reference.npz: `input_ids` (the base's), `logits` (float32 (2, 12, 384): the "
         "PeftModel, unmerged, as `PeftModel.from_pretrained(base, adapter_dir)` makes it from the saved files), "
         "`merged_logits` (after `merge_and_unload()`) and `base_logits` (the base's `logits`, for convenience).")

    raw("## Fixtures")
    para("Each model directory holds what `save_pretrained` wrote (`config.json`, `generation_config.json`, the "
         "safetensors) and what `PreTrainedTokenizerFast(tokenizer_object=..., bos_token=..., eos_token=...)` "
         "then `save_pretrained` wrote (`tokenizer.json`, `tokenizer_config.json`), plus `reference.npz`. For "
         "each, the script checks that `AutoTokenizer.from_pretrained(dir)`, "
         "`tokenizers.Tokenizer.from_file(dir/tokenizer.json)` and the tokenizer as trained encode "
         f"{len(TOKENIZER_PROBES)} probe strings (accents composed and not, digits, CRLF, emoji, special tokens "
         "in the text) to the same ids and decode them alike, and that AutoTokenizer has 384 tokens. `eager vs "
         "default`: max abs difference between the reference logits and `attn_implementation=\"eager\"`'s. "
         "`greedy margin`: the smallest gap between the best and the second-best logit over the 20 greedy steps "
         "(how far from a tie the greedy reference is; a float32 reimplementation differs by about 1e-6).")
    rows = [
        ("llama-gqa", "LlamaForCausalLM, 2 KV heads (GQA), rope_theta 500000 with llama3 scaling, untied",
         "float32, `model.safetensors`; trained (below)", "Llama-3 style"),
        ("llama-tied-bf16", "LlamaForCausalLM, 4 KV heads, rope_theta 10000 unscaled, tied embeddings",
         f"bfloat16, {n_shards} shards + `model.safetensors.index.json`; random", "byte-level BPE, no regex"),
        ("gpt2", "GPT2LMHeadModel (tied), gelu_new", "float32, `model.safetensors`; random (GPT-2 init)",
         "GPT-2 style"),
        ("qwen2", "Qwen2ForCausalLM, q/k/v biases, 2 KV heads, tied, rope_theta 1e6, no sliding window",
         "float32, `model.safetensors`; random", "Qwen2 style"),
        ("mistral", "MistralForCausalLM, 2 KV heads, sliding_window 4096, untied",
         "float32, `model.safetensors`; random", "Llama-3 style (llama-gqa's)"),
    ]
    table = ["| directory | model | weights | tokenizer | mean abs logit | eager vs default | greedy margin |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for d, m, wt, tk in rows:
        f = fx[d]
        table.append(f"| `{d}/` | {m} | {wt} | {tk} | {f['logits_mean_abs']:.4f} | "
                     f"{f['eager_vs_default_max_abs']:.1e} | {f['greedy_min_top2_margin']:.3g} |")
    for d, base, tm in (("llama-gqa-lora", "llama-gqa", "q_proj, k_proj, v_proj, o_proj"),
                        ("gpt2-lora", "gpt2", "c_attn")):
        f = fx[d]
        table.append(f"| `{d}/` | PEFT LoRA over `{base}/`: r=4, lora_alpha=8 (scaling {f['scaling']:g}), {tm} | "
                     f"`adapter_model.safetensors`; random A and B | (the base's) | {f['logits_mean_abs']:.4f} | | |")
    raw(*table)

    raw("### Tokenizers")
    para("All byte-level BPE, `BpeTrainer(vocab_size=384, initial_alphabet=ByteLevel.alphabet(), "
         "special_tokens=...)` (ids 0.. are the special tokens, then the 256 byte symbols, then 126 or 127 merges), "
         "ByteLevel decoder.")
    para("- Llama-3 style (llama-gqa, mistral): `BPE(ignore_merges=True)`; pre-tokenizer `Sequence[Split(Llama 3's "
         "regex, isolated), ByteLevel(add_prefix_space=False, use_regex=False)]`; post-processor "
         "`Sequence[ByteLevel, TemplateProcessing(\"<|begin_of_text|> $A\")]` (BOS prepended) as Llama 3's "
         "tokenizer.json; special tokens `<|begin_of_text|>` = 0 (BOS), `<|end_of_text|>` = 1 (EOS).",
         "- Qwen2 style (qwen2): `normalizers.NFC()`; pre-tokenizer `Sequence[Split(Qwen2's regex: Llama 3's with "
         "`\\p{N}` instead of `\\p{N}{1,3}`, isolated), ByteLevel(add_prefix_space=False, use_regex=False)]`; no "
         "post-processor; `<|endoftext|>` = 0 (EOS, PAD and UNK; no BOS), as Qwen2's base models. Not llama-gqa's "
         "tokenizer: transformers 5's AutoTokenizer does not use tokenizer.json's pipeline for `model_type` "
         "\"qwen2\" (which is in `MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS`): it builds `Qwen2Tokenizer` from "
         "tokenizer.json's vocab and merges with the normalizer, pre-tokenizer and special tokens above, whatever "
         "`tokenizer_class` says. Given the Llama-3-style tokenizer it dropped the `{1,3}` digit grouping and "
         "`ignore_merges`, added NFC, and added `<|endoftext|>` as a 385th token; given this one it encodes as "
         "tokenizer.json does.",
         "- llama-tied-bf16: `ByteLevel(add_prefix_space=False, use_regex=False)` alone (merges may cross spaces; "
         "trained on the paragraphs as separate items), no post-processor; `<|endoftext|>` = 0 (EOS; no BOS).",
         "- gpt2: `ByteLevel(add_prefix_space=False, use_regex=True)` (GPT-2's regex), no post-processor; "
         "`<|endoftext|>` = 0, which is BOS, EOS and UNK as in GPT-2.")

    raw("### llama-gqa: training")
    para("From a seeded random init (`torch.manual_seed(1)`, initializer_range 0.02), next-token cross-entropy on "
         f"the first 95% of the text ({tr['train_tokens']} tokens): {t['steps']} steps of AdamW (lr {t['lr']}, "
         f"betas {t['betas']}, weight decay {t['weight_decay']} on matrices only, {t['warmup']} linear warm-up "
         f"steps then cosine decay to {t['lr'] * t['min_lr_ratio']:g}, gradient clipping at {t['grad_clip']}), "
         f"batch {t['batch']} x context {t['context']} (each sequence `<|begin_of_text|>` then 63 consecutive "
         f"tokens from a random offset; `torch.Generator` seeded {t['seed']}), float32, {facts['threads']} thread: "
         f"{tr['seconds']:.0f} s. Validation: the last 5% of the text, {tr['val_tokens']} tokens in "
         f"{tr['val_windows']} windows of BOS + 63 tokens, mean loss per predicted token.")
    raw("| | validation loss | a training-text slice of the same size |",
        "| --- | --- | --- |",
        f"| before training | {tr['val_loss_before']:.4f} | {tr['train_slice_loss_before']:.4f} |",
        f"| after training | {tr['val_loss_after']:.4f} | {tr['train_slice_loss_after']:.4f} |")
    para(f"(ln 384 = {math.log(VOCAB):.4f}.) On the way (training loss: mean of the previous 250 steps): " + "; ".join(
        f"step {a}: {b:.3f}, validation {c_:.3f}" for a, b, c_ in tr["curve"]) + ". Its greedy continuation of "
        "the prompt (`greedy` decoded, as a JSON string):")
    raw("```", json.dumps(fx["llama-gqa"]["greedy_text"]), "```")

    raw("### llama-gqa: rope scaling")
    para("Given to `LlamaConfig` as `rope_theta=500000.0, rope_scaling=" + json.dumps(LLAMA3_ROPE) + "`; "
         "transformers 5 writes them as one `rope_parameters` dict with `rope_theta` inside (not 4.x's "
         "`rope_theta` + `rope_scaling`; it reads both). `original_max_position_embeddings` is 64 so that all "
         "three branches of the llama3 formula act: with 32, the wavelength-32.4 frequency would be divided by 8 "
         "like the lower ones and none smoothed. At head size 16, the 8 frequencies, from transformers' own "
         "`_compute_llama3_parameters`:")
    table = ["| i | inv_freq | wavelength | scaled inv_freq | ratio | |", "| --- | --- | --- | --- | --- | --- |"]
    for r in facts["llama3_rope"]:
        table.append(f"| {r['i']} | {r['inv_freq']:.6g} | {r['wavelength']:.6g} | {r['scaled_inv_freq']:.6g} | "
                     f"{r['ratio']:.4f} | {r['regime']} |")
    raw(*table)

    raw("### Initialisation of the random fixtures")
    para("Seeded (`torch.manual_seed`: llama-tied-bf16 2, gpt2 3, qwen2 4, mistral 5), then transformers' own init. "
         "Then, so that the references exercise every parameter: every norm weight set to 1 + N(0, 0.1), every "
         "bias (norm and projection; only gpt2 and qwen2 have biases) to N(0, 0.02), except qwen2's q/k/v biases: "
         "N(0, 0.1) (transformers' init leaves them at zero: checked, "
         + ("all zero" if fx["qwen2"]["qkv_bias_zero_at_init"] else "NOT all zero") + "); seeded generators 2, 3, "
         "4, 5. llama-tied-bf16, qwen2 and mistral use `initializer_range=0.1` (recorded in config.json) instead "
         "of 0.02, so that their logits are of order 1 and their attention is not near-uniform; gpt2 keeps "
         "GPT-2's init (0.02, c_proj 0.02/sqrt(2 x n_layer)). llama-tied-bf16 is built in float32, then "
         "`model.to(torch.bfloat16)` and `save_pretrained(..., max_shard_size=\"70KB\")`.")

    raw("### LoRA adapters")
    para("`LoraConfig(r=4, lora_alpha=8, target_modules=..., lora_dropout=0.0, bias=\"none\", "
         "task_type=\"CAUSAL_LM\")` over the base loaded from disk; then every lora_A and lora_B weight set to "
         f"N(0, {LORA_STD}) (seeded generators 6 and 7; PEFT initialises B to zero). Saved with `save_pretrained` "
         "(`adapter_config.json`, `adapter_model.safetensors`, and PEFT's model-card template `README.md`, whose "
         "front matter names the base model; kept as PEFT writes it). The base was loaded by its path relative to the "
         "adapter directory, so `base_model_name_or_path` is "
         f"`{fx['llama-gqa-lora']['base_model_name_or_path']}` and `{fx['gpt2-lora']['base_model_name_or_path']}` "
         "(`AutoPeftModelForCausalLM` would resolve it against the working directory, not the adapter's). PEFT "
         "computes `base(x) + lora_B(lora_A(x)) * scaling`, scaling = lora_alpha / r = 2 (no rslora); merging "
         "adds `scaling * B @ A` to the base weight, transposed for GPT-2's Conv1D (`fan_in_fan_out: true`).")
    table = ["| adapter | max abs(unmerged - merged) | max abs(adapter - base) | mean abs(adapter - base) |",
             "| --- | --- | --- | --- |"]
    for d in ("llama-gqa-lora", "gpt2-lora"):
        f = fx[d]
        table.append(f"| `{d}/` | {f['unmerged_vs_merged_max_abs']:.2e} | {f['adapter_vs_base_max_abs']:.4f} | "
                     f"{f['adapter_vs_base_mean_abs']:.4f} |")
    raw(*table)

    raw("## bfloat16 weights under a float32 config")
    para("llama-tied-bf16 copied, its config.json's dtype changed, then loaded with "
         "`AutoModelForCausalLM.from_pretrained` (dtype: what the model came out as; difference: max abs against "
         "reference.npz's logits). Without a dtype argument transformers 5 loads as `dtype=\"auto\"`: the config's "
         "dtype, or without one the checkpoint's.")
    table = ["| config.json | from_pretrained argument | loads | dtype | difference |",
             "| --- | --- | --- | --- | --- |"]
    for k, r in facts["dtype_experiment"].items():
        if "/" in k:
            cname, arg = k.split("/")
            table.append(f"| {cname} | {arg} | {r['loads']} | {r.get('dtype', '')} | "
                         f"{r.get('max_abs_vs_reference', r.get('error', ''))} |")
    raw(*table)

    raw("## Tensors")
    for d in ("llama-gqa", "llama-tied-bf16", "gpt2", "qwen2", "mistral", "llama-gqa-lora", "gpt2-lora"):
        lines = [f"{f:34s} {k:64s} {str(shape):11s} {dt}" for f, k, shape, dt in tensor_listing(root / d)]
        raw(f"### {d}/", "```", *lines, "```")

    files = [f"{f.stat().st_size:>9d}  {f.relative_to(root)}" for f in sorted(root.rglob("*"))
             if f.is_file() and f.parent != root]
    raw("## Files", "```", *files, "```")
    para("`facts.json` holds the figures behind this README (losses, differences, the dtype experiment).")
    (root / "README.md").write_text("\n".join(out).rstrip("\n") + "\n")


if __name__ == "__main__":
    sys.exit(main())
