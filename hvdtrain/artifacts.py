"""Files a run leaves behind, written by the chief only and always atomically (temporary name, then rename).

A reader never sees a half-written file: a crash leaves either the old file or the new one.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path`` (file or directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if path.is_dir() and tmp_path.is_dir():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
            os.rename(tmp_path, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_path, path)
    finally:
        if tmp_path.is_dir():
            shutil.rmtree(tmp_path, ignore_errors=True)
        elif tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # NumPy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/Inf
    return value


def to_json(value: Any) -> str:
    """JSON text of ``value`` with NumPy scalars converted and NaN/Inf written as null."""
    return json.dumps(_clean(value), indent=2, sort_keys=False)


def write_json(path: str | Path, value: Any) -> None:
    """Write ``value`` as JSON atomically."""
    write_text(path, to_json(value) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Write one JSON object per line, atomically (the whole file each time)."""
    write_text(path, "".join(json.dumps(_clean(r)) + "\n" for r in rows))


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A plain-text table for people (numbers to 4 significant digits)."""
    if not rows:
        return ""
    columns = columns or list(rows[0])

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()
    rule = "  ".join("-" * w for w in widths)
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in columns]
    body = ["  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(row, widths, numeric))
            for row in cells]
    return "\n".join([line, rule, *(b.rstrip() for b in body)])


def format_summary(summary: dict[str, Any], keys: list[str]) -> str:
    """Two-column table of selected summary entries."""
    rows = [{"metric": k, "value": summary.get(k)} for k in keys if k in summary]
    return format_table(rows, ["metric", "value"])


def plot_curves(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Training curves (each loss and metric against epoch, train and validation together) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in rows[0] if not k.startswith("val_") and k not in ("epoch", "lr", "epoch_seconds",
                                                                          "examples_per_sec")]
    keys = [k for k in keys if isinstance(rows[0].get(k), (int, float))]
    panels = keys + (["lr"] if "lr" in rows[0] else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    epochs = [r["epoch"] for r in rows]
    for ax, key in zip(axes[0], panels):
        ax.plot(epochs, [r.get(key) for r in rows], marker="o", label="train" if key != "lr" else "lr")
        if f"val_{key}" in rows[0]:
            ax.plot(epochs, [r.get(f"val_{key}") for r in rows], marker="s", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
