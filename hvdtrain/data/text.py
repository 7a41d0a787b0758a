"""Text corpora for language models, as bytes or as the tokens of a tokenizer (:mod:`hvdtrain.data.tokenizer`).

Files matching a glob are read as bytes and concatenated; the embedded default is CPython's own
``pydoc_data.topics`` (about 465,000 characters of English reference text that ship with every Python, so nothing
is downloaded). The corpus is cut *contiguously* into train / validation / test, so no window of the held-out text
overlaps the training text, and each part into windows of ``context_length + 1`` bytes: the input is the first
``context_length`` bytes, the target the same window shifted by one. With a tokenizer (``data.tokenizer``), each
part is encoded on its own (a BPE is trained on the training part only) and cut into windows of tokens; the source
records each part's bytes per token, which turns a loss per token into bits per byte.
"""
from __future__ import annotations

import numpy as np

from hvdtrain.data.source import LANGUAGE_MODEL, ArraySource
from hvdtrain.errors import DataError

VOCAB_SIZE = 256


def embedded_corpus() -> bytes:
    """The default corpus: every topic of ``pydoc_data.topics``, in a fixed order, as UTF-8 bytes."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


def read_corpus(pattern: str) -> bytes:
    """Bytes of every file matching ``pattern`` (sorted, joined by a newline); local or on object storage."""
    from hvdtrain import storage

    files = [f for f in storage.glob(pattern) if not storage.is_dir(f)]
    if not files:
        raise DataError(f"no text files match data.path='{pattern}'; give a file, or a glob such as 'corpus/*.txt'")
    data = b"\n".join(storage.read_bytes(f) for f in files)
    if not data:
        raise DataError(f"the text files matching '{pattern}' are empty")
    return data


def windows(data: np.ndarray, context_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows: inputs ``data[i*T : i*T+T]`` and targets shifted by one byte."""
    n = (len(data) - 1) // context_length
    if n < 1:
        return np.zeros((0, context_length), np.int32), np.zeros((0, context_length), np.int32)
    x = data[: n * context_length].reshape(n, context_length)
    y = data[1 : n * context_length + 1].reshape(n, context_length)
    return x.astype(np.int32), y.astype(np.int32)


def unigram_entropy_bits(data: bytes | np.ndarray) -> float:
    """Entropy in bits per byte of the byte frequencies: what a model that ignores context can reach at best."""
    counts = np.bincount(np.frombuffer(bytes(data), np.uint8) if isinstance(data, bytes) else data,
                         minlength=VOCAB_SIZE)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def load(path: str, context_length: int, validation_fraction: float, test_fraction: float,
         tokenizer: str = "bytes", vocab_size: int = 0, num_classes: int = 0) -> ArraySource:
    """Load a corpus (``path`` a file or glob, or empty for the embedded default) as windows of tokens.

    ``num_classes``: the model's vocabulary when it is not the tokenizer's (a pretrained model's embedding may
    hold more rows than its tokenizer has tokens; never fewer)."""
    from hvdtrain.data import tokenizer as tokenizers

    corpus = read_corpus(path) if path else embedded_corpus()
    n_test = int(len(corpus) * test_fraction)
    n_val = int(len(corpus) * validation_fraction)
    n_train = len(corpus) - n_test - n_val
    parts = {"train": corpus[:n_train], "val": corpus[n_train:n_train + n_val], "test": corpus[n_train + n_val:]}
    tok = tokenizers.make(tokenizer, parts["train"], vocab_size)
    if num_classes and tok.vocab_size > num_classes:
        raise DataError(f"the tokenizer {tokenizer} has {tok.vocab_size} tokens, more than the model's vocabulary of "
                        f"{num_classes} (config.json's vocab_size): give the tokenizer.json the model was trained "
                        "with")
    ids = {k: np.asarray(tok.encode(v) if v else [], np.int32) for k, v in parts.items()}
    x_train, y_train = windows(ids["train"], context_length)
    if len(x_train) == 0:
        raise DataError(
            f"the corpus has {len(ids['train'])} training tokens, too few for one window of {context_length + 1}; "
            "lower data.context_length or give more text"
        )
    x_val, y_val = windows(ids["val"], context_length)
    x_test, y_test = windows(ids["test"], context_length)
    per_token = {k: len(parts[k]) / len(ids[k]) for k in parts if len(ids[k])}
    return ArraySource(x_train, y_train, x_val, y_val, x_test, y_test, input_shape=(context_length,),
                       num_classes=num_classes or tok.vocab_size,
                       task=LANGUAGE_MODEL, tokenizer=tok, bytes_per_token=per_token)
