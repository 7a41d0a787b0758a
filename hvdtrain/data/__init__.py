"""Data sources by name, and sharding across ranks (``sharding.py``).

Every source is a :class:`~hvdtrain.data.source.Source`: :class:`~hvdtrain.data.source.ArraySource` for in-memory
data (digits, npz, text, synthetic), :class:`~hvdtrain.data.tfrecord.TFRecordSource` for TFRecord shards,
:class:`~hvdtrain.data.tokens.TokenSource` for a corpus prepared by ``hvdtrain data prepare`` (``prepare.py``, which
needs no TensorFlow: importing this package does not load it).
"""
from __future__ import annotations

from hvdtrain.errors import DataError

_LAZY = {"shard_dataset": "sharding", "shard_files": "sharding", "shard_indices": "sharding", "ArraySource": "source",
         "Source": "source", "without_autotune": "source"}


def __getattr__(name: str):
    # these import TensorFlow: loaded on first use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"hvdtrain.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'hvdtrain.data' has no attribute '{name}'")


def load(cfg, seed: int = 0, model_name: str = ""):
    """Load the source named by ``cfg.source`` (a :class:`~hvdtrain.config.DataConfig`); ``data.path`` may be a
    local path or a storage URI (``s3://bucket/prefix``)."""
    if cfg.path and cfg.source in ("text", "npz", "tfrecord", "tokens"):
        from hvdtrain import storage

        storage.check(cfg.path)
    if cfg.source == "digits":
        from hvdtrain.data import digits

        return digits.load(cfg.test_fraction, cfg.validation_fraction, seed)
    if cfg.source == "npz":
        from hvdtrain.data import npz

        return npz.load(cfg.path, cfg.test_fraction, cfg.validation_fraction, cfg.num_classes, seed)
    if cfg.source == "text":
        from hvdtrain.data import text

        return text.load(cfg.path, cfg.context_length, cfg.validation_fraction, cfg.test_fraction, cfg.tokenizer,
                         cfg.vocab_size, cfg.num_classes)
    if cfg.source == "tokens":
        from hvdtrain.data.tokens import TokenSource

        source = TokenSource(cfg.path, cfg.context_length, cfg.tokenizer, cfg.shuffle_buffer)
        if cfg.num_classes and cfg.num_classes < source.num_classes:
            raise DataError(f"data.path='{cfg.path}' was prepared with {source.num_classes} tokens, more than the "
                            f"model's vocabulary of {cfg.num_classes} (data.num_classes)")
        source.num_classes = cfg.num_classes or source.num_classes
        source.check_shards()
        return source
    if cfg.source == "tfrecord":
        from hvdtrain.data.tfrecord import TFRecordSource

        return TFRecordSource(cfg.path, cfg.image_size, cfg.num_classes, cfg.label_offset, cfg.augment,
                              cfg.num_examples)
    if cfg.source == "synthetic":
        from hvdtrain.data import synthetic

        import models

        if model_name in models.language_models():
            return synthetic.load((cfg.context_length,), cfg.num_classes or 256, cfg.num_examples or 2048,
                                  seed, task="language_model")
        size = cfg.image_size or 32
        return synthetic.load((size, size, 3), cfg.num_classes or 10, cfg.num_examples or 2048, seed)
    raise ValueError(f"unknown data.source '{cfg.source}'")


__all__ = ["ArraySource", "Source", "load", "shard_dataset", "shard_files", "shard_indices", "without_autotune"]
