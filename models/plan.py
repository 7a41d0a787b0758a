"""A model family's parallel plan: every weight of the one-process model, how it may be split, and the math of each
unit written once for any layout.

A family registers its plan beside its builder (``@register_plan("gpt")``). The plan is data plus pure functions;
it imports no Horovod and nothing of hvdtrain. The parallel engines (``hvdtrain/distributed``) read it and never
name a layer of any model:

- :class:`Weight`: a variable of the one-process model by its full name (``block_0/attn/query/kernel``), its global
  shape, its Keras initializer, and the axis that tensor parallelism splits (column-parallel layers split their
  output axis, row-parallel layers their input axis, the vocabulary-parallel embedding and logits the vocabulary
  axis; None: replicated).
- :class:`Unit`: a run of the model that a pipeline stage holds whole (the embedding, one block, the head); its
  ``apply`` is the unit's forward pass for any tensor-parallel size.
- :class:`Context`: what a unit's math asks of the layout. :class:`LocalContext` is one process (the Keras
  layers use it); the engine's tensor-parallel context enters and leaves a split region with Megatron's *f* and
  *g* operators and draws dropout masks from seeds.

Every weight starts from its own seed (:func:`seed_of`), so a layout that makes one variable at a time and keeps
its slice starts from exactly the one-process model's weights.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Weight:
    """One variable of the one-process model."""

    name: str  # the full name, e.g. "block_0/attn/query/kernel" (the Keras variable is this + ":0")
    shape: tuple[int, ...]
    initializer: Any  # a Keras initializer identifier: "glorot_uniform", "zeros", or a config dict
    split: int | None = None  # the axis split across a tensor-parallel group; None: every member holds it whole
    lookup: bool = False  # read by index (an embedding table), not multiplied: no FLOPs unless a unit shares it
    # a projection's kernel: how many of its leading axes are the input's (``x[..., in] @ W[in, out]``); 0: not a
    # projection (LoRA adapts projections only)
    inputs: int = 0
    trainable: bool = True  # False: frozen (LoRA's base weights)
    # its gradient on each tensor-parallel member covers that member's part of the computation only (a replicated
    # weight used inside a split region, such as a LoRA factor beside a split kernel): summed over the group
    partial_gradient: bool = False

    def local_shape(self, parts: int) -> tuple[int, ...]:
        """The shape each of ``parts`` tensor-parallel members holds."""
        if self.split is None or parts == 1:
            return self.shape
        shape = list(self.shape)
        shape[self.split] //= parts
        return tuple(shape)

    @property
    def size(self) -> int:
        """Number of elements."""
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Unit:
    """A part of the model a pipeline stage holds whole.

    Attributes:
        name: the unit's name (``embed``, ``block_3``, ``head``).
        kind: what it does (``embed``, ``block``, ``head``): the argument ``apply`` dispatches on.
        weights: its own weights, in the order of its Keras layers' weights.
        layers: the Keras layers of the one-process model that hold those weights, in order.
        shared: names of weights it uses but another unit owns (tied embeddings).
        pin: ``"first"`` or ``"last"``: the pipeline stage it must sit on; None: any.
        recompute: whether recomputation in the backward pass applies to it.
        index: its position in the model (dropout sites are numbered by it, so they never repeat).
        attention: the width of its attention's queries (heads x head size; 0: no attention), for the FLOPs count.
    """

    name: str
    kind: str
    weights: tuple[Weight, ...]
    layers: tuple[str, ...]
    shared: tuple[str, ...] = ()
    pin: str | None = None
    recompute: bool = False
    index: int = 0
    attention: int = 0

    @property
    def parameters(self) -> int:
        """Number of parameters it owns."""
        return sum(w.size for w in self.weights)


class Context(Protocol):
    """What a unit's math asks of the layout it runs in (one process, or a member of a tensor-parallel group)."""

    size: int  # members of the tensor-parallel group
    rank: int  # this member's index
    dtype: Any  # the compute dtype (activations); weights are cast to it where they are used
    training: bool

    def enter(self, x): ...  # Megatron's f: identity forward, the group's sum of gradients backward

    def exit(self, x): ...  # Megatron's g: the group's sum forward, identity backward

    def max(self, x): ...  # the group's elementwise maximum (no gradient)

    def min(self, x): ...  # the group's elementwise minimum (no gradient)

    def dropout(self, x, rate: float, site: int, split_axis: int | None = None): ...
    # the mask of `site` (:func:`dropout`): x's slice of the one-process mask; ``split_axis``: the axis of x that
    # is split across the group (each member then holds its own part of the mask), None: x is replicated


class LocalContext:
    """One process: no group. Dropout masks come from ``key`` (:func:`dropout`); without one, from TensorFlow's
    global generator as Keras' own layers do."""

    size, rank = 1, 0

    def __init__(self, dtype: Any = "float32", training: bool = False, key=None):
        self.dtype, self.training, self.key = dtype, bool(training), key

    def enter(self, x):
        return x

    def exit(self, x):
        return x

    def max(self, x):
        return x

    def min(self, x):
        return x

    def dropout(self, x, rate: float, site: int, split_axis: int | None = None):
        import tensorflow as tf

        if not self.training or rate <= 0:
            return x
        if self.key is None:
            return tf.nn.dropout(x, rate=rate)
        return dropout(x, rate, self.key, site)


# ---------------------------------------------------------------------------------------------------------------
# Dropout masks that do not depend on the layout
#
# A mask element is kept or dropped by a hash of (the run's seed, the training step, the dropout site, the
# example's index in the step's global batch, the element's index in the example's whole activation). Nothing of
# the layout enters: a data-parallel replica, a pipeline micro-batch and a tensor-parallel member each compute
# exactly their part of the one-process mask (replicated activations: the same mask on every member of a tensor
# group; split ones, such as attention weights split by head, each member its heads' part), recomputation draws
# the same mask again, and no two sites (blocks, stages) share a mask.

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1


def _mix_int(h: int) -> int:
    """MurmurHash3's 32-bit finalizer on a Python int in [0, 2^32)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def _mixer():
    """MurmurHash3's 32-bit finalizer on int64 tensors of values in [0, 2^32) (products wrap; the low 32 bits are
    kept), with its constants made once per caller: a trace's cost is its number of ops."""
    import tensorflow as tf

    c16, c13, m32, c1, c2 = (tf.constant(v, tf.int64) for v in (16, 13, _M32, 0x85EBCA6B, 0xC2B2AE35))

    def mix(h):
        h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, c16))
        h = tf.bitwise.bitwise_and(h * c1, m32)
        h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, c13))
        h = tf.bitwise.bitwise_and(h * c2, m32)
        return tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, c16))

    return mix, m32


@dataclass(frozen=True)
class DropoutKey:
    """What a forward pass's masks are drawn from: the run's ``seed``, the training ``step`` and ``offset``, the
    index of the pass's first example in the step's global batch (tensors or ints)."""

    seed: Any
    step: Any
    offset: Any = 0
    # the hash of (seed, step), shared by every site of the pass: per graph being traced (a recomputed forward pass
    # in a gradient's graph makes its own)
    _hashed: dict = field(default_factory=dict, compare=False, repr=False)

    def hashed(self, mix, m32):
        import tensorflow as tf

        graph = tf.compat.v1.get_default_graph() if not tf.executing_eagerly() else None
        if graph not in self._hashed:
            step = tf.bitwise.bitwise_and(tf.cast(self.step, tf.int64), m32)
            if isinstance(self.seed, int):
                seed = _mix_int((self.seed * _GOLDEN + 0x632BE5AB) & _M32)
            else:
                seed = mix(tf.bitwise.bitwise_and(tf.cast(self.seed, tf.int64) * _GOLDEN + 0x632BE5AB, m32))
            self._hashed[graph] = mix(tf.bitwise.bitwise_xor(step, seed))
        return self._hashed[graph]


def dropout(x, rate: float, key: DropoutKey, site: int, split_axis: int | None = None, rank=0, parts: int = 1):
    """Inverted dropout of ``x`` (batch first) with the layout-independent mask of ``site``.

    ``split_axis``/``rank``/``parts``: ``x`` is member ``rank``'s of ``parts`` equal slices of the activation along
    that axis (its mask is that slice of the whole activation's).

    The element's index in the example's whole activation is a sum of one term per axis (its coordinate times the
    whole activation's stride), each a constant where the axis' size is known when tracing."""
    import numpy as np
    import tensorflow as tf

    mix, m32 = _mixer()
    dims = x.shape.as_list()
    element, stride = None, 1
    for axis in range(len(dims) - 1, 0, -1):
        split, n = axis == split_axis and parts > 1, dims[axis]
        broadcast = [-1 if a == axis else 1 for a in range(len(dims))]
        if n is not None and isinstance(stride, int) and isinstance(rank, int):
            coords = np.arange(n, dtype=np.int64) + (rank * n if split else 0)
            term = tf.constant((coords * stride).reshape(broadcast))
        else:
            n = tf.shape(x, out_type=tf.int64)[axis] if n is None else tf.constant(n, tf.int64)
            term = tf.reshape((tf.range(n) + (tf.cast(rank, tf.int64) * n if split else 0)) * stride, broadcast)
        stride = stride * n * (parts if split else 1)
        element = term if element is None else element + term
    base = mix(tf.bitwise.bitwise_xor(key.hashed(mix, m32), site))
    batch = dims[0] if dims[0] is not None else tf.shape(x, out_type=tf.int64)[0]
    first = tf.cast(key.offset, tf.int64) if not isinstance(key.offset, int) else key.offset
    example = tf.reshape(tf.range(batch, dtype=tf.int64) + first, [-1] + [1] * (len(dims) - 1))
    h = mix(tf.bitwise.bitwise_and(base + example * _GOLDEN, m32))
    if element is not None:
        h = mix(tf.bitwise.bitwise_xor(h, tf.bitwise.bitwise_and(element, m32)))
    else:  # a batch of scalars: each example's only element is 0
        h = mix(h)
    keep = h >= int(rate * 2**32)
    return tf.where(keep, x / tf.cast(1.0 - rate, x.dtype), tf.zeros_like(x))


def keras_weight(layer, name: str, shape, initializer):
    """A family layer's weight: float32 and never autocast (the family's math casts it where it uses it, in every
    layout alike)."""
    return layer.add_weight(name=name, shape=shape, initializer=initializer, trainable=True,
                            experimental_autocast=False)


def is_clock(variable) -> bool:
    """Whether ``variable`` is a :class:`DropoutClock`'s step counter (not part of the model's weights)."""
    return variable.name.split("/")[-1].split(":")[0] == "dropout_step"


def set_clocks(model, step: int) -> None:
    """Set every dropout step counter of a Keras model (after a resume: the step the run continues from)."""
    for v in model.variables:
        if is_clock(v):
            v.assign(step)


class DropoutClock:
    """The dropout key of a Keras layer of the one-process model: a step counter (one per training call, kept
    with the layer's weights but not trainable), the run's seed and the replica's first example, which hvdtrain
    sets (:func:`initialize`)."""

    def __init__(self, layer):
        import tensorflow as tf

        self.step = layer.add_weight(name="dropout_step", shape=(), dtype=tf.int64, initializer="zeros",
                                     trainable=False)
        layer.dropout_seed, layer.dropout_offset = 0, 0
        self.layer = layer

    def key(self, training, active: bool = True) -> DropoutKey | None:
        """The key of this call when training and the layer drops anything (``active``), else None. Every training
        call advances the step, so that it counts the run's steps with or without dropout (as a checkpoint's step
        does: a model file written from a sharded checkpoint holds the same)."""
        if not training:
            return None
        step = self.step.assign_add(1) - 1
        return DropoutKey(self.layer.dropout_seed, step, self.layer.dropout_offset) if active else None


@dataclass(frozen=True)
class Plan:
    """A model's parallel plan (see the module doc).

    Attributes:
        family: the registered model name.
        units: in model order; the first is pinned to the first pipeline stage, the last to the last.
        apply: ``apply(unit, params, x, ctx) -> y``: a unit's forward pass; ``params`` maps the full names of its
            weights (and of its ``shared`` ones) to this member's slices of them.
        activation: ``(positions, width)``: what flows between units per example.
        vocabulary: the output classes; with tensor parallelism the last unit returns this member's slice of the
            vocabulary (``vocabulary // size`` logits, in member order).
        divisors: ``{what: number}`` that a tensor-parallel size must divide (named for the error message).
        twin: ``{"params": ..., "restore": {key: value}}``: builder parameters of a model of the same structure
            but tiny weights, and the layer config keys to set back to the real values:
            :mod:`hvdtrain.formats.keras_file` writes a ``.keras`` file from the twin's and streams the real weights.
        decode: for language models, ``decode(params, tokens, positions, attention, ctx=None) -> logits``: new
            ``tokens`` ``(batch, n)`` at ``positions`` ``(batch, n)``, each block's attention replaced by
            ``attention(i, q, k, v)`` (keys and values with their own heads): the cached decoder's forward pass, in
            one process or (``ctx``) as a tensor-parallel member over its slices (its heads; its slice of the
            vocabulary's logits).
        cache: ``(blocks, key-value heads, head size)``: the shape of the decoder's key-value cache per position.
    """

    family: str
    units: tuple[Unit, ...]
    apply: Callable[..., Any]
    activation: tuple[int, int]
    vocabulary: int
    divisors: dict[str, int]
    twin: dict[str, Any] = field(default_factory=dict)
    decode: Callable[..., Any] | None = None
    cache: tuple[int, int, int] | None = None

    @property
    def weights(self) -> list[Weight]:
        """Every weight, in model order."""
        return [w for u in self.units for w in u.weights]

    def weight(self, name: str) -> Weight:
        """The weight called ``name``."""
        for w in self.weights:
            if w.name == name:
                return w
        raise KeyError(f"the {self.family} plan has no weight '{name}'")

    @property
    def parameters(self) -> int:
        """Number of parameters of the whole model."""
        return sum(u.parameters for u in self.units)

    def flops_per_token(self, recompute: bool = False) -> float:
        """Model FLOPs of one token of a training step, forward and backward, by the PaLM paper's formula
        (Chowdhery et al. 2022, appendix B): ``6 N + 12 L H Q T``, with ``N`` the parameters that are multiplied
        (an embedding table read by index counts only where a unit shares it as a matrix, as tied logits do) and
        ``12 L H Q T`` the attention's scores and weighted sum over the ``T`` positions of the context, counted
        whole, not halved for the causal mask (as PaLM and Megatron-LM count it).

        ``recompute=True`` gives the *hardware* FLOPs of a run that recomputes its recomputable units in the
        backward pass (their forward pass twice: ``8 N + 16 L H Q T`` for them).
        """
        shared = {name for u in self.units for name in u.shared}
        total = 0.0
        for u in self.units:
            n = sum(w.size for w in u.weights if not w.lookup or w.name in shared)
            per = 6 * n + 12 * u.attention * self.activation[0]
            total += per * (4 / 3 if recompute and u.recompute else 1)
        return total


def seed_of(seed: int, name: str) -> int:
    """The initializer seed of the weight ``name`` in a run seeded ``seed`` (the same in every layout)."""
    return zlib.crc32(f"{seed}/{name}".encode()) & 0x7FFFFFFF


def initial_value(weight: Weight, seed: int):
    """The weight's initial value (float32, its global shape), drawn from its own seed."""
    import tensorflow as tf

    init = tf.keras.initializers.get(weight.initializer)
    config = init.get_config()
    if "seed" in config:
        init = init.__class__.from_config({**config, "seed": seed_of(seed, weight.name)})
    return init(weight.shape, dtype=tf.float32)


def keras_variables(model, plan: Plan) -> dict[str, Any]:
    """``{weight name: variable}`` of a one-process Keras model built by the plan's family."""
    out = {}
    for unit in plan.units:
        variables = [v for layer in unit.layers for v in model.get_layer(layer).weights if not is_clock(v)]
        if len(variables) != len(unit.weights):
            raise ValueError(f"layers {unit.layers} hold {len(variables)} weights, the plan says {len(unit.weights)}")
        for weight, var in zip(unit.weights, variables):
            if tuple(var.shape) != weight.shape:
                raise ValueError(f"{weight.name}: the model's variable has shape {tuple(var.shape)}, the plan "
                                 f"{weight.shape}")
            out[weight.name] = var
    return out


def initialize(model, plan: Plan, seed: int, example_offset: int = 0, values=None) -> None:
    """Give a one-process Keras model of the family the plan's initial weights (each from its own seed, or
    ``values(weight, None)`` where that is not None: a pretrained checkpoint's), and its dropout masks the run's
    seed (``example_offset``: a data-parallel replica's first example in the global batch)."""
    for name, var in keras_variables(model, plan).items():
        weight = plan.weight(name)
        given = values(weight, None) if values is not None else None
        var.assign(given if given is not None else initial_value(weight, seed))
        del given
    for layer in model.layers:
        if hasattr(layer, "dropout_seed"):
            layer.dropout_seed, layer.dropout_offset = int(seed), int(example_offset)
