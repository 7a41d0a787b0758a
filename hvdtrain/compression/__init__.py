"""Compression of trained models: pruning, quantization (QAT and post-training), distillation, and the pipeline.

One entry point, :func:`run`, for every method: it loads the trained model and the run's data, applies the method
(training-based methods fine-tune data-parallel on every rank), exports on rank 0 and writes the report
(``compression_report.json``, a table, ``compression_tradeoff.png``) next to the artifacts. No Horovod here: ranks
and collectives come from :mod:`hvdtrain.distributed`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from hvdtrain import console, distributed
from hvdtrain.compression.common import Artifact
from hvdtrain.config import Config
from hvdtrain.errors import UsageError
from hvdtrain.rundir import RunDir

METHODS = ("prune", "qat", "ptq-dynamic", "ptq-fp16", "ptq-int8", "distill", "pipeline")
PTQ = {"ptq-dynamic": "dynamic", "ptq-fp16": "float16", "ptq-int8": "int8"}


class _Session:
    """The state of one compression run: config, data, teacher, output directory (the chief's), artifacts."""

    def __init__(self, cfg: Config, source, teacher, run_dir: RunDir | None):
        self.cfg, self.source, self.teacher, self.run_dir = cfg, source, teacher, run_dir
        self.artifacts: list[Artifact] = []
        self.extra: dict[str, Any] = {}

    def keras(self, name: str, model, method: str, notes=None, save_scope=None) -> Artifact:
        """Save a Keras artifact on the chief and record it."""
        path = None
        if self.run_dir is not None:
            from hvdtrain.formats import keras_file

            path = self.run_dir.local(f"{name}.keras")
            keras_file.save(model, path, scope=save_scope)
        art = Artifact(name, "keras", path, method, model, notes or {})
        self.artifacts.append(art)
        return art

    def tflite(self, name: str, model, method: str, mode: str, from_name: str, **kw) -> Artifact | None:
        """Export a TFLite artifact on the chief and record it."""
        from hvdtrain.serving.tflite import to_tflite

        if self.run_dir is None:
            return None
        path = to_tflite(model, self.run_dir.local(f"{name}.tflite"), mode, **kw)
        art = Artifact(name, "tflite", path, method, None, {"from": from_name, "mode": mode})
        self.artifacts.append(art)
        return art


def _representative(s: _Session):
    return s.source.sample_inputs(s.cfg.compression.representative_examples, s.cfg.train.seed)


def _prune(s: _Session, model, name: str = "pruned", teacher=None):
    from hvdtrain.compression.prune import prune

    stripped, notes = prune(model, s.source, s.cfg, teacher=teacher)
    s.keras(name, stripped, "prune", notes)
    s.tflite(f"{name}-float32", stripped, "prune", "float32", name)
    return stripped


def _qat(s: _Session, model, name: str = "qat"):
    import tensorflow_model_optimization as tfmot

    from hvdtrain.compression.quantize import quantization_aware

    qat, notes = quantization_aware(model, s.source, s.cfg, s.cfg.model.name)
    s.keras(name, qat, "qat", notes, save_scope=tfmot.quantization.keras.quantize_scope)
    s.tflite(f"{name}-int8", qat, "qat", "int8", name, quantization_aware=True)
    return qat


def _ptq(s: _Session, model, method: str, from_name: str, name: str | None = None):
    mode = PTQ[method]
    kw = {"representative": _representative(s), "int8_io": s.cfg.compression.int8_io} if mode == "int8" else {}
    return s.tflite(name or f"{from_name}-{method}", model, method, mode, from_name, **kw)


def _distill(s: _Session):
    from hvdtrain.compression.common import count_params
    from hvdtrain.compression.distill import distill
    from hvdtrain.exact_metrics import evaluate

    from hvdtrain.config import standardize_logits, student_of

    c = s.cfg.compression
    name, params, _, seeds = student_of(s.cfg)
    student = distill(s.teacher, s.source, s.cfg)
    s.keras("student", student, "distill", {"student": name, "student_params": params,
                                            "alpha": c.alpha, "temperature": c.temperature,
                                            "standardize_logits": standardize_logits(s.cfg)})
    s.tflite("student-float32", student, "distill", "float32", "student")
    # The same student without the teacher (alpha=1: labels only), same epochs, over several seeds.
    metric = "bits_per_byte" if s.source.is_language_model else "accuracy"
    batch = s.cfg.data.batch_size_per_rank
    # the validation split too, when there is one: a second held-out set for the same comparison
    val = s.source.num_examples("val") > 0
    distilled, alone, distilled_val, alone_val = [], [], [], []
    for seed in range(seeds):
        with_teacher = student if seed == s.cfg.train.seed else distill(s.teacher, s.source, s.cfg, seed=seed)
        baseline = distill(s.teacher, s.source, s.cfg, seed=seed, alpha=1.0)
        distilled.append(evaluate(with_teacher, s.source, "test", batch)[metric])
        alone.append(evaluate(baseline, s.source, "test", batch)[metric])
        if val:
            distilled_val.append(evaluate(with_teacher, s.source, "val", batch)[metric])
            alone_val.append(evaluate(baseline, s.source, "val", batch)[metric])
    better = (lambda a, b: a < b) if metric == "bits_per_byte" else (lambda a, b: a > b)
    s.extra["distillation"] = {
        "metric": metric, "seeds": list(range(seeds)), "distilled": distilled, "without_teacher": alone,
        "seeds_won": sum(better(a, b) for a, b in zip(distilled, alone)),
        "distilled_mean": sum(distilled) / len(distilled), "without_teacher_mean": sum(alone) / len(alone),
        "teacher_params": count_params(s.teacher)[0], "student_params": count_params(student)[0],
    }
    if val:
        s.extra["distillation"].update({
            "distilled_val": distilled_val, "without_teacher_val": alone_val,
            "distilled_val_mean": sum(distilled_val) / len(distilled_val),
            "without_teacher_val_mean": sum(alone_val) / len(alone_val)})
    return student


def parse_methods(text: str) -> list[str]:
    """``prune`` or several methods side by side, ``ptq-int8,ptq-fp16,qat``: each from the trained model, in one
    report (the model, the data and the float32 baseline are loaded and measured once)."""
    from hvdtrain.errors import closest

    methods = [m.strip() for m in text.split(",")]
    for m in methods:
        if m not in METHODS:
            raise UsageError(f"unknown method '{m}'{closest(m, METHODS)}; methods: {', '.join(METHODS)} "
                             "(several: comma-separated, e.g. ptq-int8,ptq-fp16)")
    if len(set(methods)) < len(methods):
        raise UsageError(f"method list '{text}' names a method twice")
    if {"distill", "pipeline"} <= set(methods):
        raise UsageError("'distill' and 'pipeline' both train the student: run them one at a time")
    return methods


def _apply(s: _Session, method: str, teacher) -> None:
    """One method, from the trained model (``teacher``); its artifacts are added to the session."""
    cfg = s.cfg
    if method == "prune":
        # the dense model guides its own pruned copy (self-distillation) unless asked for labels alone
        _prune(s, teacher, teacher=teacher if cfg.compression.prune_with_teacher else None)
    elif method == "qat":
        _qat(s, teacher)
    elif method in PTQ:
        _ptq(s, teacher, method, "float32")
    elif method == "distill":
        _distill(s)
    else:  # pipeline: distill, then prune the student, then quantize it
        student = _distill(s)
        s.cfg = dataclasses.replace(cfg, compression=dataclasses.replace(
            cfg.compression, target_sparsity=cfg.compression.pipeline_sparsity,
            initial_sparsity=min(cfg.compression.initial_sparsity, cfg.compression.pipeline_sparsity)))
        pruned = _prune(s, student, "student-pruned", teacher=teacher)  # the teacher still guides
        if cfg.compression.pipeline_quantization == "qat":
            _qat(s, pruned, "pipeline-qat")
        else:
            _ptq(s, pruned, "ptq-int8", "student-pruned", "pipeline-int8")
        s.cfg = cfg  # the next method starts from the run's settings


def run(method: str, model_path: str, cfg: Config, output_dir: str | None,
        allow_unsafe: bool = False) -> dict[str, Any] | None:
    """Compress the model at ``model_path`` with ``method`` (one, or several comma-separated: see
    :func:`parse_methods`); returns the report on the chief (None elsewhere)."""
    from hvdtrain import data, formats, rundir, runtime
    from hvdtrain.compression import report as rep
    from hvdtrain.config import to_yaml

    methods = parse_methods(method)
    runtime.begin(cfg)
    import tensorflow as tf

    # compression makes float32 models whatever the teacher trained in (TFLite converts from float32)
    tf.keras.mixed_precision.set_global_policy("float32")
    teacher = formats.load_model(model_path, allow_unsafe=allow_unsafe, context_length=cfg.data.context_length)
    source = data.load(cfg.data, seed=cfg.train.seed, model_name=cfg.model.name)
    formats.check_fit(teacher, source, f"'{model_path}'")
    run_dir, error = rundir.prepare(output_dir, to_yaml(cfg), distributed.is_chief())
    distributed.agree(error)
    if run_dir is not None and source.tokenizer is not None:  # the compressed models read text as the teacher did
        from hvdtrain.data import tokenizer

        tokenizer.save(source.tokenizer, run_dir)
    s = _Session(cfg, source, teacher, run_dir)

    s.keras("float32", teacher, "none")
    s.tflite("float32-tflite", teacher, "none", "float32", "float32")
    for name in methods:
        _apply(s, name, teacher)

    if run_dir is None:
        return None
    c = cfg.compression
    report = rep.build_report(s.artifacts, source, c.latency_rounds, c.latency_calls, reference="float32")
    report.update({"method": ",".join(methods), "methods": methods, "model": str(model_path), **s.extra})
    run_dir.write_json("compression_report.json", report)
    rep.plot(report, run_dir)
    run_dir.publish()
    rep.print_table(report)
    if "distillation" in s.extra:
        d = s.extra["distillation"]
        console.say(f"\ndistillation ({d['metric']}, mean over seeds {d['seeds']}): with teacher "
              f"{d['distilled_mean']:.4f}, without {d['without_teacher_mean']:.4f} (better with the teacher for "
              f"{d['seeds_won']} of {len(d['seeds'])} seeds)"
              + (f"; validation split: {d['distilled_val_mean']:.4f} vs {d['without_teacher_val_mean']:.4f}"
                 if "distilled_val" in d else "") + "; student "
              f"{d['student_params']} vs teacher {d['teacher_params']} parameters")
    console.say(f"\nreport: {run_dir.path('compression_report.json')}, {run_dir.path('compression_tradeoff.png')}")
    return report
