"""``hvdtrain evaluate``: a model file, or a run's checkpoint at a layout, scored on the test split of its data."""
from __future__ import annotations

from pathlib import Path


def evaluate_file(path: str, cfg, allow_unsafe: bool = False) -> dict | None:
    """Evaluate a ``.keras`` or ``.tflite`` model, or a run's checkpoint, on the test split of ``cfg``'s data.

    Keras models are evaluated data-parallel when launched on several ranks; TFLite models on the chief. A
    checkpoint with ``parallel.tensor``/``parallel.pipeline`` set is evaluated at that layout: each rank reads only
    its part (for a model that one host cannot hold). Returns the metrics on the chief, None elsewhere.
    """
    import tempfile

    from hvdtrain import data, distributed, formats, runtime, storage
    from hvdtrain.exact_metrics import evaluate

    runtime.init(cfg)
    resolved = formats.resolve(path)
    source = data.load(cfg.data, seed=cfg.train.seed, model_name=cfg.model.name)
    if resolved.endswith(".tflite"):
        from hvdtrain.compression.common import Artifact
        from hvdtrain.serving.tflite import TFLiteModel
        from hvdtrain.compression.report import evaluate_artifact
        from hvdtrain.errors import DataError

        with tempfile.TemporaryDirectory(prefix="hvdtrain-eval-") as tmp:
            local = Path(tmp) / storage.basename(resolved)
            storage.download(resolved, local)
            model = TFLiteModel(local)
            if tuple(model.input_shape) != tuple(source.input_shape):
                raise DataError(f"'{resolved}' takes inputs of shape {model.input_shape}, but the data has "
                                f"{tuple(source.input_shape)}")
            if not distributed.is_chief():
                return None
            result = evaluate_artifact(Artifact(storage.basename(resolved), "tflite", local, "none"), source)
    elif formats.is_checkpoint(resolved) and (cfg.parallel.tensor > 1 or cfg.parallel.pipeline > 1):

        layout = runtime.make_layout(cfg, source, runtime.make_mesh(cfg))
        layout.load_checkpoint(resolved, optimizer=False)
        result = evaluate(layout.training_model, source, "test", cfg.data.batch_size_per_rank,
                          shard=(layout.data_rank, layout.data_size), counted=layout.counted)
    else:
        model = formats.load_model(resolved, allow_unsafe=allow_unsafe, context_length=cfg.data.context_length)
        formats.check_fit(model, source, f"'{resolved}'")
        result = evaluate(model, source, "test", cfg.data.batch_size_per_rank)
    return {"model": resolved, **result} if distributed.is_chief() else None
