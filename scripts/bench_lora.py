"""LoRA against full fine-tuning of one pretrained checkpoint: each a real `hvdtrain train` run from the same Hugging
Face checkpoint on the same text, in fresh processes, interleaved and repeated; prints a table (each run's tokens/s:
the median epoch after the first; its peak resident set; the bytes of weights and optimizer state it holds) with
the medians and ratios, and writes it as JSON (docs/pretrained.md, "LoRA against full fine-tuning").

Usage: python scripts/bench_lora.py CHECKPOINT OUT.json [--repeats 3] [--set KEY=VALUE ...]
       python scripts/bench_lora.py --make DIR WIDTH,LAYERS,VOCAB   (a random llama checkpoint, bfloat16, for it)
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SETTINGS = {  # what each compared run adds to the recipe
    "full": [],
    "lora": ["train.lora_rank=8", "train.lora_alpha=16", "train.lora_targets=[q_proj,k_proj,v_proj,o_proj]"],
}


def make(folder: str, sizes: str) -> None:
    """A random llama of ``WIDTH,LAYERS,VOCAB`` as a Hugging Face checkpoint (bfloat16, heads of 64)."""
    import models
    from hvdtrain.data import text, tokenizer

    width, layers, vocab = (int(v) for v in sizes.split(","))
    model = models.build("llama", input_shape=(64,), num_classes=vocab, num_layers=layers, width=width,
                         num_heads=width // 64, kv_heads=max(1, width // 256))
    bpe = tokenizer.BPE.train(text.embedded_corpus()[:100_000], min(vocab, 1024))
    models.save_pretrained(model, folder, dtype="bfloat16", tokenizer=bpe.tokenizer, max_shard_bytes=100 * 2**20)
    print(f"{folder}: {model.count_params():,} parameters")


def one_run(checkpoint: str, corpus: Path, which: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-lora-{which}-") as tmp:
        sets = [f"model.pretrained={checkpoint}", f"data.path={corpus}", *SETTINGS[which], *extra]
        cmd = [str(BIN / "hvdtrain"), "train", "--recipe", "llama-finetune",
               *(a for s in sets for a in ("--set", s)), "--output", f"{tmp}/run"]
        subprocess.run(cmd, check=True, capture_output=True, text=True, env={"TF_CPP_MIN_LOG_LEVEL": "2",
                                                                               "PATH": f"{BIN}:/usr/bin:/bin"})
        summary = json.loads(Path(f"{tmp}/run/summary.json").read_text())
    return {"tokens_per_sec": summary["tokens_per_sec"], "peak_memory_bytes": summary["peak_memory_bytes"],
            "param_bytes_per_rank": summary["param_bytes_per_rank"],
            "optimizer_bytes_per_rank": summary["optimizer_bytes_per_rank"], "precision": summary["precision"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("output", nargs="?")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--make", metavar="WIDTH,LAYERS,VOCAB")
    args = p.parse_args()
    if args.make:
        make(args.checkpoint, args.make)
        return
    from hvdtrain.data import text

    corpus = Path(tempfile.mkdtemp(prefix="bench-lora-")) / "corpus.txt"
    corpus.write_bytes(text.embedded_corpus()[:15_000])
    runs = {which: [] for which in SETTINGS}
    for repeat in range(args.repeats):
        for which in SETTINGS:  # interleaved: the machine's load moves between runs
            runs[which].append(one_run(args.checkpoint, corpus, which, args.sets))
            r = runs[which][-1]
            mb = {k: r[k] / 2**20 for k in ("peak_memory_bytes", "param_bytes_per_rank", "optimizer_bytes_per_rank")}
            print(f"{repeat + 1} {which:5s} {r['tokens_per_sec']:8.0f} tokens/s  peak {mb['peak_memory_bytes']:6.0f} MB"
                  f"  weights {mb['param_bytes_per_rank']:5.0f} MB  optimizer {mb['optimizer_bytes_per_rank']:5.0f} MB",
                  flush=True)
    medians = {w: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_sec", "peak_memory_bytes")}
               for w, rs in runs.items()}
    ratios = {k: medians["lora"][k] / medians["full"][k] for k in ("tokens_per_sec", "peak_memory_bytes")}
    print(f"medians: full {medians['full']}, lora {medians['lora']}; lora / full: {ratios}")
    if args.output:
        Path(args.output).write_text(json.dumps({"checkpoint": args.checkpoint, "sets": args.sets, "runs": runs,
                                                 "medians": medians, "lora_over_full": ratios}, indent=2) + "\n")


if __name__ == "__main__":
    main()
