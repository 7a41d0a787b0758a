"""Data sources by name, each returning :class:`~hvdtrain.data.source.Splits`; sharding in ``sharding.py``."""
from __future__ import annotations

from hvdtrain.data.sharding import shard_dataset, shard_files, shard_indices
from hvdtrain.data.source import Splits


def load(cfg, seed: int = 0, model_name: str = "") -> Splits:
    """Load the source named by ``cfg.source`` (a :class:`~hvdtrain.config.DataConfig`)."""
    if cfg.source == "digits":
        from hvdtrain.data import digits

        return digits.load(cfg.test_fraction, cfg.validation_fraction, seed)
    if cfg.source == "synthetic":
        from hvdtrain.data import synthetic

        if model_name == "gpt":
            return synthetic.load((cfg.context_length,), cfg.num_classes or 256, cfg.num_examples or 2048,
                                  seed, task="language_model")
        size = cfg.image_size or 32
        return synthetic.load((size, size, 3), cfg.num_classes or 10, cfg.num_examples or 2048, seed)
    raise NotImplementedError(f"data.source={cfg.source} is not available yet")


__all__ = ["Splits", "load", "shard_dataset", "shard_files", "shard_indices"]
