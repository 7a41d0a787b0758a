"""Low-rank adapters (LoRA; Hu et al., 2021) on any family's plan.

:func:`adapt` turns a plan into the plan of its LoRA fine-tuning: every weight of the base is frozen, and each
target projection ``W`` (a kernel ``x[..., in] @ W[in, out]``) gains two trainable factors, ``A`` of shape
``(in..., rank)`` and ``B`` of shape ``(rank, out...)``, so that the layer computes
``x W + alpha / rank x (dropout(x) A) B`` as PEFT does (``A`` drawn as PEFT draws it, ``B`` zero: training starts
at the base model). The adapters run on the activations, never forming a ``W``-sized update.

Under tensor parallelism the factors split the way their kernel splits: a column-parallel kernel (output axis
split) keeps ``A`` whole and splits ``B`` on the same output axis; a row-parallel kernel (input axis split)
splits ``A`` on that input axis and keeps ``B`` whole. The factor each member holds whole then has a gradient
that covers the member's heads (or input rows) only: it is marked ``partial_gradient`` and summed over the group.

The family's math sees an adapted kernel as an :class:`Adapted` value in its weights: :func:`cast` and
:func:`project` (``models.gpt.project``) take it where they take a tensor.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from models.plan import Plan, Unit, Weight

# PEFT's kaiming_uniform_(a=sqrt(5)) for lora_A: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
A_INIT = {"class_name": "VarianceScaling", "config": {"scale": 1.0 / 3.0, "mode": "fan_in",
                                                      "distribution": "uniform"}}
SITE = 1 << 20  # dropout sites of the adapters' inputs start here (the families' own are below)


@dataclass(frozen=True)
class Lora:
    """``rank`` (r), ``alpha`` (the update is scaled by ``alpha / rank``), the plan's weights to adapt (by name
    suffix, ``attn/query/kernel``), and the dropout on the adapters' input."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def factor_names(name: str) -> tuple[str, str]:
    """The names of a weight's adapter factors."""
    return f"{name}/lora_a", f"{name}/lora_b"


def projections(plan: Plan) -> list[str]:
    """The suffixes (``attn/query/kernel``) of the plan's weights LoRA can adapt."""
    out = []
    for w in plan.weights:
        if w.inputs and "/" in w.name:
            suffix = w.name.split("/", 1)[1]
            if suffix not in out:
                out.append(suffix)
    return out


def targets_of(plan: Plan, lora: Lora) -> list[Weight]:
    """The plan's weights ``lora`` adapts (a ValueError naming a target that matches none)."""
    found = [w for w in plan.weights if w.inputs and any(w.name.endswith("/" + t) for t in lora.targets)]
    for t in lora.targets:
        if not any(w.name.endswith("/" + t) for w in found):
            raise ValueError(f"LoRA target '{t}' is not a projection of the {plan.family} model; it has: "
                             f"{', '.join(projections(plan))}")
    return found


def factors(weight: Weight, rank: int) -> tuple[Weight, Weight]:
    """The two factors of ``weight``'s adapter, split the way it splits."""
    a_name, b_name = factor_names(weight.name)
    ins, outs = weight.shape[:weight.inputs], weight.shape[weight.inputs:]
    row_parallel = weight.split is not None and weight.split < weight.inputs
    column_parallel = weight.split is not None and not row_parallel
    a = Weight(a_name, (*ins, rank), A_INIT, split=weight.split if row_parallel else None, inputs=weight.inputs,
               partial_gradient=column_parallel)
    b = Weight(b_name, (rank, *outs), "zeros", split=weight.split - weight.inputs + 1 if column_parallel else None,
               inputs=1, partial_gradient=row_parallel)
    return a, b


def adapt(plan: Plan, lora: Lora) -> Plan:
    """The plan of ``plan``'s model fine-tuned with ``lora``: every base weight frozen, adapters on the targets."""
    targets = {w.name for w in targets_of(plan, lora)}
    units = []
    for unit in plan.units:
        weights = []
        for w in unit.weights:
            weights.append(dataclasses.replace(w, trainable=False))
            if w.name in targets:
                weights += factors(w, lora.rank)
        units.append(dataclasses.replace(unit, weights=tuple(weights), layers=()))
    base_apply = plan.apply

    def apply(unit: Unit, params, x, ctx):
        adapted = dict(params)
        for k, w in enumerate(w for w in unit.weights if w.name in targets):
            a, b = factor_names(w.name)
            adapted[w.name] = Adapted(params[w.name], params[a], params[b], lora.scale, w.inputs,
                                      _dropout(ctx, lora.dropout, SITE + 64 * unit.index + k, w))
        return base_apply(unit, adapted, x, ctx)

    return dataclasses.replace(plan, units=tuple(units), apply=apply, twin={}, decode=None)


def _dropout(ctx, rate: float, site: int, w: Weight):
    if rate <= 0 or not ctx.training:
        return None
    row_parallel = w.split is not None and w.split < w.inputs

    def drop(x):
        axis = x.shape.rank - w.inputs + w.split if row_parallel else None
        return ctx.dropout(x, rate, site, split_axis=axis)

    return drop


class Adapted:
    """A frozen kernel and its adapter, as a family's math receives it: :func:`project` computes
    ``x W + scale (drop(x) A) B``."""

    def __init__(self, base, a, b, scale: float, inputs: int, drop=None):
        self.base, self.a, self.b, self.scale, self.inputs, self.drop = base, a, b, scale, inputs, drop

    def cast(self, dtype):
        import tensorflow as tf

        return Adapted(tf.cast(self.base, dtype), tf.cast(self.a, dtype), tf.cast(self.b, dtype), self.scale,
                       self.inputs, self.drop)

    def apply(self, x, axes: int):
        import tensorflow as tf

        h = x if self.drop is None else self.drop(x)
        low = tf.tensordot(tf.tensordot(h, self.a, axes), self.b, 1)
        return tf.tensordot(x, self.base, axes) + tf.cast(self.scale, low.dtype) * low


def cast(value, dtype):
    """A weight (or an :class:`Adapted` kernel) in ``dtype``."""
    import tensorflow as tf

    return value.cast(dtype) if isinstance(value, Adapted) else tf.cast(value, dtype)


def merged(kernel, a, b, scale: float):
    """``kernel + scale x A B`` (NumPy; ``A`` ``(in..., rank)``, ``B`` ``(rank, out...)``): the weight a LoRA
    fine-tune ends with."""
    import numpy as np

    return kernel + scale * np.tensordot(a, b, axes=1)


def lora_of(spec) -> Lora | None:
    """The :class:`Lora` a model spec records (``{"lora": {rank, alpha, targets, dropout}}``), or None."""
    raw = (spec or {}).get("lora")
    if not raw:
        return None
    return Lora(int(raw["rank"]), float(raw["alpha"]), tuple(raw["targets"]), float(raw.get("dropout", 0.0)))
