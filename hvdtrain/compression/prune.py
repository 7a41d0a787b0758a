"""Magnitude pruning (Zhu & Gupta, 2017) with tensorflow-model-optimization, fine-tuned data-parallel.

Dense and convolution kernels are wrapped by ``prune_low_magnitude``; layers that tfmot cannot prune (embeddings,
normalisation, custom blocks) are left dense and listed. Sparsity ramps along a polynomial (or constant) schedule to
the target over the fine-tuning steps. The pruning-step callback runs on every rank; masks are computed from
weights that Horovod keeps identical, so the masks are identical too (tested at 2 ranks). The wrappers are stripped
before export.
"""
from __future__ import annotations

import numpy as np

from hvdtrain import distributed
from hvdtrain.compression.common import fine_tune
from hvdtrain.config import Config
from hvdtrain.batch_plan import make_plan

PRUNABLE = ("Dense", "Conv2D", "Conv1D", "DepthwiseConv2D")


def _schedule(cfg: Config, end_step: int):
    import tensorflow_model_optimization as tfmot

    c = cfg.compression
    if c.sparsity_schedule == "constant":
        return tfmot.sparsity.keras.ConstantSparsity(c.target_sparsity, begin_step=0, frequency=c.pruning_frequency)
    return tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=c.initial_sparsity, final_sparsity=c.target_sparsity, begin_step=0,
        end_step=max(1, end_step), frequency=c.pruning_frequency,
    )


def prunable_layers(model) -> list[str]:
    """Names of the layers that pruning will wrap (Dense and convolution layers at the top level)."""
    return [layer.name for layer in model.layers if type(layer).__name__ in PRUNABLE]


def prune(model, source, cfg: Config, epochs: int | None = None, loss=None, teacher=None):
    """Prune and fine-tune ``model``; returns ``(stripped_model, notes)``.

    With a ``teacher`` (for ``--method prune`` the dense model itself, for the pipeline the distillation's
    teacher), fine-tuning minimizes the distillation loss instead of the labels' alone, so the teacher guides the
    model while its weights are removed.
    ``notes`` has the pruned layers with their measured sparsity and the layers left dense.
    """
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot

    c = cfg.compression
    epochs = epochs or c.fine_tune_epochs
    plan = make_plan(num_train_examples=source.num_train, data_ranks=distributed.size(),
                     batch_size_per_rank=cfg.data.batch_size_per_rank, epochs=epochs, learning_rate=c.learning_rate)
    # Reach the target two thirds of the way through, then fine-tune at that sparsity. tfmot updates the masks
    # only every `frequency` steps and not after `end_step`, so the end must fall on an update or the last masks
    # stop just short of the target.
    freq = c.pruning_frequency
    schedule = _schedule(cfg, max(freq, int(plan.total_steps * 2 / 3) // freq * freq))
    extra = {"sparsity_m_by_n": (2, 4)} if c.structured_2_4 else {}
    targets = set(prunable_layers(model))

    def wrap(layer):
        fresh = layer.__class__.from_config(layer.get_config())  # never wrap (and so change) the input model
        if layer.name in targets:
            return tfmot.sparsity.keras.prune_low_magnitude(fresh, pruning_schedule=schedule, **extra)
        return fresh

    pruned = tf.keras.models.clone_model(model, clone_function=wrap)
    # clone_model gives fresh weights; start from the trained ones (wrappers hold the same kernels).
    for layer in pruned.layers:
        inner = getattr(layer, "layer", layer)  # the pruning wrapper holds the original layer
        inner.set_weights(model.get_layer(inner.name).get_weights())
    trained = pruned
    if teacher is not None:
        from hvdtrain.compression.distill import make_distiller, with_teacher_outputs

        trained = make_distiller(pruned, teacher, cfg, source)
        source = with_teacher_outputs(trained, source, epochs, distributed.size())
    # UpdatePruningStep finds the wrappers inside the Distiller too (tfmot collects nested models' layers)
    fine_tune(trained, source, cfg, epochs, c.learning_rate, [tfmot.sparsity.keras.UpdatePruningStep()], loss=loss)
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    notes = {
        "pruned_layers": layer_sparsity(stripped, targets),
        "dense_layers": [lyr.name for lyr in model.layers if lyr.weights and lyr.name not in targets],
        "target_sparsity": c.target_sparsity,
        "schedule": c.sparsity_schedule,
        "structured_2_4": c.structured_2_4,
        "fine_tuned_with": "distillation" if teacher is not None else "labels",
    }
    return stripped, notes


def layer_sparsity(model, names) -> dict[str, float]:
    """Fraction of zeros in the kernel of each named layer."""
    out = {}
    for name in sorted(names):
        kernel = model.get_layer(name).get_weights()[0]
        out[name] = float(1.0 - np.count_nonzero(kernel) / kernel.size)
    return out


def is_2_4_sparse(kernel: np.ndarray) -> bool:
    """True when every group of 4 consecutive weights along the input axis has at most 2 non-zeros."""
    k = np.moveaxis(kernel, -1, 0).reshape(kernel.shape[-1], -1)  # (out, in...) like tfmot's m_by_n check
    if k.shape[1] % 4:
        return False
    return bool((np.count_nonzero(k.reshape(k.shape[0], -1, 4), axis=-1) <= 2).all())
