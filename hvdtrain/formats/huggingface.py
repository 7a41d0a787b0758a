"""Hugging Face checkpoints on hvdtrain's storage: read into a rank's share, and runs exported back.

The format itself and each family's tensor names live in :mod:`models.hub` and the families; this module gives
them hvdtrain's storage (a local directory or an ``s3://`` prefix, read by byte ranges), its errors (one line, no
traceback) and its run directories:

- :func:`open_checkpoint`: a checkpoint directory for a run's model (``model.pretrained``), from which every rank
  reads the boxes of the weights it holds (:func:`initial_values`);
- :func:`load_model`: the whole Keras model (``generate``, ``evaluate``, ``compress``, ``export``);
- :func:`export`: a run (or any model hvdtrain reads) as a Hugging Face directory, ``config.json``,
  ``generation_config.json``, safetensors weights (sharded above a size, with the index) and the tokenizer's files,
  such that ``transformers.AutoModelForCausalLM.from_pretrained`` loads it; a LoRA run as a PEFT adapter
  (``adapter_config.json``, ``adapter_model.safetensors``) over the checkpoint it started from, or merged.

Small checkpoints ship inside the package (``builtin:NAME``: :func:`hvdtrain.storage.builtin_path`), so a recipe
can start from one on any machine: they were made by transformers (``scripts/reference/make_hf_fixtures.py``).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from hvdtrain import storage
from hvdtrain.errors import ModelFileError, UsageError

# the file names of the format (as models.hub names them; repeated here so that resolving a path needs no TensorFlow)
CONFIG, WEIGHTS, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
DTYPES = ("float32", "bfloat16", "float16")


class StorageFiles:
    """A checkpoint directory on hvdtrain's storage (``s3://`` read by byte ranges), as :class:`models.hub.Files`."""

    def __init__(self, uri: str):
        self.uri = uri

    def exists(self, name: str) -> bool:
        return storage.exists(self.where(name))

    def read(self, name: str) -> bytes:
        return storage.read_bytes(self.where(name))

    def read_range(self, name: str, start: int, stop: int) -> bytes:
        data = storage.read_range(self.where(name), start, stop)
        if len(data) != stop - start:
            raise ModelFileError(f"{self.where(name)} is truncated: it ends before byte {stop}")
        return data

    def where(self, name: str) -> str:
        return storage.join(self.uri, name) if name else self.uri


def files_of(uri: str):
    """The files of a checkpoint directory (``builtin:NAME``, local, or on object storage)."""
    from models.hub import LocalFiles

    return LocalFiles(storage.local_path(uri)) if storage.is_local(uri) else StorageFiles(uri)


def is_pretrained(uri: str) -> bool:
    """Whether ``uri`` is a Hugging Face checkpoint directory (``config.json`` and its weights)."""
    return storage.exists(storage.join(uri, CONFIG)) and (
        storage.exists(storage.join(uri, WEIGHTS)) or storage.exists(storage.join(uri, INDEX)))


def check_directory(uri: str) -> None:
    """A one-line error for a directory with ``config.json`` but without weights."""
    raise ModelFileError(f"'{uri}' has {CONFIG} but neither {WEIGHTS} nor {INDEX}: a Hugging Face checkpoint needs "
                         "its safetensors weights")


@contextlib.contextmanager
def one_line_errors():
    """:class:`models.hub.PretrainedError` (a bad checkpoint) as hvdtrain's one-line :class:`ModelFileError`."""
    from models.hub import PretrainedError

    try:
        yield
    except PretrainedError as exc:
        raise ModelFileError(str(exc)) from None


def open_checkpoint(uri: str, context: int = 0):
    """The :class:`models.hub.Checkpoint` at ``uri`` for a model of ``context`` tokens (0: the checkpoint's, at
    most :data:`models.hub.DEFAULT_CONTEXT`)."""
    from models.hub import Checkpoint

    if not is_pretrained(uri):
        if storage.exists(storage.join(uri, CONFIG)):
            check_directory(uri)
        raise ModelFileError(f"'{uri}' is not a Hugging Face checkpoint: it has no {CONFIG}")
    with one_line_errors():
        return Checkpoint(files_of(uri), context)


def load_model(uri: str, context: int = 0, adapter: str | None = None, **params):
    """The whole Keras model of the checkpoint at ``uri`` (``adapter``: a PEFT LoRA adapter merged in)."""
    from models.hub import from_pretrained

    checkpoint = open_checkpoint(uri, context)
    with one_line_errors():
        return from_pretrained(None, context_length=checkpoint.context, files=checkpoint.files,
                               adapter=adapter, **params)


def initial_values(checkpoint, plan):
    """``values(weight, box)``: the box ``(start, size)`` of a plan weight read from the checkpoint (the weights
    the checkpoint does not hold, LoRA's adapters, come from their initializers: None)."""
    with one_line_errors():
        tensors = checkpoint.tensors(plan)

    def values(weight, box):
        if weight.name not in tensors:
            return None
        with one_line_errors():
            return checkpoint.read(plan, weight.name, box)

    return values


# ---------------------------------------------------------------------------------------------------------------
# Export


def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``100KB`` or bytes, as bytes (as transformers' ``max_shard_size``)."""
    units = {"GB": 10**9, "MB": 10**6, "KB": 10**3, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "B": 1}
    t = str(text).strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * factor)
    if t.isdigit():
        return int(t)
    raise UsageError(f"--max-shard-size '{text}' is not a size such as 5GB, 500MB or 2000000")


class _Source:
    """What an export reads: the model's spec and each weight's whole value, from a checkpoint (one variable at a
    time: a run, its ``model.keras`` beside its checkpoints, a checkpoint folder) or from a model in memory (a
    ``.keras`` file alone, a Hugging Face directory); a LoRA run's adapter factors from its checkpoint."""

    def __init__(self, model_path: str, allow_unsafe: bool):
        from hvdtrain import formats
        from hvdtrain.formats import checkpoint

        resolved = formats.resolve(model_path)
        self.run_dir = formats.run_dir_of(model_path)
        found = resolved if formats.is_checkpoint(resolved) else None
        if found is None and resolved.endswith("model.keras"):
            newest = checkpoint.latest(storage.parent(resolved))
            found = newest if newest is not None and checkpoint.is_sharded(newest) else None
        if found is not None:
            from models.lora import lora_of

            self.reader = checkpoint.Reader(found)
            self.spec = checkpoint.spec_of(self.reader)
            self.lora = lora_of(self.spec)
            self.values = checkpoint.model_values(self.reader)  # (a LoRA run's: its adapters merged in)
            return
        import models
        from models.plan import keras_variables
        from models.registry import _FROM_MODEL

        model = formats.load_model(resolved, allow_unsafe=allow_unsafe)
        plan = models.plan_of(model)
        if plan is None:
            raise UsageError(f"--model {model_path} is not a language model of a family with a plan "
                             f"({', '.join(models.language_models())})")
        variables = keras_variables(model, plan)
        self.lora = None
        self.spec = {"name": plan.family, "params": _FROM_MODEL[plan.family](model),
                     "input_shape": list(model.input_shape[1:]), "num_classes": int(model.output_shape[-1]),
                     "pretrained": resolved if formats.is_huggingface(resolved) else None}
        self.values = lambda name: variables[name].numpy()


def export(model_path: str, output: str, merge: bool = False, dtype: str = "float32",
           max_shard_size: str = "5GB", allow_unsafe: bool = False) -> list[str]:
    """``hvdtrain export --format huggingface``: the model at ``model_path`` (a run, a checkpoint, a ``.keras``
    file, a Hugging Face directory) as a Hugging Face directory at ``output``; a LoRA run as a PEFT adapter unless
    ``merge``. Everything is checked before anything is written; the directory appears whole (written aside, then
    moved or uploaded with ``config.json`` last). Returns the files written."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    _check_output(output)
    import models  # noqa: F401 - registers the families and their adapters
    from hvdtrain.data import tokenizer as tokenizers
    from hvdtrain.formats.checkpoint import plan_of_spec
    from models import hub

    source = _Source(model_path, allow_unsafe)
    spec = source.spec
    context, vocabulary = int(spec["input_shape"][0]), int(spec["num_classes"])
    with one_line_errors():
        adapter = hub.family_of(spec["name"])
        plan = plan_of_spec(spec)
        base = open_checkpoint(spec["pretrained"], context) if spec.get("pretrained") else None
        # a fine-tune keeps its checkpoint's config (a Mistral stays a Mistral); a model of hvdtrain's own gets one
        config = dict(base.config) if base else adapter.write_config(spec["params"], vocabulary, context)
        config = hub.dtype_config(config, dtype)
    tok = tokenizers.load_beside(source.run_dir)
    with tempfile.TemporaryDirectory(prefix="hvdtrain-hf-") as tmp:
        folder = Path(tmp)
        with one_line_errors():
            if source.lora is not None and not merge:
                written = _write_adapter(folder, adapter, plan, config, source)
            else:
                written = hub.write_weights(folder, adapter, plan, config, source.values, dtype, max_bytes)
                (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
                written += [CONFIG, *_write_side_files(folder, base, config, tok, context)]
        return _publish(folder, output, written)


def _write_adapter(folder: Path, adapter, plan, config: dict, source: _Source) -> list[str]:
    """A LoRA run's PEFT adapter: per module, ``lora_A`` ``[r, in]`` and ``lora_B`` ``[out, r]``. A module that fuses
    several adapted weights (GPT-2's c_attn) gets their factors stacked (``A`` by rows, ``B`` block-diagonal), and
    every module the same rank (padded with zeros), so one ``r`` and ``lora_alpha`` give every update exactly."""
    from models import hub
    from models.lora import factor_names

    lora, read = source.lora, source.reader.read
    modules: dict[str, list] = {}
    for name, t in adapter.tensors(plan, config).items():
        if factor_names(name)[0] in source.reader.variables:
            modules.setdefault(hub.module_of(t), []).append((name, t))
    rank = lora.rank * max(len(parts) for parts in modules.values())
    fan_in = hub.fan_in_first(*next((t, plan.weight(n)) for parts in modules.values() for n, t in parts))
    out_axis = 1 if fan_in else 0  # of the Hugging Face tensor: [in, out] (Conv1D) or [out, in] (nn.Linear)
    factors = {}
    for parts in modules.values():
        shape = parts[0][1].shape
        a_all = np.zeros((rank, shape[1 - out_axis]), np.float32)
        b_all = np.zeros((shape[out_axis], rank), np.float32)
        for k, (name, t) in enumerate(parts):
            a_name, b_name = factor_names(name)
            a = read(a_name).reshape(-1, lora.rank)  # (in, r): the kernel's input axes flattened as the tensor's
            b = read(b_name).reshape(lora.rank, -1)  # (r, out)
            at = (t.offset or (0, 0))[out_axis]
            a_all[k * lora.rank:(k + 1) * lora.rank] = a.T
            b_all[at:at + b.shape[1], k * lora.rank:(k + 1) * lora.rank] = b.T
        factors[hub.peft_name(parts[0][1], "lora_A")] = a_all
        factors[hub.peft_name(parts[0][1], "lora_B")] = b_all
    with hub.SafetensorsWriter(folder / hub.ADAPTER_WEIGHTS, [(n, "F32", v.shape) for n, v in factors.items()]) as w:
        for name, value in factors.items():
            w.write(name, value)
    pretrained = source.spec["pretrained"]
    peft = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": lora.alpha * rank / lora.rank,
            "lora_dropout": lora.dropout, "target_modules": hub.lora_modules(adapter, lora.targets), "bias": "none",
            "fan_in_fan_out": fan_in, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "inference_mode": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
            "base_model_name_or_path": str(storage.local_path(pretrained).resolve())
            if storage.is_local(pretrained) else pretrained}
    (folder / hub.ADAPTER_CONFIG).write_text(json.dumps(peft, indent=2) + "\n")
    return [hub.ADAPTER_WEIGHTS, hub.ADAPTER_CONFIG]


def _write_side_files(folder: Path, base, config: dict, tok, context: int) -> list[str]:
    """``generation_config.json``, ``tokenizer.json`` and ``tokenizer_config.json``: the pretrained checkpoint's
    where the run started from one, else made from the run's tokenizer."""
    from models import hub

    written = []
    if base is not None and base.files.exists(hub.GENERATION_CONFIG):
        generation = json.loads(base.files.read(hub.GENERATION_CONFIG))
    else:
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        generation["_from_model_config"] = True
    (folder / hub.GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")
    written.append(hub.GENERATION_CONFIG)
    text = tok.to_json()
    if text is not None:
        (folder / hub.TOKENIZER).write_text(text)
        written.append(hub.TOKENIZER)
        if base is not None and base.files.exists(hub.TOKENIZER_CONFIG):
            tokenizer_config = json.loads(base.files.read(hub.TOKENIZER_CONFIG))
        else:
            tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context,
                                "clean_up_tokenization_spaces": False}
        (folder / hub.TOKENIZER_CONFIG).write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        written.append(hub.TOKENIZER_CONFIG)
    return written


def _is_export_file(name: str) -> bool:
    return name in (CONFIG, INDEX, "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "adapter_config.json", "adapter_model.safetensors") or (
        name.startswith("model") and name.endswith(".safetensors"))


def _check_output(output: str) -> None:
    """A local ``--output`` must be new, empty, or an earlier export (which the new one replaces whole)."""
    if storage.is_local(output):
        target = storage.local_path(output)
        if target.exists() and (not target.is_dir() or not all(_is_export_file(p.name) for p in target.iterdir())):
            raise UsageError(f"--output {output} already holds other files; give a new or empty directory")


def _publish(folder: Path, output: str, written: list[str]) -> list[str]:
    """Move the finished export to ``output`` (local: renamed into place, replacing an earlier export; object
    storage: uploaded file by file, config.json last). Returns the URIs written."""
    order = [n for n in written if n not in (CONFIG, "adapter_config.json")]
    order += [n for n in written if n not in order]
    if storage.is_local(output):
        target = storage.local_path(output)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        for name in order:
            shutil.move(str(folder / name), staging / name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    else:
        for name in order:
            storage.upload(folder / name, storage.join(output, name))
    return [storage.join(output, n) for n in order]
