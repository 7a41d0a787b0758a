"""scikit-learn's handwritten digits: 1,797 real 8x8 images that ship inside the package (nothing downloaded)."""
from __future__ import annotations

import numpy as np

from hvdtrain.data.source import ArraySource, split_arrays


def load(test_fraction: float = 0.2, validation_fraction: float = 0.0, seed: int = 0) -> ArraySource:
    """Digits as ``(8, 8, 1)`` float32 images in [0, 1] and int32 labels 0-9, split with a fixed seed."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[..., None]
    y = bunch.target.astype(np.int32)
    return split_arrays(
        x, y, test_fraction=test_fraction, validation_fraction=validation_fraction, seed=seed, num_classes=10
    )
