"""The ``hvdtrain`` command: train | benchmark | compress | evaluate | generate | serve | export | data | recipes |
models.

Errors a user can fix print one line and exit 2 (usage) or 1 (runtime); ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from hvdtrain import console
from hvdtrain.errors import HvdtrainError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks and TensorFlow's own logs")


def _config_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--recipe", help="a recipe shipped with hvdtrain (see `hvdtrain recipes`); default digits-cnn")
    src.add_argument("--config", help="a YAML config file of your own")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=3 (repeatable)")


def parser() -> argparse.ArgumentParser:
    """The argument parser of the ``hvdtrain`` command."""
    top = argparse.ArgumentParser(
        prog="hvdtrain", description="Keras training on Horovod: data, tensor and pipeline parallelism; language "
        "models from and to Hugging Face checkpoints; compression, generation and export for serving.")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (one process, or every rank under horovodrun/mpirun)")
    _config_args(p)
    p.add_argument("--output", required=True, help="directory for the run's artifacts (written by rank 0)")
    p.add_argument("--elastic", action="store_true",
                   help="Horovod elastic mode (same as --set train.elastic=true); launch with horovodrun --min-np")
    ray = p.add_argument_group("training on a Ray cluster (pip install 'hvdtrain[ray]')")
    ray.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="run the workers on Ray: a cluster address (auto, ray://host:10001), or none for a local "
                          "cluster on this machine")
    ray.add_argument("--np", type=int, help="with --ray: workers (one per slot)")
    ray.add_argument("--min-np", type=int, help="with --ray --elastic: fewest workers to go on with")
    ray.add_argument("--max-np", type=int, help="with --ray --elastic: most workers")
    ray.add_argument("--cpus-per-worker", type=int, default=1, help="with --ray: CPUs each worker reserves")
    ray.add_argument("--gpus-per-worker", type=int, default=0, help="with --ray: 1 to give each worker a GPU")
    ray.add_argument("--network-interface", help="with --ray: the interface workers talk over (local: lo)")
    _common(p)

    p = sub.add_parser("benchmark", help="throughput, scaling and allreduce; or the comparison with plain Horovod")
    _config_args(p)
    p.add_argument("--np", default="1,2", help="rank counts, e.g. 1,2,4")
    p.add_argument("--scaling", default="weak,strong", help="weak (fixed batch per rank), strong (fixed global)")
    p.add_argument("--steps", type=int, default=20, help="steps per timed window")
    p.add_argument("--warmup-steps", type=int, default=5, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3, help="timed windows (or launches) per setting; median reported")
    p.add_argument("--compare-baseline", action="store_true",
                   help="compare `hvdtrain train` with the canonical Horovod+Keras loop, interleaved")
    p.add_argument("--layouts", nargs="?", const="default", default=None, metavar="LIST",
                   help="compare layouts of the recipe's language model (gpt-tiny by default), e.g. "
                        "\"dp=1;dp=2;tp=2;dp=2,zero;pp=2,m=4,gpipe\" "
                        "(default: the data, tensor and pipeline layouts at up to 4 ranks)")
    p.add_argument("--controllers", default="gloo", help="with --layouts: gloo and/or mpi, e.g. gloo,mpi")
    p.add_argument("--global-batch", type=int, default=32, help="with --layouts: the global batch of every layout")
    p.add_argument("--windows", type=int, default=3, help="with --layouts, --collectives: timed windows per launch")
    p.add_argument("--budget-mb", type=float, default=0,
                   help="with --layouts: find the widest model each layout trains within this measured peak memory "
                        "growth per rank (MB), trying --widths in turn")
    p.add_argument("--widths", default="256,512,1024,1536,2048,3072",
                   help="with --budget-mb: model widths to try, e.g. 512,1024,2048")
    p.add_argument("--collectives", nargs="?", const="default", default=None, metavar="LIST",
                   help="the cost of one allreduce (a dependent chain of small ones, single large ones) through "
                        "Horovod against MPI's floor, e.g. \"gloo;gloo,cycle=0.1;mpi;mpi-floor\" (default: gloo "
                        "and mpi at Horovod's cycle time and at 0.1 ms, and the floor); at the largest --np")
    p.add_argument("--chain-length", type=int, default=200, help="with --collectives: collectives per chain")
    p.add_argument("--inference", action="store_true",
                   help="generation speed: full window vs key-value cache vs speculative (with --model, --draft)")
    p.add_argument("--model", help="with --inference, --serving: a trained language model (run directory, "
                                    "model.keras or a Hugging Face directory)")
    p.add_argument("--draft", help="with --inference, --serving: a small model of the same vocabulary for "
                                    "speculative decoding")
    p.add_argument("--batch", default="1,8", help="with --inference: batch sizes, e.g. 1,8")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="with --inference and --serving: tokens generated per prompt")
    p.add_argument("--methods", default="full,cached,speculative", help="with --inference: which to time")
    p.add_argument("--temperature", type=float, default=0.8, help="with --inference: sampling temperature")
    p.add_argument("--serving", action="store_true",
                   help="the OpenAI server under N concurrent streaming clients against one (with --model; a second "
                        "server with --draft; or --url of a running one)")
    p.add_argument("--url", help="with --serving: the base URL of a running server (http://HOST:PORT/v1)")
    p.add_argument("--concurrency", default="1,4,16", help="with --serving: concurrent clients, e.g. 1,4,16")
    p.add_argument("--requests", type=int, default=32, help="with --serving: requests per level and repeat")
    p.add_argument("--prompt-tokens", type=int, default=16, help="with --serving: tokens in each prompt")
    p.add_argument("--slots", type=int, default=16, help="with --serving: the server's --slots")
    p.add_argument("--launcher-args", default="--gloo",
                   help="extra horovodrun arguments, as typed: --launcher-args --mpi, or in quotes for several")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per launch")
    p.add_argument("--output", required=True, help="directory for benchmark.json and benchmark.png")
    _common(p)

    p = sub.add_parser("compress", help="prune, quantize or distill a trained model; report size/accuracy/latency")
    p.add_argument("--model", required=True, help="a trained model.keras, its run directory, or a Hugging Face "
                                                   "directory (config.json + safetensors)")
    p.add_argument("--method", required=True,
                   help="prune | qat | ptq-dynamic | ptq-fp16 | ptq-int8 | distill | pipeline, or several side by "
                        "side, comma-separated (e.g. ptq-int8,ptq-fp16,qat): each from the trained model, one report")
    _config_args(p)
    p.add_argument("--output", required=True, help="directory for the artifacts and compression_report.json")
    p.add_argument("--allow-unsafe", action="store_true", help="load models with Lambda layers (runs their code)")
    _common(p)

    p = sub.add_parser("evaluate", help="evaluate a model on its run's test data (or a recipe's)")
    p.add_argument("--model", required=True, help="a .keras or .tflite file, a run directory, or a Hugging Face "
                                                   "directory (with --recipe or --set data.path=...)")
    _config_args(p)
    p.add_argument("--allow-unsafe", action="store_true", help="load models with Lambda layers (runs their code)")
    _common(p)

    p = sub.add_parser("generate", help="sample text from a language model (cached; speculative with --draft)")
    p.add_argument("--model", required=True, help="a run directory, its model.keras, or a Hugging Face directory")
    p.add_argument("--prompt", action="append", default=None,
                   help="text to continue; repeat for a batch of prompts decoded together")
    p.add_argument("--max-tokens", type=int, default=200,
                   help="tokens to generate (of the model's tokenizer: bytes for a byte-level model); fewer when the "
                        "model ends the text")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same text")
    p.add_argument("--draft", help="a small model of the same family and tokenizer (e.g. from compress --method "
                                   "distill) proposing tokens to check")
    p.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per model call")
    p.add_argument("--full-window", action="store_true",
                   help="recompute the whole window for every token (no cache; the reference, slow)")
    p.add_argument("--allow-unsafe", action="store_true", help="load models with Lambda layers (runs their code)")
    _common(p)

    p = sub.add_parser("serve", help="serve a language model over HTTP with the OpenAI API (continuous batching; "
                                     "across a tensor group under horovodrun)")
    p.add_argument("--model", required=True, help="a run directory, its model.keras, or a Hugging Face directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one, printed at start)")
    p.add_argument("--served-model-name", help="the model's name in the API (default: its directory's name)")
    p.add_argument("--slots", type=int, default=16,
                   help="sequences decoded at once, each with a key-value cache of the model's context")
    p.add_argument("--max-queue", type=int, default=256,
                   help="sequences that may wait for a slot; beyond, requests get 503 with Retry-After")
    p.add_argument("--draft", help="a small model of the same tokenizer proposing tokens (speculative decoding)")
    p.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per step")
    p.add_argument("--chat-template", help="a Jinja chat template file (default: the model's tokenizer_config.json "
                                           "template, else plain 'role: content' lines)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds the requests in flight get to finish after SIGTERM")
    p.add_argument("--set", action="append", default=[], metavar="parallel.tensor=N",
                   help="parallel.tensor=N: split the model over N ranks (horovodrun -np N)")
    p.add_argument("--allow-unsafe", action="store_true", help="load models with Lambda layers (runs their code)")
    _common(p)

    p = sub.add_parser("export", help="export a language model: SavedModel (TF Serving), TFLite, or Hugging Face")
    p.add_argument("--model", required=True, help="a run directory, its model.keras, or a Hugging Face directory")
    p.add_argument("--format", default="saved_model", help="saved_model | tflite | tflite-int8 | huggingface")
    p.add_argument("--output", required=True,
                   help="directory for the export (saved_model: a TensorFlow Serving model base path)")
    p.add_argument("--version", type=int, default=1,
                   help="saved_model: the version folder written under --output (TensorFlow Serving's)")
    hf = p.add_argument_group("--format huggingface")
    hf.add_argument("--merge", action="store_true",
                    help="a LoRA run: the merged full model (default: its PEFT adapter over the checkpoint it "
                         "started from)")
    hf.add_argument("--dtype", default="float32", help="weights' dtype: float32 | bfloat16 | float16")
    hf.add_argument("--max-shard-size", default="5GB",
                    help="largest safetensors file (transformers' default 5GB); more files with an index above it")
    p.add_argument("--allow-unsafe", action="store_true", help="load models with Lambda layers (runs their code)")
    _common(p)

    p = sub.add_parser("data", help="prepare a corpus of any size once into token shards (data.source: tokens)")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    p = data_sub.add_parser("prepare", help="tokenize files (local or s3://) into token shards and a manifest")
    p.add_argument("--input", required=True, help="the corpus: a file or glob, local or s3://, e.g. 'corpus/*.jsonl'")
    p.add_argument("--output", required=True, help="the prepared directory (local or s3://; train with "
                                                    "data.source=tokens data.path=DIR)")
    p.add_argument("--tokenizer", default="bpe",
                   help="bpe (trained here on the first --sample-bytes), bytes, a tokenizer.json, or a Hugging Face "
                        "model directory")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokens of a trained bpe")
    p.add_argument("--sample-bytes", default="64MB", help="the text a bpe is trained on (the corpus' first)")
    p.add_argument("--validation-fraction", type=float, default=0.01, help="documents held out for validation")
    p.add_argument("--test-fraction", type=float, default=0.01, help="documents held out for testing")
    p.add_argument("--documents", default="auto", choices=("auto", "file", "blank-line", "jsonl"),
                   help="what a document is: each file, each blank-line-separated record, or each JSON line's "
                        "text (auto: JSON lines for .jsonl/.json, else files)")
    p.add_argument("--text-key", default="text", help="the field of a JSON line that holds its text")
    p.add_argument("--eod", default="", help="the end-of-document token of a given tokenizer (default: its end of "
                                              "sequence)")
    p.add_argument("--segment-bytes", default="64MB",
                   help="text tokenized and written at a time (the memory used; a rerun continues after the last)")
    _common(p)

    p = sub.add_parser("recipes", help="list the shipped recipes")
    _common(p)
    p = sub.add_parser("models", help="list the registered models and their parameters")
    _common(p)
    return top


def cmd_train(args: argparse.Namespace) -> int:
    from hvdtrain import config, train

    overrides = [*args.overrides, *(["train.elastic=true"] if args.elastic else [])]
    cfg = config.load(args.recipe, args.config, overrides)
    if args.ray is None:
        if args.np or args.min_np or args.max_np:
            from hvdtrain.errors import UsageError

            raise UsageError("--np, --min-np and --max-np go with --ray; under horovodrun give them to horovodrun")
        train.run(cfg, args.output)
        return 0
    import functools

    from hvdtrain.distributed import raycluster
    from hvdtrain.errors import UsageError

    if args.elastic and not args.min_np:
        raise UsageError("--ray --elastic needs --min-np (and --max-np): the fewest and most workers")
    if not args.elastic and not args.np:
        raise UsageError("--ray needs --np N: the number of workers")
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("S3_", "AWS_", "HVDTRAIN_")) or k in ("TF_CPP_MIN_LOG_LEVEL", "PYTHONWARNINGS")}
    raycluster.run(functools.partial(train.run_config_dict, config.to_dict(cfg), args.output),
                   num_workers=None if args.elastic else args.np, address=None if args.ray == "local" else args.ray,
                   cpus_per_worker=args.cpus_per_worker, use_gpu=args.gpus_per_worker > 0,
                   min_workers=args.min_np if args.elastic else None,
                   max_workers=args.max_np if args.elastic else None, env=env,
                   network_interface=args.network_interface)
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from hvdtrain import benchmark

    benchmark.command(args)
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from hvdtrain import compression, formats

    compression.parse_methods(args.method)  # a wrong name fails before the model is loaded
    cfg = formats.run_config(args.model, args.recipe, args.config, args.overrides)
    compression.run(args.method, args.model, cfg, args.output, allow_unsafe=args.allow_unsafe)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from hvdtrain import evaluate, formats

    cfg = formats.run_config(args.model, args.recipe, args.config, args.overrides)
    result = evaluate.evaluate_file(args.model, cfg, allow_unsafe=args.allow_unsafe)
    if result is not None:
        console.say(json.dumps(result))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from hvdtrain.serving import generate

    texts, stats, method = generate.command(args.model, args.prompt, args.max_tokens, args.temperature, args.top_k,
                                            args.seed, args.draft, args.full_window, args.draft_tokens,
                                            args.allow_unsafe)
    console.say("\n\n".join(texts))
    if method == "speculative":
        d = stats.as_dict()
        console.say(f"[hvdtrain] speculative: {d['accepted']} of {d['proposed']} proposed tokens accepted "
                    f"({d['acceptance_rate']:.0%}), {d['tokens_per_model_call']:.2f} tokens per model call",
                    sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from hvdtrain.serving import serve

    return serve.main_args(args)


def cmd_export(args: argparse.Namespace) -> int:
    from hvdtrain.serving import export

    if args.format == "huggingface":
        from hvdtrain.formats import huggingface

        written = huggingface.export(args.model, args.output, args.merge, args.dtype, args.max_shard_size,
                                     args.allow_unsafe)
    else:
        if args.merge:
            from hvdtrain.errors import UsageError

            raise UsageError("--merge goes with --format huggingface")
        written = export.command(args.model, args.output, args.format, args.allow_unsafe, args.version)
    for path in written:
        console.say(f"written: {path}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from hvdtrain.data import prepare

    settings = prepare.Settings(
        input=args.input, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        validation_fraction=args.validation_fraction, test_fraction=args.test_fraction, documents=args.documents,
        text_key=args.text_key, sample_bytes=prepare.parse_bytes(args.sample_bytes, "--sample-bytes"),
        segment_bytes=prepare.parse_bytes(args.segment_bytes, "--segment-bytes"), eod=args.eod)
    prepare.prepare(settings, args.output)
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from hvdtrain import config

    for name in config.recipe_names():
        raw = config.load_recipe_dict(name)
        model = raw.get("model", {}).get("name") or raw.get("model", {}).get("pretrained", "?")
        data = raw.get("data", {}).get("source", "?")
        console.say(f"{name:24s} model={model:20s} data={data}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    import models

    for name in models.names():
        params = ", ".join(f"{k}={v!r}" for k, v in models.params_of(name).items())
        console.say(f"{name:13s} {params}")
    return 0


COMMANDS = {"train": cmd_train, "benchmark": cmd_benchmark, "compress": cmd_compress, "evaluate": cmd_evaluate,
            "generate": cmd_generate, "serve": cmd_serve, "export": cmd_export, "data": cmd_data,
            "recipes": cmd_recipes, "models": cmd_models}


# Options whose value is itself a command line (launcher flags): "--launcher-args --mpi" is joined into
# "--launcher-args=--mpi" before parsing, because argparse reads a value that starts with "--" as an option.
COMMAND_LINE_OPTIONS = ("--launcher-args",)


def join_command_line_values(argv: list[str]) -> list[str]:
    """``[..., "--launcher-args", "--mpi", ...]`` -> ``[..., "--launcher-args=--mpi", ...]``."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in COMMAND_LINE_OPTIONS and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = parser().parse_args(join_command_line_values(sys.argv[1:] if argv is None else list(argv)))
    if args.debug:
        os.environ["HVDTRAIN_DEBUG"] = "1"
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        console.quiet_tensorflow_on_import()
    try:
        return COMMANDS[args.command](args)
    except HvdtrainError as exc:
        if args.debug:
            traceback.print_exc()
        console.error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        console.say("hvdtrain: interrupted", sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, unless --debug
        if args.debug:
            traceback.print_exc()
        console.error(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)")
        return 1


def entry() -> None:
    """Console-script wrapper."""
    from hvdtrain.process import exit_process

    exit_process(main())


if __name__ == "__main__":
    entry()
