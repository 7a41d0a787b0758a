"""NumPy ``.npz`` files with arrays ``x`` (examples) and ``y`` (integer labels), for small in-memory data."""
from __future__ import annotations

import numpy as np

from hvdtrain.data.source import ArraySource, split_arrays
from hvdtrain.errors import DataError


def load(path: str, test_fraction: float, validation_fraction: float, num_classes: int = 0,
         seed: int = 0) -> ArraySource:
    """Load ``x``/``y`` from ``path`` and split them with a fixed seed.

    Integer-typed images (``uint8``) are scaled to [0, 1]; 2-D ``x`` of images is given a channel axis.
    """
    import io

    from hvdtrain import storage

    p = path
    if not storage.exists(p) or storage.is_dir(p):
        raise DataError(f"data.path '{p}' does not exist; give an .npz file with arrays x and y")
    try:
        with np.load(io.BytesIO(storage.read_bytes(p)), allow_pickle=False) as f:
            missing = {"x", "y"} - set(f.files)
            if missing:
                raise DataError(f"'{p}' has arrays {sorted(f.files)}, but needs x and y (missing: {sorted(missing)})")
            x, y = f["x"], f["y"]
    except (OSError, ValueError) as exc:
        raise DataError(
            f"'{p}' is not a readable .npz file ({exc}); save one with numpy.savez(path, x=..., y=...)") from None
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise DataError(f"y in '{p}' must be a 1-D array of integer labels, got {y.dtype} with shape {y.shape}")
    if len(x) and y.min() < 0:
        raise DataError(f"y in '{p}' has negative labels; labels must be 0 .. num_classes-1")
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / float(np.iinfo(x.dtype).max)
    x = x.astype(np.float32)
    if x.ndim == 3:
        x = x[..., None]
    found = int(y.max()) + 1 if len(y) else 0
    if num_classes and found > num_classes:
        raise DataError(f"y in '{p}' has label {found - 1}, but data.num_classes={num_classes}; raise it to {found}")
    return split_arrays(x, y.astype(np.int32), test_fraction=test_fraction, validation_fraction=validation_fraction,
                        seed=seed, num_classes=num_classes or found)
