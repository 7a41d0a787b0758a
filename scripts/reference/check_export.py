#!/usr/bin/env python3
"""Check a Hugging Face-format directory (an export of hvdtrain's, or a fixture) against transformers.

Run in the reference venv (scripts/reference/setup.sh):

    .venv-reference/bin/python scripts/reference/check_export.py --model DIR [--adapter ADAPTER_DIR] \\
        --inputs FILE.npz [--tolerance 1e-4] [--sample TEXT]

Loads DIR with `transformers.AutoModelForCausalLM.from_pretrained(DIR, dtype=torch.float32)` (`dtype` is what
transformers 5 calls `torch_dtype`, which it still takes with a deprecation warning; a bfloat16 checkpoint is upcast
and computed in float32), with --adapter applies `peft.PeftModel.from_pretrained(base, ADAPTER_DIR)` (unmerged),
runs it in eval mode, without an attention mask, on `input_ids` from FILE.npz and compares its logits with `logits`
from FILE.npz. If FILE.npz also holds `greedy_prompt` and `greedy`, it decodes greedily the same number of tokens
(EOS stopping disabled) and says whether they are the same (reported, not judged: near-ties may differ).

If DIR has a tokenizer.json, it also loads `transformers.AutoTokenizer.from_pretrained(DIR)` and
`tokenizers.Tokenizer.from_file(DIR/tokenizer.json)`, encodes a sample string with both and prints both id lists.

Prints one JSON line. Exits 1 if max |logits - reference| > tolerance x mean |reference logits|, if the tokenizer
does not load, if the two tokenizers' ids differ, or if their vocabulary sizes differ (AutoTokenizer can add tokens:
for model_type "qwen2" transformers 5 rebuilds the tokenizer as Qwen2Tokenizer, which adds <|endoftext|> when the
vocabulary lacks it); 2 on a usage error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

DEFAULT_SAMPLE = (
    "The value for the built-in variable is determined when the interpreter starts. "
    "Caf\u00e9 12345, x = 3.14;\n\n  done"
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="directory in Hugging Face format")
    ap.add_argument("--adapter", type=Path, help="PEFT adapter directory to apply over --model")
    ap.add_argument("--inputs", required=True, type=Path, help=".npz with input_ids (int) and logits (float)")
    ap.add_argument("--tolerance", type=float, default=1e-4,
                    help="fail if max abs difference > tolerance x mean |reference logit| (default 1e-4)")
    ap.add_argument("--sample", default=DEFAULT_SAMPLE, help="text for the tokenizer check")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if not (args.model / "config.json").is_file():
        print(f"no config.json in {args.model}", file=sys.stderr)
        return 2
    data = np.load(args.inputs)
    if "input_ids" not in data or "logits" not in data:
        print(f"{args.inputs} must hold input_ids and logits (it holds {sorted(data.files)})", file=sys.stderr)
        return 2
    ids = np.asarray(data["input_ids"])
    ref = np.asarray(data["logits"], dtype=np.float32)

    report: dict = {"model": str(args.model), "adapter": str(args.adapter) if args.adapter else None,
                    "inputs": str(args.inputs), "tolerance": args.tolerance}
    ok = True

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    report["model_class"] = type(model).__name__
    report["attn_implementation"] = model.config._attn_implementation
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    with torch.no_grad():
        out = model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()
    if out.shape != ref.shape:
        report.update(ok=False, error=f"logits shape {list(out.shape)} != reference {list(ref.shape)}")
        print(json.dumps(report))
        return 1
    diff = np.abs(out - ref)
    mean_abs_ref = float(np.abs(ref).mean())
    max_abs = float(diff.max())
    worst = np.unravel_index(int(diff.argmax()), diff.shape)
    report["logits"] = {
        "shape": list(ref.shape),
        "max_abs_diff": max_abs,
        "mean_abs_diff": float(diff.mean()),
        "mean_abs_reference": mean_abs_ref,
        "max_abs_diff_relative": max_abs / mean_abs_ref if mean_abs_ref > 0 else float("inf"),
        "worst_at": [int(i) for i in worst],
        "argmax_agreement": float((out.argmax(-1) == ref.argmax(-1)).mean()),
        "ok": max_abs <= args.tolerance * mean_abs_ref,
    }
    ok &= report["logits"]["ok"]

    if "greedy_prompt" in data and "greedy" in data:
        prompt = torch.as_tensor(np.asarray(data["greedy_prompt"]), dtype=torch.long)
        want = np.asarray(data["greedy"])
        with torch.no_grad():
            gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=want.shape[1],
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        got = gen[:, prompt.shape[1]:].numpy()
        report["greedy"] = {"equal": bool(np.array_equal(got, want)), "got": got.tolist(), "want": want.tolist()}

    tok_json = args.model / "tokenizer.json"
    if tok_json.is_file():
        from tokenizers import Tokenizer

        t: dict = {"sample": args.sample}
        raw = Tokenizer.from_file(str(tok_json))
        t["tokenizers_ids"] = raw.encode(args.sample).ids
        try:
            auto = AutoTokenizer.from_pretrained(args.model)
            t["auto_class"] = type(auto).__name__
            t["auto_ids"] = auto(args.sample)["input_ids"]
            t["equal"] = t["auto_ids"] == t["tokenizers_ids"]
            t["vocab_size"] = {"tokenizers": raw.get_vocab_size(), "auto": len(auto),
                               "config": getattr(model.config, "vocab_size", None)
                               if not args.adapter else getattr(model.base_model.config, "vocab_size", None)}
        except Exception as e:  # noqa: BLE001
            t["equal"] = False
            t["error"] = f"{type(e).__name__}: {e}"[:500]
        vs = t.get("vocab_size")
        t["vocab_size_equal"] = bool(vs) and vs["tokenizers"] == vs["auto"]
        report["tokenizer"] = t
        ok &= t["equal"] and t["vocab_size_equal"]

    report["ok"] = bool(ok)
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
