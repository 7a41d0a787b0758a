"""Synthetic random data, for benchmarks: no input pipeline cost, any shape."""
from __future__ import annotations

import numpy as np

from hvdtrain.data.source import CLASSIFICATION, LANGUAGE_MODEL, ArraySource


def load(
    input_shape: tuple[int, ...], num_classes: int, num_examples: int, seed: int = 0, task: str = CLASSIFICATION
) -> ArraySource:
    """Random inputs and labels. For ``language_model`` the inputs are int32 tokens below ``num_classes``."""
    rng = np.random.default_rng(seed)
    if task == LANGUAGE_MODEL:
        x = rng.integers(0, num_classes, size=(num_examples, *input_shape), dtype=np.int32)
        y = rng.integers(0, num_classes, size=(num_examples, *input_shape), dtype=np.int32)
    else:
        x = rng.random((num_examples, *input_shape), dtype=np.float32)
        y = rng.integers(0, num_classes, size=num_examples, dtype=np.int32)
    n_test = max(1, num_examples // 10)
    return ArraySource(
        x[n_test:], y[n_test:], x[:0], y[:0], x[:n_test], y[:n_test],
        input_shape=tuple(input_shape), num_classes=num_classes, task=task,
    )
