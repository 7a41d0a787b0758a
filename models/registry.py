"""Registry of model builders.

A builder is a pure function ``builder(*, input_shape, num_classes, **params) -> keras.Model`` that returns an
*uncompiled* model whose output is float32 logits. Builders never import Horovod, never compile, and run nothing at
import time; parallelism, optimizers and precision are applied outside (``hvdtrain.train``).
"""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

_BUILDERS: dict[str, Callable[..., Any]] = {}
_PLANS: dict[str, Callable[..., Any]] = {}
_FROM_MODEL: dict[str, Callable[..., Any]] = {}


class ModelParamError(ValueError):
    """A model name or parameter that no builder accepts."""


def register(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` as the builder called ``name``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _BUILDERS:
            raise ValueError(f"model '{name}' is registered twice")
        _BUILDERS[name] = fn
        return fn

    return deco


def register_plan(name: str, from_model: Callable[..., Any] | None = None
                  ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` as the parallel plan of the family ``name`` (:class:`models.plan.Plan`); it takes the
    builder's keyword arguments. ``from_model(model)`` gives the builder parameters of a built model of the family
    (for :func:`plan_of`)."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _PLANS[name] = fn
        if from_model is not None:
            _FROM_MODEL[name] = from_model
        return fn

    return deco


def has_plan(name: str) -> bool:
    """Whether the family ``name`` has a parallel plan (tensor and pipeline parallelism need one)."""
    _load_all()
    return name in _PLANS


def parallel_plan(name: str, *, input_shape: tuple[int, ...], num_classes: int, **params: Any):
    """The parallel plan of the model ``build(name, ...)`` would build (no weights are made)."""
    check_params(name, params)
    if not has_plan(name):
        raise ModelParamError(f"model '{name}' has no parallel plan; families with one: {', '.join(sorted(_PLANS))}")
    return _PLANS[name](input_shape=tuple(input_shape), num_classes=int(num_classes), **params)


def language_models() -> list[str]:
    """The families whose plan decodes text (their models map tokens to next-token logits)."""
    _load_all()
    return sorted(name for name in _FROM_MODEL)


def plan_of(model):
    """The parallel plan of a built Keras model of a registered family (its name is the family's); None for a
    model of no family with a plan."""
    _load_all()
    name = getattr(model, "name", "")
    if name not in _FROM_MODEL:
        return None
    return _PLANS[name](input_shape=tuple(model.input_shape[1:]), num_classes=int(model.output_shape[-1]),
                        **_FROM_MODEL[name](model))


def names() -> list[str]:
    """Registered model names."""
    _load_all()
    return sorted(_BUILDERS)


def builder(name: str) -> Callable[..., Any]:
    """The builder function registered as ``name``."""
    _load_all()
    if name not in _BUILDERS:
        hint = difflib.get_close_matches(name, list(_BUILDERS), n=1)
        did = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ModelParamError(f"unknown model '{name}'{did}; registered: {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[name]


def params_of(name: str) -> dict[str, Any]:
    """The tunable parameters of a builder and their defaults (``input_shape``/``num_classes`` excluded)."""
    sig = inspect.signature(builder(name))
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.name not in ("input_shape", "num_classes") and p.kind is p.KEYWORD_ONLY
    }


def check_params(name: str, params: dict[str, Any]) -> None:
    """Raise :class:`ModelParamError` naming any parameter the builder does not take."""
    valid = params_of(name)
    for key in params:
        if key not in valid:
            hint = difflib.get_close_matches(key, list(valid), n=1)
            did = f" (did you mean 'model.params.{hint[0]}'?)" if hint else ""
            raise ModelParamError(
                f"model '{name}' has no parameter 'model.params.{key}'{did}; it takes: {', '.join(valid)}"
            )


def build(name: str, *, input_shape: tuple[int, ...], num_classes: int, **params: Any):
    """Build the registered model ``name``: an uncompiled ``keras.Model`` with float32 logits."""
    check_params(name, params)
    return builder(name)(input_shape=tuple(input_shape), num_classes=int(num_classes), **params)


def _load_all() -> None:
    # Importing the family modules registers them (``models/__init__`` imports them: their custom Keras layers are
    # registered for ``load_model`` as soon as ``models`` is imported).
    from models import cnn, gpt, llama, mlp, resnet  # noqa: F401
