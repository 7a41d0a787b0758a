"""What people and machines read: JSON (NaN-free), plain-text tables, and PNG figures, each written whole.

Writers take a local path or a storage URI (see :mod:`hvdtrain.storage`): a reader never sees a half-written file.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hvdtrain import storage


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


def write_json(uri: str | Path, value: Any) -> None:
    """Write ``value`` as JSON, whole."""
    storage.write_text(str(uri), to_json(value) + "\n")


def jsonl(rows: list[dict]) -> str:
    """One JSON object per line."""
    return "".join(json.dumps(_clean(r)) + "\n" for r in rows)


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


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, uri: str | Path) -> None:
    """Write a matplotlib figure as a PNG, whole, and close it."""
    with storage.staged(str(uri), suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    pyplot().close(fig)


def plot_curves(rows: list[dict[str, Any]], uri: str | Path, title: str = "") -> None:
    """Training curves (each loss and metric against epoch, train and validation together) as a PNG."""
    plt = pyplot()
    skip = ("epoch", "lr", "epoch_seconds", "examples_per_sec")
    last = rows[-1]  # (a fine-tuning run's first row, epoch 0, holds the pretrained model's validation metrics only)
    keys = [k for k in last if not k.startswith("val_") and k not in skip + ("step",)]
    keys = [k for k in keys if isinstance(last.get(k), (int, float))]
    panels = keys + (["lr"] if "lr" in last else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)

    def series(key):
        points = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        return [e for e, _ in points], [v for _, v in points]

    for ax, key in zip(axes[0], panels):
        ax.plot(*series(key), marker="o", label="train" if key != "lr" else "lr")
        if f"val_{key}" in last:
            ax.plot(*series(f"val_{key}"), marker="s", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, uri)
