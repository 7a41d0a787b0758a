"""Tokenizers of language models: UTF-8 bytes (the default), or a byte-level BPE.

``data.tokenizer`` says which:

- ``bytes``: every byte is a token (vocabulary 256); nothing to train or save.
- ``bpe``: a byte-level BPE (the GPT-2 / Llama 3 kind: any byte sequence encodes, nothing is unknown) trained on
  the run's training split with ``data.vocab_size`` tokens, by Hugging Face ``tokenizers``.
- a path to a ``tokenizer.json`` (Hugging Face's format: what ``tokenizers.Tokenizer.from_file`` and
  ``transformers.PreTrainedTokenizerFast`` read): used as it is.

Why Hugging Face ``tokenizers`` and not SentencePiece: its byte-level BPE needs no normalization or unknown token
(every byte sequence round-trips), its ``tokenizer.json`` is the file serving stacks (text-generation-inference,
vLLM, ``transformers``) load beside a model, it trains a few-thousand-token vocabulary on the embedded corpus in
under a second, and it is a single wheel with no compiled dependency of its own.

A run saves its tokenizer as ``tokenizer.json`` in its run directory (beside ``model.keras``); ``generate``,
``evaluate``, ``compress`` and ``export`` read it from there, and byte-level models have none. Bits per byte stays
the metric that compares tokenizers: a split's loss in nats per token times its tokens per byte, over ln 2.

Published tokenizers (a pretrained checkpoint's ``tokenizer.json``: GPT-2's or Llama 3's, with their regex
pre-split, special tokens and templates) are read by ``tokenizers`` as they are. Training text is encoded without
special tokens (windows of a corpus); a prompt to generate from is encoded as the tokenizer's template says (Llama's
begin-of-text first), and generation stops at the end-of-sequence ids of the model's ``generation_config.json`` or
``config.json`` (kept beside the run's tokenizer.json).
"""
from __future__ import annotations

import functools
import json

from hvdtrain.errors import DataError

FILE = "tokenizer.json"


class Bytes:
    """Each UTF-8 byte is a token."""

    name = "bytes"
    vocab_size = 256
    eos: tuple[int, ...] = ()

    def encode(self, text: bytes | str, special: bool = False) -> list[int]:
        """Token ids of ``text``."""
        return list(text.encode("utf-8") if isinstance(text, str) else bytes(text))

    def decode(self, ids, special: bool = True) -> str:
        """The text of ``ids`` (invalid UTF-8 shown as U+FFFD; a prepared corpus' end of document, 256, as
        nothing)."""
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def to_json(self) -> str | None:
        """Nothing to save."""
        return None


class BPE:
    """A Hugging Face ``tokenizers.Tokenizer`` (byte-level BPE when trained here)."""

    name = "bpe"

    def __init__(self, tokenizer, eos: tuple[int, ...] = (), text: str | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = int(tokenizer.get_vocab_size())
        self.eos = tuple(eos)  # end-of-sequence ids (generation stops at the first)
        self.text = text  # the tokenizer.json it was read from, kept as it was (saved and exported unchanged)

    @classmethod
    def train(cls, corpus: bytes, vocab_size: int) -> BPE:
        """A byte-level BPE of ``vocab_size`` tokens trained on ``corpus`` (deterministic: the same corpus gives
        the same merges on every rank)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
        tok.train_from_iterator(_lines(corpus), trainer=trainer)
        return cls(tok)

    @classmethod
    def from_json(cls, text: str, where: str = "the tokenizer") -> BPE:
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_str(text), text=text)
        except Exception as e:  # tokenizers raises a plain Exception for a malformed file
            raise DataError(f"{where} is not a tokenizer.json that Hugging Face tokenizers reads ({e})") from None

    def encode(self, text: bytes | str, special: bool = False) -> list[int]:
        """Token ids of ``text``; ``special``: with the special tokens of the tokenizer's template (a prompt's)."""
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", errors="replace")
        if special or not self.by_line or "\n" not in text:
            return self.tokenizer.encode(text, add_special_tokens=special).ids
        return [int(i) for i in self.encode_many([text])[0]]

    def encode_many(self, texts: list[str]) -> list:
        """The ids of each text (NumPy ``uint32``), encoded in parallel by ``tokenizers``' threads (every core).

        A byte-level BPE without a regex pre-split (hvdtrain's own) sees a whole text as one word, whose merges cost
        more the longer it is (quadratically: the embedded corpus took minutes as one string): it encodes line by
        line, which gives the same ids when no token holds a line end before its last character (checked once:
        :attr:`by_line`; true of a BPE trained on lines, as hvdtrain trains it)."""
        import numpy as np

        if not self.by_line:
            found = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
            return [np.asarray(e.ids, np.uint32) for e in found]
        parts = [text.splitlines(keepends=True) for text in texts]
        found = self.tokenizer.encode_batch_fast([line for lines in parts for line in lines], add_special_tokens=False)
        ids = [np.asarray(e.ids, np.uint32) for e in found]
        out, at = [], 0
        for lines in parts:
            out.append(np.concatenate(ids[at:at + len(lines)]) if lines else np.zeros(0, np.uint32))
            at += len(lines)
        return out

    @functools.cached_property
    def by_line(self) -> bool:
        """Whether encoding line by line gives the ids of the whole text (see :meth:`encode_many`)."""
        spec = json.loads(self.to_json())
        if graph_blocker(spec):  # a pre-split (or another model) already cuts the text into words
            return False
        newline = "\u010a"  # the byte-level alphabet's line end
        return not any(newline in token[:-1] for token in spec["model"]["vocab"])

    def decode(self, ids, special: bool = True) -> str:
        """The text of ``ids`` (``special=False``: without the special tokens' text)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=not special)

    def to_json(self) -> str:
        """The ``tokenizer.json`` text (a file's own text when read from one: a newer release of tokenizers may
        have written fields this one would drop)."""
        return self.text if self.text is not None else self.tokenizer.to_str()


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's map of the 256 bytes to printable characters (the symbols of a byte-level BPE's vocabulary)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class InGraph:
    """The tokenizer as TensorFlow ops, for a SavedModel's text-in, text-out signature (no Python at serving).

    Encoding applies the BPE's merges in rank order to the whole text (byte-level BPE without a regex
    pre-split, which is how hvdtrain trains it: the graph then encodes exactly as ``tokenizers`` does; tested);
    decoding joins each token's bytes. For bytes, each byte is its token.
    """

    def __init__(self, tokenizer):
        import tensorflow as tf

        self.vocab_size = tokenizer.vocab_size
        if isinstance(tokenizer, Bytes):
            pieces = [bytes([b]) for b in range(256)]
            self.merges = None
            self.first = tf.range(256, dtype=tf.int32)
        else:
            spec = json.loads(tokenizer.to_json())
            model = spec["model"]
            reason = graph_blocker(spec)
            if reason:
                raise DataError(f"this tokenizer.json cannot run inside the exported graph ({reason}; a byte-level "
                                "BPE without a regex pre-split can: data.tokenizer=bpe trains one)")
            unbyte = {c: b for b, c in _byte_alphabet().items()}
            vocab = model["vocab"]
            pieces = [b""] * self.vocab_size
            for token, i in vocab.items():
                pieces[i] = bytes(unbyte[c] for c in token)
            self.first = tf.constant([vocab[_byte_alphabet()[b]] for b in range(256)], tf.int32)
            merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
            keys = [vocab[a] * self.vocab_size + vocab[b] for a, b in merges]
            init = tf.lookup.KeyValueTensorInitializer(tf.constant(keys, tf.int64),
                                                       tf.range(len(keys), dtype=tf.int64))
            self.rank = tf.lookup.StaticHashTable(init, default_value=-1)
            merged = tf.lookup.KeyValueTensorInitializer(tf.constant(keys, tf.int64),
                                                         tf.constant([vocab[a + b] for a, b in merges], tf.int64))
            self.merged = tf.lookup.StaticHashTable(merged, default_value=-1)
            self.merges = len(keys)
        self.pieces = tf.constant(pieces)

    def tables(self) -> list:
        """The lookup tables (for a ``tf.Module`` to track, so that a SavedModel saves them)."""
        return [] if self.merges is None else [self.rank, self.merged]

    def encode(self, text):
        """Token ids (int32, 1-D) of one string."""
        import tensorflow as tf

        ids = tf.gather(self.first, tf.cast(tf.io.decode_raw(text, tf.uint8), tf.int32))
        if self.merges is None:
            return ids
        vocab = tf.constant(self.vocab_size, tf.int64)

        def step(ids):
            ids64 = tf.cast(ids, tf.int64)
            pairs = ids64[:-1] * vocab + ids64[1:]
            ranks = self.rank.lookup(pairs)
            ranks = tf.where(ranks < 0, tf.constant(2**62, tf.int64), ranks)
            best = tf.reduce_min(ranks)
            hit = tf.equal(ranks, best)
            # occurrences of the pair merge left to right: in a run of overlapping hits, every other one
            positions = tf.range(tf.size(hit, tf.int64), dtype=tf.int64)
            starts = hit & ~tf.concat([[False], hit[:-1]], 0)
            run = tf.cumsum(tf.cast(starts, tf.int64)) - 1
            first = tf.math.unsorted_segment_min(tf.where(starts, positions, tf.int64.max), tf.maximum(run, 0),
                                                 tf.maximum(tf.reduce_max(run) + 1, 1))
            chosen = hit & tf.equal(tf.math.floormod(positions - tf.gather(first, tf.maximum(run, 0)), 2), 0)
            merged = tf.cast(self.merged.lookup(pairs), tf.int32)
            out = tf.where(tf.concat([chosen, [False]], 0), tf.concat([merged, [0]], 0), ids)
            return tf.boolean_mask(out, ~tf.concat([[False], chosen], 0))

        def more(ids):
            if_any = tf.size(ids) > 1
            pairs = tf.cast(ids[:-1], tf.int64) * vocab + tf.cast(ids[1:], tf.int64)
            return if_any & tf.reduce_any(self.rank.lookup(pairs) >= 0)

        return tf.while_loop(more, step, [ids], shape_invariants=[tf.TensorShape([None])])[0]

    def decode(self, ids):
        """The text (a string of UTF-8 bytes) of ids ``(n,)``."""
        import tensorflow as tf

        return tf.strings.reduce_join(tf.gather(self.pieces, ids))


def graph_blocker(spec: dict) -> str:
    """Why a tokenizer.json's encoding cannot be reproduced exactly by :class:`InGraph` (``""``: it can): only a
    byte-level BPE whose merges apply to the whole text, with no regex pre-split (GPT-2's and Llama 3's split words
    with a regex that TensorFlow's RE2 cannot run: lookaheads), no normalizer and no byte fallback."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        return f"a {model.get('type')} model, not BPE"
    if pre.get("type") != "ByteLevel":
        return f"its pre-tokenizer is {pre.get('type') or 'none'}, not a byte-level one"
    if pre.get("use_regex", True):
        return "a regex pre-split"
    if spec.get("normalizer"):
        return f"a {spec['normalizer'].get('type')} normalizer"
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "byte fallback or word affixes"
    return ""


def _lines(corpus: bytes):
    # training sees lines (pair counts per line are fast); encoding applies the merges to any text
    yield from corpus.decode("utf-8", errors="replace").splitlines(keepends=True)


def make(spec: str, corpus: bytes | None = None, vocab_size: int = 0):
    """The tokenizer ``data.tokenizer`` names (``bytes``, ``bpe`` trained on ``corpus``, or a ``tokenizer.json``)."""
    if spec == "bytes":
        return Bytes()
    if spec == "bpe":
        if vocab_size < 257:
            raise DataError(f"data.vocab_size={vocab_size}: a byte-level BPE needs more than its 256 byte tokens; "
                            "set data.vocab_size (e.g. 2048)")
        return BPE.train(corpus or b"", vocab_size)
    from hvdtrain import storage

    if not storage.exists(spec):
        raise DataError(f"data.tokenizer='{spec}' is not 'bytes', 'bpe' or an existing tokenizer.json file")
    return BPE.from_json(storage.read_bytes(spec).decode("utf-8"), spec)


# what a pretrained checkpoint says of its tokens, kept beside its tokenizer.json in a run directory
SIDE_FILES = ("tokenizer_config.json", "generation_config.json")


def save(tokenizer, run_dir, pretrained: str = "") -> None:
    """Write ``tokenizer.json`` into the run directory (nothing for bytes), with a pretrained checkpoint's
    ``tokenizer_config.json`` and ``generation_config.json`` (its special tokens, where generation stops)."""
    from hvdtrain import storage

    text = tokenizer.to_json()
    if text is not None:
        storage.write_text(run_dir.path(FILE), text)
    for name in SIDE_FILES if pretrained else ():
        if storage.exists(storage.join(pretrained, name)):
            storage.write_text(run_dir.path(name), storage.read_text(storage.join(pretrained, name)))


def eos_of(folder: str, tokenizer=None) -> tuple[int, ...]:
    """The end-of-sequence ids a model directory names: its ``generation_config.json``'s, else ``config.json``'s,
    else its ``tokenizer_config.json``'s ``eos_token``."""
    from hvdtrain import storage

    for name in ("generation_config.json", "config.json"):
        path = storage.join(folder, name)
        if storage.exists(path):
            eos = json.loads(storage.read_text(path)).get("eos_token_id")
            if eos is not None:
                return tuple(eos if isinstance(eos, list) else [eos])
    path = storage.join(folder, "tokenizer_config.json")
    if tokenizer is not None and storage.exists(path):
        token = json.loads(storage.read_text(path)).get("eos_token")
        token = token.get("content") if isinstance(token, dict) else token
        found = tokenizer.token_to_id(token) if token else None
        if found is not None:
            return (int(found),)
    return ()


def load_beside(uri: str):
    """The tokenizer saved beside a model or in a run directory ``uri``: ``tokenizer.json`` there or in the
    directory holding it, else bytes."""
    from hvdtrain import storage

    candidates = [storage.join(uri, FILE)]
    parent = storage.parent(uri)
    if parent:
        candidates += [storage.join(parent, FILE), storage.join(storage.parent(parent) or parent, FILE)]
    for candidate in candidates:
        if storage.exists(candidate) and not storage.is_dir(candidate):
            found = BPE.from_json(storage.read_bytes(candidate).decode("utf-8"), candidate)
            found.eos = eos_of(storage.parent(candidate), found.tokenizer)
            return found
    return Bytes()


def check_vocabulary(tokenizer, vocabulary: int, where: str) -> None:
    """A clear error when the model's vocabulary cannot hold the tokenizer's ids."""
    if tokenizer.vocab_size > vocabulary:
        raise DataError(f"{where} has {vocabulary} output classes but its tokenizer has {tokenizer.vocab_size} "
                        "tokens; use the tokenizer.json the model was trained with")


def summary(tokenizer) -> dict:
    """What the run records of its tokenizer."""
    return {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size}


__all__ = ["BPE", "Bytes", "FILE", "check_vocabulary", "load_beside", "make", "save", "summary"]
