"""The data path at scale, measured (docs/data-pipeline.md): `hvdtrain data prepare` and `data.source: tokens` on an
8 MB and a 160 MB corpus of real text, against the tokenizer library's own batch encoding and the in-memory text
source; each measurement a fresh process, interleaved and repeated, medians.

Usage: python scripts/bench_corpus.py OUT.json [--repeats 3]

1. Corpora: the Python files of this venv's site-packages (code, docstrings, comments: real text of many authors),
   in sorted order, in files of 10 MB, up to 8 MB and 160 MB.
2. Prepare: throughput (MB of text per second, the tokenizer given: no training) against `encode_batch_fast` of the
   same pieces with the same tokenizer, all cores; the peak resident set of each prepare.
3. Training: a 2-rank run of a fixed number of steps on each prepared corpus: peak resident set per rank and the
   start-up (to the first step); and tokens/s against the same run on `data.source: text` (the in-memory source).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}


def corpus(folder: Path, megabytes: int) -> Path:
    """Real text up to ``megabytes``: the venv's Python files, sorted, in files of 10 MB."""
    import site

    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(Path(site.getsitepackages()[0]).rglob("*.py"))
    budget, part, written = megabytes * 10**6, b"", 0
    for path in sources:
        part += path.read_bytes() + b"\n\n"
        if len(part) >= 10 * 10**6 or written + len(part) >= budget:
            part = part[: budget - written]
            (folder / f"part-{written // (10 * 10**6):03d}.txt").write_bytes(part)
            written += len(part)
            part = b""
        if written >= budget:
            break
    return folder


def prepare(inputs: Path, output: Path, tokenizer: str) -> dict:
    code = ("import json, sys, time\nfrom hvdtrain import memory\nfrom hvdtrain.data import prepare as P\n"
            "s = P.Settings(input=sys.argv[1] + '/*.txt', tokenizer=sys.argv[3], vocab_size=8192,"
            " validation_fraction=0.005, test_fraction=0.005, documents='blank-line', text_key='text',"
            " sample_bytes=8_000_000, segment_bytes=64_000_000, eod='<|endoftext|>')\n"
            "t = time.perf_counter()\nm = P.prepare(s, sys.argv[2], progress='off')\n"
            "print(json.dumps({'seconds': time.perf_counter() - t, 'peak': memory.peak_bytes(),"
            " 'bytes': m['input_bytes'], 'tokens': sum(v['tokens'] for v in m['splits'].values())}))")
    out = subprocess.run([sys.executable, "-c", code, str(inputs), str(output), tokenizer], capture_output=True,
                         text=True, check=True, env=ENV).stdout
    return json.loads(out.strip().splitlines()[-1])


def reference(inputs: Path, tokenizer: str) -> dict:
    """``tokenizers``' own batch encoding of the same text, line by line (the way the library encodes it fastest
    with this tokenizer: its lines are its words), all cores; the text read and decoded first, not timed."""
    code = ("import json, sys, time\nfrom pathlib import Path\nfrom tokenizers import Tokenizer\n"
            "lines = [l for f in sorted(Path(sys.argv[1]).glob('*.txt'))"
            " for l in f.read_bytes().decode('utf-8', 'replace').splitlines(keepends=True)]\n"
            "tok = Tokenizer.from_file(sys.argv[2])\n"
            "t = time.perf_counter()\nfor i in range(0, len(lines), 65536):\n"
            "    tok.encode_batch_fast(lines[i:i + 65536], add_special_tokens=False)\n"
            "print(json.dumps({'seconds': time.perf_counter() - t,"
            " 'bytes': sum(f.stat().st_size for f in Path(sys.argv[1]).glob('*.txt'))}))")
    out = subprocess.run([sys.executable, "-c", code, str(inputs), tokenizer], capture_output=True, text=True,
                         check=True, env=ENV).stdout
    return json.loads(out.strip().splitlines()[-1])


def train(data_sets: list[str], out: Path) -> dict:
    sets = ["train.steps=60", "train.eval_every_steps=60", "train.eval_batches=1", "train.lr_scaling=none",
            "data.context_length=128", "data.batch_size_per_rank=16", "data.validation_fraction=0.005",
            "data.test_fraction=0.005", "model.params={num_layers: 2, width: 128, num_heads: 4, kv_heads: 2}",
            *data_sets]
    cmd = [str(BIN / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo", str(BIN / "hvdtrain"), "train",
           "--recipe", "llama-tiny", *(a for s in sets for a in ("--set", s)), "--output", str(out)]
    subprocess.run(cmd, capture_output=True, text=True, check=True, env=ENV)
    s = json.loads((out / "summary.json").read_text())
    return {"peak_per_rank": max(s["peak_memory_bytes_per_rank"]), "startup_seconds": s["startup_seconds"],
            "tokens_per_sec": s["tokens_per_sec"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("output")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-corpus-"))
    sizes = {8: corpus(tmp / "in8", 8), 160: corpus(tmp / "in160", 160)}
    # the tokenizer: a BPE of 8,192 tokens trained once on the small corpus' first 8 MB
    first = prepare(sizes[8], tmp / "trained", "bpe")
    tokenizer = str(tmp / "trained" / "tokenizer.json")
    results = {"prepare": {8: [], 160: []}, "reference": {8: [], 160: []}, "train_tokens": {8: [], 160: []},
               "train_text": [], "trained_tokenizer": first}
    for repeat in range(args.repeats):
        for mb, inputs in sizes.items():
            if repeat and mb == 160:  # (the large corpus once per step below: 40 s a prepare)
                continue
            results["reference"][mb].append(reference(inputs, tokenizer))
            results["prepare"][mb].append(prepare(inputs, tmp / f"out{mb}-{repeat}", tokenizer))
            print(mb, "MB: reference", results["reference"][mb][-1], "prepare", results["prepare"][mb][-1],
                  flush=True)
    for repeat in range(args.repeats):
        for mb in sizes:
            results["train_tokens"][mb].append(train(["data.source=tokens", f"data.path={tmp / f'out{mb}-0'}"],
                                                     tmp / f"run{mb}-{repeat}"))
            print(mb, "MB tokens:", results["train_tokens"][mb][-1], flush=True)
        results["train_text"].append(train(["data.source=text", f"data.path={sizes[8]}/*.txt",
                                            f"data.tokenizer={tokenizer}"], tmp / f"text-{repeat}"))
        print("8 MB text:", results["train_text"][-1], flush=True)

    def median(rows, key):
        return statistics.median(r[key] for r in rows)

    summary = {}
    for mb in sizes:
        ours = [r["bytes"] / r["seconds"] / 1e6 for r in results["prepare"][mb]]
        theirs = [r["bytes"] / r["seconds"] / 1e6 for r in results["reference"][mb]]
        summary[f"{mb}MB"] = {
            "prepare_MB_per_s": statistics.median(ours), "encode_batch_MB_per_s": statistics.median(theirs),
            "prepare_over_encode": statistics.median(ours) / statistics.median(theirs),
            "prepare_peak_MB": median(results["prepare"][mb], "peak") / 2**20,
            "train_peak_per_rank_MB": median(results["train_tokens"][mb], "peak_per_rank") / 2**20,
            "train_startup_s": median(results["train_tokens"][mb], "startup_seconds"),
            "train_tokens_per_s": median(results["train_tokens"][mb], "tokens_per_sec")}
    summary["text_source_8MB"] = {"train_tokens_per_s": median(results["train_text"], "tokens_per_sec"),
                                  "train_peak_per_rank_MB": median(results["train_text"], "peak_per_rank") / 2**20,
                                  "train_startup_s": median(results["train_text"], "startup_seconds")}
    summary["tokens_over_text_8MB"] = summary["8MB"]["train_tokens_per_s"] / summary["text_source_8MB"][
        "train_tokens_per_s"]
    results["summary"] = summary
    Path(args.output).write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"{time.perf_counter() - started:.0f} s")
