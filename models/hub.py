"""Hugging Face checkpoints in and out: ``config.json`` with safetensors weights, read into any share of a family's
weights and written back, and PEFT's LoRA adapters.

A family that can come from the Hugging Face format registers an :class:`Adapter` beside its builder and plan (as
torchtitan keeps a state-dict adapter per model): which ``architectures`` it reads, ``config.json`` to its builder
parameters and back, and where each of its plan's weights lives in the checkpoint (:class:`Tensor`: the tensor's
name and how its axes are made of the weight's, transposes and fused tensors included). Nothing here names a family.

**Reading a share.** A weight's slice (a tensor-parallel rank's heads, say) is a box of the Hugging Face tensor: a
range of rows or of columns, never anything else, because a plan only splits the major axis of what it stores
whole. :class:`Weights` reads a box from the safetensors files by byte ranges: rows in one read, columns in
blocks of rows of at most :data:`BLOCK_BYTES`, so a rank holds its share and one block, never the tensor. Where the
files are comes from a :class:`Files` (a local directory here; hvdtrain passes its object storage).

**Writing.** :class:`SafetensorsWriter` writes a file one tensor at a time after a header computed from the shapes
alone; :func:`shard` splits the tensors over files of at most a size, named as transformers names them, with the
index that maps each tensor to its file.

The format (safetensors): 8 bytes of little-endian header length, a JSON header ``{name: {dtype, shape,
data_offsets}}`` (offsets relative to the data, which follows the header), then the tensors' bytes, row-major.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BLOCK_BYTES = 16 * 2**20  # the most a column slice reads at once
DEFAULT_CONTEXT = 1024  # a loaded model's window when the caller gives none (at most the checkpoint's)


class PretrainedError(ValueError):
    """A Hugging Face checkpoint that cannot be read, or a setting of it that no family implements."""


def _dtypes() -> dict[str, np.dtype]:
    import ml_dtypes

    return {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
            "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
            "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(bool)}


FLOATS = ("F32", "F16", "BF16", "F64")
CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


# ---------------------------------------------------------------------------------------------------------------
# Where the files are


class Files(Protocol):
    """The files of one checkpoint directory."""

    def exists(self, name: str) -> bool: ...

    def read(self, name: str) -> bytes: ...  # a whole (small) file

    def read_range(self, name: str, start: int, stop: int) -> bytes: ...  # bytes [start, stop) of a file

    def where(self, name: str) -> str: ...  # the file's path or URI, for messages


class LocalFiles:
    """A local directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def read_range(self, name: str, start: int, stop: int) -> bytes:
        with open(self.root / name, "rb") as f:
            data = os.pread(f.fileno(), stop - start, start)
        if len(data) != stop - start:
            raise PretrainedError(f"{self.where(name)} is truncated: it ends before byte {stop}")
        return data

    def where(self, name: str) -> str:
        return str(self.root / name)


def read_json(files: Files, name: str) -> dict:
    """A JSON file of the checkpoint, with a one-line error when it is missing or malformed."""
    if not files.exists(name):
        raise PretrainedError(f"{files.where(name)} does not exist")
    try:
        value = json.loads(files.read(name))
    except ValueError as exc:
        raise PretrainedError(f"{files.where(name)} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise PretrainedError(f"{files.where(name)} is not a JSON object")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Safetensors


@dataclass(frozen=True)
class Stored:
    """One tensor of a safetensors file: its dtype code, shape and absolute byte range."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int


def read_header(files: Files, name: str) -> dict[str, Stored]:
    """The tensors of one safetensors file (its header only is read)."""
    head = files.read_range(name, 0, 8)
    length = int.from_bytes(head, "little")
    if length <= 0 or length > 100 * 2**20:
        raise PretrainedError(f"{files.where(name)} is not a safetensors file (header length {length})")
    try:
        header = json.loads(files.read_range(name, 8, 8 + length))
    except ValueError as exc:
        raise PretrainedError(f"{files.where(name)} has a malformed safetensors header ({exc})") from None
    sizes = _dtypes()
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in sizes:
            raise PretrainedError(f"{files.where(name)}: tensor {key} is of dtype {info['dtype']}, which hvdtrain "
                                  "does not read (float32, bfloat16, float16)")
        start, stop = info["data_offsets"]
        shape = tuple(int(d) for d in info["shape"])
        if stop - start != math.prod(shape) * sizes[info["dtype"]].itemsize:
            raise PretrainedError(f"{files.where(name)}: tensor {key} has {stop - start} bytes for shape {shape}")
        out[key] = Stored(name, info["dtype"], shape, 8 + length + start, 8 + length + stop)
    return out


class Weights:
    """The tensors of a checkpoint directory: one ``model.safetensors``, or shards named by
    ``model.safetensors.index.json``; any box of any tensor, as float32, reading only its bytes."""

    def __init__(self, files: Files):
        self.files = files
        if files.exists(INDEX):
            index = read_json(files, INDEX)
            shards = sorted(set(index.get("weight_map", {}).values()))
            if not shards:
                raise PretrainedError(f"{files.where(INDEX)} maps no tensor to a file")
            for shard_name in shards:
                if not files.exists(shard_name):
                    raise PretrainedError(f"{files.where(shard_name)} is missing: {INDEX} names it as a shard")
        elif files.exists(WEIGHTS):
            shards = [WEIGHTS]
        else:
            other = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5") if files.exists(n)]
            hint = f" (it has {other[0]}: convert it to safetensors)" if other else ""
            raise PretrainedError(f"{files.where(WEIGHTS)} does not exist{hint}; a Hugging Face checkpoint needs "
                                  f"{WEIGHTS} or {INDEX} with its shards")
        self.stored: dict[str, Stored] = {}
        for shard_name in shards:
            self.stored.update(read_header(files, shard_name))

    def __contains__(self, name: str) -> bool:
        return name in self.stored

    def shape(self, name: str) -> tuple[int, ...]:
        return self.stored[name].shape

    def dtype(self, name: str) -> str:
        return self.stored[name].dtype

    def read(self, name: str, box=None) -> np.ndarray:
        """The values of ``box = (start, size)`` (default: all) of tensor ``name``, as float32 (any axis may be
        partial; the rows between the first and last are read in blocks)."""
        if name not in self.stored:
            raise PretrainedError(f"the checkpoint has no tensor {name}")
        s = self.stored[name]
        dtype = _dtypes()[s.dtype]
        shape = s.shape
        start, size = box or ((0,) * len(shape), shape)
        if not shape:
            return np.frombuffer(self.files.read_range(s.file, s.start, s.stop), dtype).astype(np.float32)
        row = math.prod(shape[1:]) * dtype.itemsize
        whole_rows = all(a == 0 and n == d for a, n, d in zip(start[1:], size[1:], shape[1:]))
        if whole_rows:
            first = s.start + start[0] * row
            data = self.files.read_range(s.file, first, first + size[0] * row)
            return np.frombuffer(data, dtype).reshape(size).astype(np.float32)
        out = np.empty(size, np.float32)
        inner = tuple(slice(a, a + n) for a, n in zip(start[1:], size[1:]))
        block = max(1, BLOCK_BYTES // max(row, 1))
        for r in range(start[0], start[0] + size[0], block):
            k = min(block, start[0] + size[0] - r)
            data = self.files.read_range(s.file, s.start + r * row, s.start + (r + k) * row)
            rows = np.frombuffer(data, dtype).reshape((k,) + shape[1:])
            out[r - start[0]: r - start[0] + k] = rows[(slice(None),) + inner]
        return out


class SafetensorsWriter:
    """A safetensors file written one tensor at a time, in the order given (the header comes first, so every
    tensor's dtype code and shape are given up front)."""

    def __init__(self, path: str | os.PathLike, tensors: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        sizes = _dtypes()
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self.order = []
        for name, code, shape in tensors:
            nbytes = math.prod(shape) * sizes[code].itemsize
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            self.order.append((name, sizes[code], tuple(shape)))
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.file = open(path, "wb")
        self.file.write(len(text).to_bytes(8, "little") + text)
        self.next = 0

    def write(self, name: str, value) -> None:
        """Write the next tensor (cast to its declared dtype)."""
        expected, dtype, shape = self.order[self.next]
        if name != expected or tuple(np.shape(value)) != shape:
            raise ValueError(f"expected {expected} of shape {shape}, got {name} of shape {np.shape(value)}")
        self.file.write(np.ascontiguousarray(np.asarray(value, np.float32).astype(dtype)).tobytes())
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.order):
            raise ValueError(f"{len(self.order) - self.next} tensors were not written")
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        if kind is None:
            self.close()
        else:
            self.file.close()


def shard(tensors: list[tuple[str, str, tuple[int, ...]]], max_bytes: int, stem: str = "model"
          ) -> list[tuple[str, list[tuple[str, str, tuple[int, ...]]]]]:
    """Tensors over files of at most ``max_bytes`` each (a tensor larger than that alone in its file), named as
    transformers names them: ``model.safetensors`` when one file holds everything, else
    ``model-00001-of-0000N.safetensors``."""
    sizes = _dtypes()
    groups: list[list] = [[]]
    used = 0
    for t in tensors:
        nbytes = math.prod(t[2]) * sizes[t[1]].itemsize
        if groups[-1] and used + nbytes > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(t)
        used += nbytes
    if len(groups) == 1:
        return [(f"{stem}.safetensors", groups[0])]
    return [(f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors", g) for i, g in enumerate(groups)]


def index_of(files: list[tuple[str, list[tuple[str, str, tuple[int, ...]]]]]) -> dict:
    """The ``model.safetensors.index.json`` of sharded files."""
    sizes = _dtypes()
    total = sum(math.prod(t[2]) * sizes[t[1]].itemsize for _, group in files for t in group)
    return {"metadata": {"total_size": total}, "weight_map": {t[0]: name for name, group in files for t in group}}


# ---------------------------------------------------------------------------------------------------------------
# Where a family's weight lives in a checkpoint


@dataclass(frozen=True)
class Tensor:
    """Where one weight of a family's plan lives in a Hugging Face checkpoint.

    Attributes:
        name: the Hugging Face tensor's name.
        axes: for each axis of the Hugging Face tensor, the weight's axes it is made of, major first: Llama's
            ``q_proj.weight`` ``[heads x head size, width]`` holds the weight ``(width, heads, head size)`` as
            ``((1, 2), (0,))``; a plain transpose is ``((1,), (0,))``.
        shape: the Hugging Face tensor's whole shape.
        offset: where the weight starts along each Hugging Face axis (a weight that is part of a fused tensor,
            such as GPT-2's query in ``c_attn``); None: at 0.
    """

    name: str
    axes: tuple[tuple[int, ...], ...]
    shape: tuple[int, ...]
    offset: tuple[int, ...] | None = None

    def box(self, weight_shape, start, size) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The box of the Hugging Face tensor that holds the weight's box ``(start, size)``."""
        hf_start, hf_size = [], []
        for j, group in enumerate(self.axes):
            at = self.offset[j] if self.offset else 0
            partial = [a for a in group if start[a] != 0 or size[a] != weight_shape[a]]
            inner = math.prod(weight_shape[a] for a in group[1:])
            if not partial:
                hf_start.append(at)
                hf_size.append(math.prod(weight_shape[a] for a in group))
            elif partial == [group[0]]:
                hf_start.append(at + start[group[0]] * inner)
                hf_size.append(size[group[0]] * inner)
            else:
                raise ValueError(f"a box of {self.name} that is not a range of its axis {j}")
        return tuple(hf_start), tuple(hf_size)

    def to_weight(self, values: np.ndarray, size) -> np.ndarray:
        """The Hugging Face box ``values`` as the weight's box of shape ``size``."""
        order = [a for group in self.axes for a in group]
        moved = values.reshape([size[a] for a in order])
        return np.transpose(moved, np.argsort(order))

    def from_weight(self, value: np.ndarray) -> np.ndarray:
        """The weight's whole value laid out as its part of the Hugging Face tensor."""
        order = [a for group in self.axes for a in group]
        moved = np.transpose(value, order)
        return moved.reshape([math.prod(value.shape[a] for a in group) for group in self.axes])


@dataclass(frozen=True)
class Pretrained:
    """What a ``config.json`` says of a model, in a family's terms."""

    family: str
    params: dict[str, Any]  # builder parameters that fix the architecture (a run may not change them)
    vocabulary: int
    max_context: int  # the longest window the checkpoint supports (its positions, or its sliding window)
    training: dict[str, Any] = field(default_factory=dict)  # builder parameters a run may change (dropout)


@dataclass(frozen=True)
class Adapter:
    """A family's Hugging Face adapter.

    Attributes:
        family: the registered family.
        architectures: the ``architectures`` of ``config.json`` it reads (``LlamaForCausalLM``, ...).
        read_config: ``config.json`` -> :class:`Pretrained`; raises :class:`PretrainedError` naming a setting it
            does not implement.
        write_config: ``(builder params, vocabulary, context) -> config.json`` (raises PretrainedError when the
            model has no Hugging Face equivalent).
        tensors: ``(plan, config.json) -> {weight name: Tensor}`` for every weight of the plan.
        base_prefix: the first component of every tensor name that a checkpoint of the base model alone (GPT-2's
            ``GPT2Model``, without the language-model head) leaves out.
        modules: ``{weight name suffix: PEFT module name}`` of the projections LoRA can adapt (``attn/query/kernel``:
            ``q_proj``); fused modules (GPT-2's ``c_attn``) name the same module for several weights.
        default_targets: the weight suffixes PEFT adapts by default for this architecture.
    """

    family: str
    architectures: tuple[str, ...]
    read_config: Callable[[dict], Pretrained]
    write_config: Callable[..., dict]
    tensors: Callable[[Any, dict], dict[str, Tensor]]
    base_prefix: str = ""
    modules: dict[str, str] = field(default_factory=dict)
    default_targets: tuple[str, ...] = ()


_ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> Adapter:
    """Register a family's adapter (its module calls this at import, beside ``register`` and ``register_plan``)."""
    _ADAPTERS[adapter.family] = adapter
    return adapter


def adapters() -> dict[str, Adapter]:
    """Every registered adapter by family."""
    from models.registry import _load_all

    _load_all()
    return dict(_ADAPTERS)


def supported() -> list[str]:
    """Every architecture a family reads."""
    return sorted(a for adapter in adapters().values() for a in adapter.architectures)


def adapter_of(config: dict, where: str = CONFIG) -> Adapter:
    """The adapter of the architecture ``config.json`` names (a one-line error for any other, and for a quantized
    checkpoint)."""
    quantized = config.get("quantization_config")
    if quantized:
        raise PretrainedError(f"{where}: a quantized checkpoint ({quantized.get('quant_method', 'quantization')}) "
                              "cannot be read; give its float32, bfloat16 or float16 weights")
    names = config.get("architectures") or []
    for adapter in adapters().values():
        if any(n in adapter.architectures for n in names):
            return adapter
    what = ", ".join(names) or f"model_type '{config.get('model_type', '?')}' without architectures"
    raise PretrainedError(f"{where}: architecture {what} is not supported; supported: {', '.join(supported())}")


def family_of(family: str) -> Adapter:
    """The adapter of a registered family (a one-line error when it has none)."""
    found = adapters().get(family)
    if found is None:
        raise PretrainedError(f"model '{family}' has no Hugging Face equivalent; families that do: "
                              f"{', '.join(sorted(adapters()))}")
    return found


# ---------------------------------------------------------------------------------------------------------------
# A checkpoint, read


class Checkpoint:
    """A Hugging Face checkpoint directory read for a family: its config, what it means, and any share of any of
    the family's weights.

    Args:
        files: where the directory's files are.
        context: the model's window (0: the checkpoint's longest, at most :data:`DEFAULT_CONTEXT`).
    """

    def __init__(self, files: Files, context: int = 0):
        self.files = files
        self.config = read_json(files, CONFIG)
        self.adapter = adapter_of(self.config, files.where(CONFIG))
        self.pretrained = self.adapter.read_config(self.config)
        self.context = context or min(self.pretrained.max_context, DEFAULT_CONTEXT)
        if self.context > self.pretrained.max_context:
            raise PretrainedError(f"a window of {self.context} tokens is longer than {files.where(CONFIG)} allows "
                                  f"({self.pretrained.max_context}); use a shorter context length")
        self._weights: Weights | None = None
        self._tensors: dict[str, Tensor] | None = None

    @property
    def family(self) -> str:
        return self.pretrained.family

    @property
    def params(self) -> dict[str, Any]:
        """Builder parameters of the checkpoint's model (architecture, then the training defaults)."""
        return {**self.pretrained.training, **self.pretrained.params}

    def plan(self, **params):
        """The family's plan of this checkpoint's model (``params``: training parameters set otherwise)."""
        from models.registry import parallel_plan

        return parallel_plan(self.family, input_shape=(self.context,), num_classes=self.pretrained.vocabulary,
                             **{**self.params, **params})

    @property
    def weights(self) -> Weights:
        if self._weights is None:
            self._weights = Weights(self.files)
        return self._weights

    def tensors(self, plan) -> dict[str, Tensor]:
        """Where each of ``plan``'s weights is, checked against the files (one line for a missing tensor or a
        shape that disagrees with config.json)."""
        if self._tensors is None:
            weights = self.weights
            found = self.adapter.tensors(plan, self.config)
            prefix = self.adapter.base_prefix + "."
            for name, t in list(found.items()):
                if t.name not in weights and t.name.startswith(prefix) and t.name[len(prefix):] in weights:
                    found[name] = t = dataclasses.replace(t, name=t.name[len(prefix):])
                if t.name not in weights:
                    raise PretrainedError(f"the checkpoint in {self.files.where('')} has no tensor {t.name} "
                                          f"({name} of the {self.family} model config.json describes)")
                if weights.shape(t.name) != t.shape:
                    raise PretrainedError(f"{t.name} has shape {weights.shape(t.name)} in the checkpoint, but "
                                          f"{CONFIG} says {t.shape}")
            self._tensors = found
        return self._tensors

    def read(self, plan, name: str, box=None) -> np.ndarray:
        """The box ``(start, size)`` (default: all) of the plan's weight ``name``, as float32."""
        weight = plan.weight(name)
        t = self.tensors(plan)[name]
        start, size = box or ((0,) * len(weight.shape), weight.shape)
        return t.to_weight(self.weights.read(t.name, t.box(weight.shape, start, size)), size)

    def tokenizer(self):
        """The checkpoint's ``tokenizers.Tokenizer`` (None when it has no tokenizer.json)."""
        if not self.files.exists(TOKENIZER):
            return None
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_str(self.files.read(TOKENIZER).decode("utf-8"))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises a plain Exception for a malformed file
            raise PretrainedError(f"{self.files.where(TOKENIZER)} is not a tokenizer.json that Hugging Face "
                                  f"tokenizers reads ({exc})") from None


def from_pretrained(path, *, context_length: int = 0, files: Files | None = None, adapter=None,
                    with_tokenizer: bool = False, **params):
    """A Hugging Face checkpoint as the family's Keras model (float32 weights; logits ``(batch, length, vocabulary)``
    from token ids).

    Args:
        path: a local directory holding ``config.json`` and ``model.safetensors`` (or shards with
            ``model.safetensors.index.json``); for object storage give ``files`` (``hvdtrain.from_pretrained``
            does).
        context_length: the model's window in tokens (0: the checkpoint's, at most :data:`DEFAULT_CONTEXT`).
        files: where the files are, instead of the local directory ``path``.
        adapter: a PEFT LoRA adapter directory (``adapter_config.json``, ``adapter_model.safetensors``) to merge
            into the weights.
        with_tokenizer: also return the checkpoint's ``tokenizers.Tokenizer`` (None without tokenizer.json).
        params: builder parameters a run may set (``dropout``).

    Returns:
        The model, or ``(model, tokenizer)`` with ``with_tokenizer``.
    """
    from models.plan import keras_variables
    from models.registry import build

    checkpoint = Checkpoint(files or LocalFiles(path), context_length)
    plan = checkpoint.plan(**params)
    model = build(checkpoint.family, input_shape=(checkpoint.context,), num_classes=checkpoint.pretrained.vocabulary,
                  **{**checkpoint.params, **params})
    deltas = read_adapter(LocalFiles(adapter), checkpoint, plan) if adapter else {}
    for name, var in keras_variables(model, plan).items():
        value = checkpoint.read(plan, name)
        if name in deltas:
            value = value + deltas[name]()
        var.assign(value)
    if with_tokenizer:
        return model, checkpoint.tokenizer()
    return model


# ---------------------------------------------------------------------------------------------------------------
# PEFT's LoRA adapters


def lora_modules(adapter: Adapter, targets: Iterable[str]) -> list[str]:
    """PEFT's ``target_modules`` for weight suffixes (``attn/query/kernel`` -> ``q_proj``)."""
    out = []
    for t in targets:
        if t not in adapter.modules:
            raise PretrainedError(f"'{t}' cannot be adapted for PEFT; it knows {', '.join(adapter.modules)}")
        if adapter.modules[t] not in out:
            out.append(adapter.modules[t])
    return out


def module_of(tensor: Tensor) -> str:
    """The name of the module whose weight ``tensor`` is (``model.layers.0.self_attn.q_proj``)."""
    return tensor.name[: -len(".weight")] if tensor.name.endswith(".weight") else tensor.name


def peft_name(tensor: Tensor, factor: str) -> str:
    """PEFT's name of a LoRA factor (``lora_A``, ``lora_B``) of the module holding ``tensor``."""
    return f"base_model.model.{module_of(tensor)}.{factor}.weight"


def fan_in_first(tensor: Tensor, weight) -> bool:
    """Whether a projection's Hugging Face tensor is ``[in, out]`` (GPT-2's Conv1D) rather than ``[out, in]``
    (``nn.Linear``)."""
    return set(tensor.axes[0]) == set(range(weight.inputs))


def read_adapter(files: Files, checkpoint: Checkpoint, plan) -> dict[str, Callable[[], np.ndarray]]:
    """A PEFT LoRA adapter as ``{weight name: () -> its update (scale x A B, the weight's shape)}``.

    ``target_modules`` name modules by the end of their names (``q_proj``, ``attn.c_proj``), as PEFT matches them.
    A module that fuses several weights (GPT-2's ``c_attn``: query, key, value) shares its ``lora_A``; each weight
    takes its rows of ``lora_B``."""
    config = read_json(files, ADAPTER_CONFIG)
    where = files.where(ADAPTER_CONFIG)
    if config.get("peft_type", "LORA") != "LORA":
        raise PretrainedError(f"{where}: peft_type {config.get('peft_type')} is not LoRA")
    if config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise PretrainedError(f"{where}: DoRA and per-module ranks or alphas are not supported")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not files.exists(ADAPTER_WEIGHTS):
        raise PretrainedError(f"{files.where(ADAPTER_WEIGHTS)} does not exist")
    stored = AdapterWeights(files)
    deltas = {}
    for name, t in checkpoint.tensors(plan).items():
        weight = plan.weight(name)
        module = module_of(t)
        if not weight.inputs or not any(module == m or module.endswith("." + m) for m in targets):
            continue

        def delta(name=name, t=t, weight=weight):
            a = stored.read(peft_name(t, "lora_A"))  # (r, in)
            b = stored.read(peft_name(t, "lora_B"))  # (out, r)
            full = (b @ a).T if fan_in_first(t, weight) else b @ a  # as the Hugging Face tensor is laid out
            start, size = t.box(weight.shape, (0,) * len(weight.shape), weight.shape)
            return t.to_weight(full[tuple(slice(s, s + n) for s, n in zip(start, size))] * scale, weight.shape)

        deltas[name] = delta
    if not deltas:
        raise PretrainedError(f"{where}: target_modules {targets} name no module of the {checkpoint.family} model")
    return deltas


class AdapterWeights(Weights):
    """The tensors of ``adapter_model.safetensors``."""

    def __init__(self, files: Files):
        self.files, self.stored = files, read_header(files, ADAPTER_WEIGHTS)


# ---------------------------------------------------------------------------------------------------------------
# Writing a checkpoint


def dtype_config(config: dict, dtype: str) -> dict:
    """``config`` recording the weights' dtype as transformers 4 (``torch_dtype``) and 5 (``dtype``) read it."""
    return {**config, "torch_dtype": dtype, "dtype": dtype}


def write_weights(directory: str | os.PathLike, adapter: Adapter, plan, config: dict,
                  values: Callable[[str], np.ndarray], dtype: str = "float32",
                  max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write the plan's weights (``values(name)``: a weight's whole value) as a Hugging Face checkpoint's
    safetensors files in ``dtype`` (``float32``, ``bfloat16``, ``float16``), one tensor at a time (a fused tensor
    is assembled from its weights), in files of at most ``max_shard_bytes`` with their index. Returns the file
    names written."""
    directory = Path(directory)
    tensors = adapter.tensors(plan, config)
    parts: dict[str, list[tuple[str, Tensor]]] = {}
    for name, t in tensors.items():
        parts.setdefault(t.name, []).append((name, t))
    code = CODES[dtype]
    files = shard([(hf, code, group[0][1].shape) for hf, group in parts.items()], max_shard_bytes)
    for file, group in files:
        with SafetensorsWriter(directory / file, group) as writer:
            for hf, _, shape in group:
                whole = np.zeros(shape, np.float32)
                for name, t in parts[hf]:
                    piece = t.from_weight(np.asarray(values(name), np.float32))
                    at = t.offset or (0,) * len(shape)
                    whole[tuple(slice(a, a + n) for a, n in zip(at, piece.shape))] = piece
                writer.write(hf, whole)
    written = [file for file, _ in files]
    if len(files) > 1:
        (directory / INDEX).write_text(json.dumps(index_of(files), indent=2) + "\n")
        written.append(INDEX)
    return written


def save_pretrained(model, directory: str | os.PathLike, dtype: str = "float32", max_shard_bytes: int = 5 * 2**30,
                    tokenizer=None) -> list[str]:
    """Write a Keras model of a family with an adapter as a Hugging Face checkpoint directory (``config.json``,
    safetensors weights, and ``tokenizer.json`` when a ``tokenizers.Tokenizer`` is given). Returns the files."""
    from models.plan import keras_variables
    from models.registry import _FROM_MODEL, plan_of

    plan = plan_of(model)
    if plan is None:
        raise PretrainedError(f"model '{model.name}' is not of a family with a plan")
    adapter = family_of(plan.family)
    context, vocabulary = int(model.input_shape[1]), int(model.output_shape[-1])
    config = dtype_config(adapter.write_config(_FROM_MODEL[plan.family](model), vocabulary, context), dtype)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    variables = keras_variables(model, plan)
    written = write_weights(directory, adapter, plan, config, lambda name: variables[name].numpy(), dtype,
                            max_shard_bytes)
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    written.append(CONFIG)
    if tokenizer is not None:
        (directory / TOKENIZER).write_text(tokenizer.to_str())
        written.append(TOKENIZER)
    return written
