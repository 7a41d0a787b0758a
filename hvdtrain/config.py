"""One typed, strict, frozen config.

A run is described by a :class:`Config`: a tree of frozen dataclasses loaded from a YAML recipe shipped with the
package (``--recipe NAME``) or a user's file (``--config FILE``), then overridden by ``--set section.key=value``.
Unknown keys and wrong types raise :class:`~hvdtrain.errors.ConfigError` naming the key and the nearest valid one.
Each component receives only its own section (``build_model(cfg.model)``, ``make_data(cfg.data)``).
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from hvdtrain.errors import ConfigError, closest


@dataclass(frozen=True)
class ModelConfig:
    """Which registered builder to call and the keyword arguments to give it (checked against its signature), or
    a Hugging Face checkpoint to start from (``pretrained``: a directory, an ``s3://`` prefix, or
    ``builtin:NAME``; its config.json then decides the family and its sizes, its tokenizer.json the tokenizer)."""

    name: str = "cnn"
    params: dict[str, Any] = field(default_factory=dict)
    pretrained: str = ""


@dataclass(frozen=True)
class DataConfig:
    """Where the examples come from and how they are batched on each rank."""

    # tokens: a corpus prepared by `hvdtrain data prepare` (data.path: its directory), streamed
    source: Literal["digits", "synthetic", "tfrecord", "text", "npz", "tokens"] = "digits"
    path: str = ""
    batch_size_per_rank: int = 64
    test_fraction: float = 0.2
    validation_fraction: float = 0.0
    shuffle_buffer: int = 10_000
    # image sources (0: the source's default or what the data says)
    image_size: int = 0
    # classes of an image source, or the vocabulary of a language model (0: the source's, or the tokenizer's;
    # a pretrained checkpoint's config.json sets it)
    num_classes: int = 0
    # synthetic: examples to make; tfrecord: the known record count, which skips counting the files
    num_examples: int = 0
    # language-model sources
    context_length: int = 128
    # text: "bytes" (vocabulary 256), "bpe" (a byte-level BPE of vocab_size tokens trained on the training text),
    # or the path of a tokenizer.json (Hugging Face tokenizers' format)
    tokenizer: str = "bytes"
    vocab_size: int = 0
    augment: bool = True
    label_offset: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation: its length (epochs, or steps), optimizer, learning rate and its schedule, precision,
    checkpoints and validation."""

    epochs: int = 10
    # the run's length in optimizer steps instead of epochs (0: epochs), for corpora a pass over which nobody waits
    # for; then validation every eval_every_steps (0: a tenth of the run) on eval_batches global batches of the
    # validation split (0: all of it), checkpoints every checkpoint_every_steps (0: at each validation)
    steps: int = 0
    eval_every_steps: int = 0
    eval_batches: int = 0
    checkpoint_every_steps: int = 0
    optimizer: Literal["sgd", "momentum", "adam", "adamw"] = "adam"
    learning_rate: float = 1e-3
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    warmup_epochs: float = 1.0
    warmup_steps: int = 0  # > 0: the warmup in steps, in place of warmup_epochs
    schedule: Literal["constant", "cosine", "step"] = "constant"
    step_decay_epochs: float = 10.0
    step_decay_factor: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = "float32"
    clip_norm: float = 0.0  # clip the gradients by the whole model's norm (0: off), in every layout
    steps_per_execution: int = 1
    jit_compile: bool = False
    seed: int = 0
    checkpoint_every_epochs: int = 1
    keep_checkpoints: int = 3
    resume: bool = True  # the same command again continues from the output directory's last good checkpoint
    # write model.keras at the end (false: for a model whose weights do not fit one host; generate, evaluate,
    # compress and export then read the sharded checkpoint)
    save_model: bool = True
    early_stopping_patience: int = 0
    elastic: bool = False
    commit_every_batches: int = 50
    # LoRA (Hu et al., 2021): train low-rank adapters of this rank on the target projections, the base frozen
    # (0: off, every weight trains); the update is scaled by lora_alpha / lora_rank, as PEFT's
    lora_rank: int = 0
    lora_alpha: float = 8.0
    # PEFT's module names (q_proj, v_proj; GPT-2's c_attn) or the plan's (attn/query/kernel); empty: PEFT's
    # default for the family (Llama: q_proj, v_proj; GPT-2: c_attn)
    lora_targets: list[str] = field(default_factory=list)
    lora_dropout: float = 0.0


def knob(default: Any, env: str, scale: float = 1) -> Any:
    """A Horovod knob: a config field whose metadata names the variable ``hvd.init()`` reads and the unit factor."""
    return field(default=default, metadata={"horovod_env": env, "scale": scale})


@dataclass(frozen=True)
class DistributedConfig:
    """How gradients travel between ranks, the Horovod knobs set before ``hvd.init()``, and the rank guard."""

    grad_compression: Literal["none", "fp16"] = "none"
    backward_passes_per_step: int = 1
    reduce_op: Literal["average", "sum", "adasum"] = "average"
    # Horovod knobs (hvdtrain.distributed.horovod_environment turns them into HOROVOD_* variables)
    fusion_threshold_mb: float = knob(0.0, "HOROVOD_FUSION_THRESHOLD", scale=1024 * 1024)
    cycle_time_ms: float = knob(0.0, "HOROVOD_CYCLE_TIME")  # 0: Horovod's 1 ms; tensor without pipeline, MPI: 0.001
    autotune: bool = knob(False, "HOROVOD_AUTOTUNE")
    hierarchical_allreduce: bool = knob(False, "HOROVOD_HIERARCHICAL_ALLREDUCE")
    autotune_log: str = ""  # relative to the output directory unless absolute
    timeline: str = ""  # Horovod's timeline (Chrome trace JSON), relative to the output directory unless absolute
    threads_per_rank: int = 0  # 0: cores / ranks on the host (twice for a large pipeline stage)
    # every N epochs compare each trainable variable across ranks and stop if they drifted apart (0: off)
    divergence_check_epochs: int = 1
    divergence_tolerance: float = 1e-6  # relative spread of a variable's checksum that counts as diverged


@dataclass(frozen=True)
class ParallelConfig:
    """Model parallelism (for ``gpt``) and sharded optimizer states; data parallelism is what is left.

    The data-parallel degree is ``world size / (tensor x pipeline)``; ``data.batch_size_per_rank`` is the batch of
    each data-parallel replica (the ranks of a tensor group and of a pipeline share theirs).
    """

    tensor: int = 1  # ranks per tensor-parallel group: attention heads and MLP split across them
    pipeline: int = 1  # pipeline stages: consecutive blocks on different ranks
    microbatches: int = 1  # micro-batches per step and replica (pipeline)
    schedule: Literal["gpipe", "1f1b"] = "1f1b"
    shard_optimizer: bool = False  # ZeRO stage 1: optimizer state split over the data-parallel ranks
    # ZeRO stage 3 / FSDP: the weights themselves split over the data-parallel ranks (the optimizer state with
    # them), each unit's gathered while it computes; with recompute its weights are gathered again for the backward
    shard_params: bool = False
    # with shard_params: start each unit's gather while the unit before it computes (two units' weights whole at
    # once); false: each unit gathers when it starts
    prefetch: bool = True
    # with shard_params: each unit's weights cut into this many buckets of near-equal size (at weight boundaries),
    # gathered and reduce-scattered apart: a bucket's gradient is reduce-scattered while the rest of its unit's
    # backward runs (less memory, more and smaller collectives; docs/performance.md). 0: as many as keep each bucket
    # within 16 MB of float32 (hvdtrain.distributed.fsdp.BUCKET_MB): one for a block of width 512, two at 768
    buckets_per_unit: int = 0
    # with shard_params: the ranks each weight is sharded over, a divisor of the data-parallel degree (0: all of
    # them). Fewer: hybrid sharding (HSDP): the data ranks form groups of this size (consecutive ranks, on one host
    # when hosts hold whole groups) that shard the weights, and the groups replicate each other (their slices'
    # gradients averaged across groups): the gathers stay within a host, one allreduce per step crosses hosts
    shard_degree: int = 0
    recompute: bool = False  # recompute each Transformer block's activations in the backward pass
    # sequence parallelism at tensor > 1: between the split regions each tensor member holds 1/tensor of the
    # positions (norms, dropout and the residual stream of every block): less activation memory, the same bytes
    # moved in twice as many collectives (docs/parallelism.md)
    sequence: bool = False


@dataclass(frozen=True)
class CompressionConfig:
    """How ``hvdtrain compress`` prunes, quantizes and distills a trained model."""

    fine_tune_epochs: int = 20
    learning_rate: float = 5e-5  # fine-tuning a trained model: small steps keep what it learned
    # pruning
    target_sparsity: float = 0.8
    sparsity_schedule: Literal["polynomial", "constant"] = "polynomial"
    initial_sparsity: float = 0.0
    pruning_frequency: int = 10
    structured_2_4: bool = False
    prune_with_teacher: bool = True  # fine-tune against the dense model's outputs (distillation), not labels alone
    # quantization
    representative_examples: int = 256
    int8_io: bool = False
    qat_fallback: bool = False
    # distillation
    student: str = ""  # empty: the teacher's own family, at the family's student size (STUDENTS)
    # defaults measured on digits-cnn (docs/compression.md): a 9.8x smaller cnn, soft targets only, T=1 on
    # standardized logits
    student_params: dict[str, Any] = field(default_factory=dict)  # empty: the family's student (STUDENTS)
    temperature: float = 1.0
    alpha: float = 0.0
    # z-score both logit vectors before the softened KL (Sun et al., 2024); empty: the family's default (STUDENTS)
    standardize_logits: bool | None = None
    distill_epochs: int = 0  # 0: the family's default (STUDENTS)
    baseline_seeds: int = 0  # 0: the family's default (STUDENTS)
    # pipeline: distill -> prune to this sparsity (a small student has less to spare) -> this quantization
    pipeline_sparsity: float = 0.5
    pipeline_quantization: Literal["ptq-int8", "qat"] = "ptq-int8"
    # report
    latency_rounds: int = 5
    latency_calls: int = 50


# The student each model family distills into when compression.student is empty, and the distillation defaults
# measured for it (docs/compression.md): digits-cnn's 9.8x smaller cnn over 20 epochs and 5 seeds, on standardized
# logits; for gpt a quarter-width single block over 3 epochs and 2 seeds (a language-model epoch costs far more),
# on plain logits: bits per byte need the student's own logit scale, which standardization does not train.
STUDENTS: dict[str, dict[str, Any]] = {
    "cnn": {"params": {"filters": [12, 24], "dense_units": 32}, "epochs": 20, "seeds": 5, "standardize": True},
    "mlp": {"params": {"hidden_units": [32], "dropout": 0.0}, "epochs": 20, "seeds": 5, "standardize": True},
    "llama": {"params": {"num_layers": 1, "width": 32, "num_heads": 2, "kv_heads": 1, "dropout": 0.0,
                         "tie_embeddings": True}, "epochs": 3,
              "seeds": 2, "standardize": False},
    "gpt": {"params": {"num_layers": 1, "width": 32, "num_heads": 2, "dropout": 0.0}, "epochs": 3, "seeds": 2,
            "standardize": False},
}


def standardize_logits(cfg) -> bool:
    """Whether distillation standardizes the logits (``compression.standardize_logits``, or the family's)."""
    c = cfg.compression
    return c.standardize_logits if c.standardize_logits is not None else STUDENTS.get(
        cfg.model.name, {"standardize": True})["standardize"]


def student_of(cfg) -> tuple[str, dict[str, Any], int, int]:
    """``(model name, parameters, distillation epochs, seeds)`` of the student ``cfg`` asks for."""
    c = cfg.compression
    name = c.student or cfg.model.name
    preset = STUDENTS.get(name, {"params": {}, "epochs": 20, "seeds": 5})
    params = c.student_params or (preset["params"] if not c.student or c.student == cfg.model.name else {})
    return name, params, c.distill_epochs or preset["epochs"], c.baseline_seeds or preset["seeds"]


@dataclass(frozen=True)
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    # what loading changed and why (a pretrained checkpoint's settings over the recipe's), for the run's log
    notes: tuple[str, ...] = field(default=(), compare=False, metadata={"internal": True})


# ---------------------------------------------------------------------------------------------------------------
# Loading and validation


def recipe_names() -> list[str]:
    """Names of the recipes shipped with the package."""
    folder = resources.files("hvdtrain") / "recipes"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)  # configs are data, never code
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{where} is not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of sections (model, data, train, distributed, parallel, "
                          "compression)")
    return data


def load_recipe_dict(name: str) -> dict[str, Any]:
    """The raw mapping of a shipped recipe."""
    names = recipe_names()
    if name not in names:
        raise ConfigError(f"unknown recipe '{name}'{closest(name, names)}; available: {', '.join(names)}")
    text = (resources.files("hvdtrain") / "recipes" / f"{name}.yaml").read_text()
    return read_yaml(text, f"recipe '{name}'")


def load_file_dict(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a user's YAML config file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist; give a YAML file or use --recipe NAME")
    return read_yaml(p.read_text(), f"config file '{p}'")


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is read as YAML (``3`` is an int, ``[1, 2]`` a list)."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}' must look like section.key=value, e.g. --set train.epochs=3")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``--set a.b=c`` applied."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            node[part] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        node[path[-1]] = value
    return out


def _check_type(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            names = [str(a) for a in allowed]
            raise ConfigError(
                f"{key}: '{value}' is not one of {', '.join(names)}{closest(str(value), names)}"
            )
        return value
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-3 (no dot) as a string; users mean the number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        if isinstance(value, str):  # --set train.lora_targets=q_proj,v_proj
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of names, got {value!r}")
        return list(value)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _check_type(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} has the wrong type")
    raise TypeError(f"unsupported config type {hint} for {key}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            valid = [f"{prefix}{n}" for n in names]
            raise ConfigError(f"unknown config key '{full}'{closest(full, valid)}; valid keys: {', '.join(valid)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{full}.")
        else:
            kwargs[key] = _check_type(value, hint, full)
    return cls(**kwargs)


def from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a plain mapping."""
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def load(recipe: str | None = None, config_file: str | None = None, overrides: list[str] | None = None) -> Config:
    """Load a recipe or a config file, apply ``--set`` overrides, validate, and freeze."""
    if recipe and config_file:
        raise ConfigError("give either --recipe or --config, not both")
    raw = apply_overrides(load_file_dict(config_file) if config_file else load_recipe_dict(recipe or "digits-cnn"),
                          overrides or [])
    notes: list[str] = []
    if isinstance(raw.get("model"), dict) and raw["model"].get("pretrained"):
        raw, notes = resolve_pretrained(raw, overrides or [])
    return dataclasses.replace(from_dict(raw), notes=tuple(notes))


# ---------------------------------------------------------------------------------------------------------------
# A pretrained checkpoint's settings

def read_pretrained(path: str):
    """What the checkpoint at ``path`` says of its model (:class:`models.hub.Pretrained`), and its tokenizer.json
    (``""`` when it has none); one-line errors for a missing or unsupported checkpoint."""
    from hvdtrain import storage
    from models import hub

    storage.check(path)
    config_file = storage.join(path, hub.CONFIG)
    if not storage.exists(config_file):
        raise ConfigError(f"model.pretrained='{path}' has no {hub.CONFIG}: give a Hugging Face model directory "
                          "(config.json, model.safetensors, tokenizer.json)")
    try:
        config = json.loads(storage.read_text(config_file))
        info = hub.adapter_of(config, config_file).read_config(config)
    except ValueError as exc:  # PretrainedError, or JSON
        raise ConfigError(f"model.pretrained='{path}': {str(exc).splitlines()[0]}") from None
    # (a shipped checkpoint's file keeps its builtin: name, so that the run's config.yaml holds no install path)
    tokenizer = f"{path.rstrip('/')}/{hub.TOKENIZER}" if path.startswith(storage.BUILTIN) else \
        storage.join(path, hub.TOKENIZER)
    return info, tokenizer if storage.exists(tokenizer) else ""


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= 1e-9 * max(1, abs(b))
    return a == b


def resolve_pretrained(raw: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``raw`` with the pretrained checkpoint's family, sizes, vocabulary and tokenizer in place of the recipe's
    (each change a note for the log); a ``--set`` that contradicts the checkpoint is a one-line error."""
    import models

    given = {".".join(parse_override(o)[0]) for o in overrides}

    def by_user(key: str) -> bool:
        return any(key == g or key.startswith(g + ".") for g in given)

    def differs(key: str, ours: Any, theirs: Any, notes: list[str]) -> None:
        if by_user(key):
            raise ConfigError(f"--set {key}={ours} contradicts model.pretrained='{path}', whose checkpoint says "
                              f"{theirs}; drop the --set (the checkpoint decides it)")
        notes.append(f"{key}: {theirs} from the pretrained checkpoint, not {ours}")

    model, data = dict(raw["model"]), dict(raw.get("data") or {})
    path = model["pretrained"]
    if not isinstance(path, str):
        raise ConfigError(f"model.pretrained: expected a path, got {path!r}")
    info, tokenizer = read_pretrained(path)
    notes: list[str] = []
    params = dict(model.get("params") or {})
    if model.get("name", info.family) != info.family:
        differs("model.name", model["name"], info.family, notes)
        foreign = [k for k in params if k not in models.params_of(info.family)]
        for key in foreign:
            if by_user(f"model.params.{key}"):
                raise ConfigError(f"model.params.{key}: the pretrained {info.family} has no such parameter")
            del params[key]
    for key, value in info.params.items():
        if key in params and not _same(params[key], value):
            differs(f"model.params.{key}", params[key], value, notes)
        params[key] = value
    for key, value in info.training.items():
        params.setdefault(key, value)
    model.update(name=info.family, params=params)
    if tokenizer:
        if data.get("tokenizer", tokenizer) != tokenizer:
            differs("data.tokenizer", data["tokenizer"], tokenizer, notes)
        data["tokenizer"] = tokenizer
    if data.get("num_classes", 0) not in (0, info.vocabulary):
        differs("data.num_classes", data["num_classes"], info.vocabulary, notes)
    data["num_classes"] = info.vocabulary
    context = data.get("context_length", DataConfig.context_length)
    if isinstance(context, int) and context > info.max_context:
        raise ConfigError(f"data.context_length={context} is longer than the pretrained model's "
                          f"{info.max_context} positions (its max_position_embeddings, or a sliding window: "
                          f"attention within it is exact); set data.context_length={info.max_context} or less")
    return {**raw, "model": model, "data": data}, notes


def validate(cfg: Config) -> None:
    """Checks that span keys or need ranges; types were checked while building."""
    for key in ("steps", "eval_every_steps", "eval_batches", "checkpoint_every_steps", "warmup_steps"):
        if getattr(cfg.train, key) < 0:
            raise ConfigError(f"train.{key} must be 0 or more, got {getattr(cfg.train, key)}")
    if cfg.train.steps and cfg.train.elastic:
        raise ConfigError("train.steps with elastic training is not supported (an elastic run's global batch "
                          "follows the world size: count it in epochs); set train.steps=0 or drop --elastic")
    if not cfg.train.steps and (cfg.train.eval_every_steps or cfg.train.checkpoint_every_steps):
        raise ConfigError("train.eval_every_steps and train.checkpoint_every_steps count a run in steps: set "
                          "train.steps (the run's length) too, or use train.checkpoint_every_epochs")
    positive = {
        "data.batch_size_per_rank": cfg.data.batch_size_per_rank,
        "train.epochs": cfg.train.epochs,
        "train.steps_per_execution": cfg.train.steps_per_execution,
        "train.keep_checkpoints": cfg.train.keep_checkpoints,
        "distributed.backward_passes_per_step": cfg.distributed.backward_passes_per_step,
        "data.context_length": cfg.data.context_length,
        "parallel.tensor": cfg.parallel.tensor,
        "parallel.pipeline": cfg.parallel.pipeline,
        "parallel.microbatches": cfg.parallel.microbatches,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    if cfg.train.clip_norm < 0:
        raise ConfigError(f"train.clip_norm must be 0 (off) or positive, got {cfg.train.clip_norm}")
    if cfg.train.learning_rate <= 0:
        raise ConfigError(f"train.learning_rate must be positive, got {cfg.train.learning_rate}")
    if cfg.train.warmup_epochs < 0:
        raise ConfigError(f"train.warmup_epochs must be 0 or more, got {cfg.train.warmup_epochs}")
    for key in ("test_fraction", "validation_fraction"):
        value = getattr(cfg.data, key)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"data.{key} must be in [0, 1), got {value}")
    if cfg.distributed.reduce_op == "adasum":
        raise ConfigError("distributed.reduce_op=adasum is not supported with Keras optimizers by Horovod 0.28; "
                          "use average or sum")
    if cfg.train.precision == "mixed_float16" and cfg.distributed.backward_passes_per_step > 1:
        raise ConfigError("train.precision=mixed_float16 with distributed.backward_passes_per_step > 1 lets ranks' "
                          "loss scales disagree; use mixed_bfloat16, or backward_passes_per_step=1")
    # the checks above need no TensorFlow (a usage error stops in half a second); the model's need its family
    import models  # the builders' signatures are the schema of model.params

    try:
        models.check_params(cfg.model.name, cfg.model.params)
    except models.ModelParamError as exc:
        raise ConfigError(str(exc)) from None
    c = cfg.compression
    if not 0.0 <= c.initial_sparsity <= c.target_sparsity < 1.0:
        raise ConfigError("compression: need 0 <= initial_sparsity <= target_sparsity < 1, got "
                          f"{c.initial_sparsity} and {c.target_sparsity}")
    if not 0.0 <= c.alpha <= 1.0 or c.temperature <= 0:
        raise ConfigError("compression.alpha must be in [0, 1] and compression.temperature positive")
    try:
        name, params, _, _ = student_of(cfg)
        models.check_params(name, params)
    except models.ModelParamError as exc:
        raise ConfigError(str(exc).replace("model.params.", "compression.student_params.")) from None
    validate_parallel(cfg)
    if cfg.data.source in ("tfrecord", "npz", "tokens") and not cfg.data.path:
        raise ConfigError(f"data.source={cfg.data.source} needs data.path; add --set data.path=/path/to/data")
    if cfg.data.tokenizer != "bytes" and cfg.data.source not in ("text", "tokens"):
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer} reads text: it needs data.source=text")
    if cfg.model.pretrained or cfg.train.lora_rank:
        validate_pretrained(cfg)
    if cfg.data.tokenizer == "bpe" and cfg.data.vocab_size <= 256:
        raise ConfigError(f"data.tokenizer=bpe needs data.vocab_size above the 256 byte tokens (e.g. 2048), not "
                          f"{cfg.data.vocab_size}")


def validate_pretrained(cfg: Config) -> None:
    """A pretrained start and LoRA: settings that cannot run."""
    import models

    t = cfg.train
    if cfg.model.pretrained and cfg.data.source not in ("text", "tokens", "synthetic"):
        raise ConfigError(f"model.pretrained is a language model: it trains on data.source=text or tokens (or "
                          f"synthetic), not {cfg.data.source}")
    if not t.lora_rank:
        return
    if t.lora_rank < 0 or t.lora_alpha <= 0 or not 0.0 <= t.lora_dropout < 1.0:
        raise ConfigError("train.lora_rank must be positive, train.lora_alpha positive and train.lora_dropout in "
                          "[0, 1)")
    if cfg.model.name not in models.language_models():
        raise ConfigError(f"train.lora_rank adapts a language model ({', '.join(models.language_models())}), not "
                          f"'{cfg.model.name}'")
    if not cfg.model.pretrained:
        raise ConfigError("train.lora_rank adapts a pretrained model (its base weights stay as the checkpoint "
                          "gives them): set model.pretrained")
    if cfg.train.elastic:
        raise ConfigError("train.lora_rank with elastic training is not supported; drop --elastic")
    try:
        plan = models.parallel_plan(cfg.model.name, input_shape=(cfg.data.context_length,),
                                    num_classes=max(cfg.data.num_classes, 1), **cfg.model.params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model '{cfg.model.name}' cannot be built with {cfg.model.params}: {exc}") from None
    lora_setting(cfg, plan)


def lora_setting(cfg: Config, plan):
    """The :class:`models.lora.Lora` that ``train.lora_*`` asks for on ``plan``'s model (None: no LoRA); its targets
    as the plan's weight suffixes (PEFT's module names translated by the family's Hugging Face adapter)."""
    if not cfg.train.lora_rank:
        return None
    from models import hub
    from models.lora import Lora, projections

    adapter = hub.adapters().get(plan.family)
    modules = adapter.modules if adapter else {}
    names = cfg.train.lora_targets or list(adapter.default_targets if adapter else [])
    if not names:
        raise ConfigError(f"train.lora_targets: name the projections to adapt ({', '.join(projections(plan))})")
    known = projections(plan)
    targets = []
    for name in names:
        found = [s for s, m in modules.items() if m == name] or ([name] if name in known else [])
        if not found:
            raise ConfigError(f"train.lora_targets: '{name}' is not a projection of the {plan.family} model; "
                              f"targets: {', '.join(dict.fromkeys([*modules.values(), *known]))}")
        targets += [s for s in found if s not in targets]
    return Lora(cfg.train.lora_rank, cfg.train.lora_alpha, tuple(targets), cfg.train.lora_dropout)


def validate_parallel(cfg: Config) -> None:
    """Parallel settings that cannot run (the world size is checked when the job starts)."""
    import models

    p = cfg.parallel
    modelled = p.tensor > 1 or p.pipeline > 1 or p.recompute or p.shard_params
    if modelled and not models.has_plan(cfg.model.name):
        with_plan = [n for n in models.names() if models.has_plan(n)]
        raise ConfigError(f"parallel.tensor, parallel.pipeline, parallel.recompute and parallel.shard_params need a "
                          f"model family with a parallel plan ({', '.join(with_plan)}), not '{cfg.model.name}' "
                          "(parallel.shard_optimizer works for any model)")
    if p.buckets_per_unit < 0:
        raise ConfigError(f"parallel.buckets_per_unit={p.buckets_per_unit}: cut each unit into 1 or more buckets, "
                          "or 0 to cut by size")
    if p.buckets_per_unit > 1 and not p.shard_params:
        raise ConfigError("parallel.buckets_per_unit cuts the buckets of sharded parameters: set "
                          "parallel.shard_params=true or leave it unset")
    if p.shard_degree < 0:
        raise ConfigError(f"parallel.shard_degree={p.shard_degree}: shard each weight over 1 or more data ranks, "
                          "or 0 for all of them")
    if p.shard_degree and not p.shard_params:
        raise ConfigError("parallel.shard_degree sets the ranks sharded parameters are split over: set "
                          "parallel.shard_params=true or leave it unset")
    if p.sequence and p.tensor == 1:
        raise ConfigError("parallel.sequence=true splits the positions over the tensor-parallel group: it needs "
                          "parallel.tensor > 1")
    if not (modelled or p.shard_optimizer):
        if p.microbatches > 1:
            raise ConfigError("parallel.microbatches > 1 needs parallel.pipeline > 1")
        return
    if cfg.train.elastic:
        raise ConfigError("elastic training runs data parallelism only; set parallel.tensor=1, pipeline=1, "
                          "shard_optimizer=false, shard_params=false and recompute=false, or drop --elastic")
    d = cfg.distributed
    if d.backward_passes_per_step > 1 or d.grad_compression != "none" or d.reduce_op != "average":
        # they configure Horovod's DistributedOptimizer, which these layouts do not use: ignored, they would
        # silently train something else than asked (a sum of gradients, found by a negative control)
        raise ConfigError("parallel layouts average gradients themselves: use distributed.backward_passes_per_step=1, "
                          "distributed.grad_compression=none and distributed.reduce_op=average")
    if cfg.train.jit_compile:
        raise ConfigError("parallel layouts do not compile with XLA; set train.jit_compile=false")
    if p.pipeline == 1 and p.microbatches > 1:
        raise ConfigError("parallel.microbatches > 1 needs parallel.pipeline > 1")
    if modelled:
        # the plan at the configured context (its vocabulary is checked once the data is loaded: a placeholder here)
        try:
            plan = models.parallel_plan(cfg.model.name, input_shape=(cfg.data.context_length,),
                                        num_classes=p.tensor, **cfg.model.params)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model '{cfg.model.name}' cannot be built with {cfg.model.params}: {exc}") from None
        divisors = {**plan.divisors, **({"data.context_length (parallel.sequence=true)": plan.activation[0]}
                                        if p.sequence else {})}
        for what, value in divisors.items():
            if value % p.tensor:
                raise ConfigError(f"parallel.tensor={p.tensor} must divide {what}={value}")
        blocks = sum(u.pin is None for u in plan.units)
        if p.pipeline > blocks:
            raise ConfigError(f"parallel.pipeline={p.pipeline} stages need at least as many blocks; the model has "
                              f"{blocks} (model.params.num_layers)")
        if cfg.data.batch_size_per_rank % p.microbatches:
            raise ConfigError(f"parallel.microbatches={p.microbatches} must divide data.batch_size_per_rank="
                              f"{cfg.data.batch_size_per_rank}")


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain data (for ``config.yaml`` and ``summary.json``)."""
    out = dataclasses.asdict(cfg)
    out.pop("notes", None)
    return out


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, loadable again with ``--config``."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
