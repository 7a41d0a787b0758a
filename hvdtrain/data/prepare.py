"""``hvdtrain data prepare``: a corpus of any size tokenized once into token shards and a manifest, which
``data.source: tokens`` streams (:mod:`hvdtrain.data.tokens`).

The corpus is the files ``--input`` matches (local or ``s3://``), read in order as a stream of *documents*: each
file (``file``), each blank-line-separated record of a text file (``blank-line``), or each line's ``text`` field of
JSON lines (``jsonl``; ``auto``: JSON lines for ``.jsonl``/``.json`` files, whole files otherwise). Each document goes
whole to the training, validation or test split (by a hash of its index: the same split at every run), and the
tokens of a split are its documents' tokens with the end-of-document token after each.

The work goes in *segments* of about ``--segment-bytes`` of text: a segment is read, tokenized in parallel on all
cores (``tokenizers``' batch encoding, its Rust threads; in pieces of at most 256 KB cut at line ends, so a document
of any length streams), and written as one shard per split (``train-00003.bin``: the tokens as ``uint16`` below
65,536 tokens, else ``uint32``) and then its marker (``segments/00003.json``: its shards' token, document and
text-byte counts, and where the input stands after it). Memory is a segment's text and tokens, whatever the
corpus' size. A killed prepare leaves no shard that a marker vouches for; run again, it keeps the finished segments
and goes on from the last one's end. The manifest (``manifest.json``: every shard with its counts, the tokenizer's
hash, the settings) comes last.

Tokenizers: ``bytes`` (each UTF-8 byte a token and 256 the end of a document), ``bpe`` (a byte-level BPE of
``--vocab-size`` tokens trained on the corpus' first ``--sample-bytes`` with ``<|endoftext|>`` as its end of
document, saved as ``tokenizer.json``), or a ``tokenizer.json`` / Hugging Face model directory (its end-of-sequence
token ends documents; ``--eod`` names another).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hvdtrain import console, storage
from hvdtrain.errors import DataError, UsageError

FORMAT, VERSION = "hvdtrain-tokens", 1
MANIFEST, SEGMENTS = "manifest.json", "segments"
SPLITS = ("train", "val", "test")
PIECE_BYTES = 256 * 1024  # the most text encoded as one item (a document is cut at a line end beyond it)
READ_BYTES = 8 * 2**20  # the most read from a file at once
EOD_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")


def parse_bytes(text: str, flag: str) -> int:
    """``64MB``, ``1GB``, ``500KB`` or a count of bytes."""
    units = {"GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    t = str(text).strip().upper()
    for unit, factor in units.items():
        number = t[: -len(unit)].strip()
        if t.endswith(unit) and number.replace(".", "", 1).isdigit():
            return int(float(number) * factor)
    if t.isdigit():
        return int(t)
    raise UsageError(f"{flag} '{text}' is not a size such as 64MB or 1GB")


@dataclass(frozen=True)
class Settings:
    """What a prepared directory was made with (its manifest keeps them: a rerun must match)."""

    input: str
    tokenizer: str
    vocab_size: int
    validation_fraction: float
    test_fraction: float
    documents: str
    text_key: str
    sample_bytes: int
    segment_bytes: int
    eod: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------------------------------------
# The corpus as documents


@dataclass
class Position:
    """Where the input stands: a file, a byte in it, and the documents finished before it (a document that goes
    on past it is number ``documents``)."""

    file: int = 0
    offset: int = 0
    documents: int = 0

    def as_list(self) -> list[int]:
        return [self.file, self.offset, self.documents]


@dataclass
class Piece:
    """Text of document number ``document`` (all of it, or a part that ends at a line end); ``last``: the document
    ends with it."""

    text: bytes
    document: int
    last: bool


def files_of(pattern: str) -> list[tuple[str, int]]:
    """The files ``pattern`` matches, sorted, with their sizes (a one-line error for none)."""
    storage.check(pattern)
    files = [f for f in storage.glob(pattern) if not storage.is_dir(f)]
    if not files:
        raise DataError(f"no files match --input '{pattern}'; give a file, or a glob such as 'corpus/*.txt'")
    return [(f, storage.size(f)) for f in files]


def kind_of(path: str, documents: str) -> str:
    if documents != "auto":
        return documents
    return "jsonl" if path.endswith((".jsonl", ".json")) else "file"


def _cut(data: bytes) -> int:
    """Where a piece of ``data`` ends: after its last line end, else (a line longer than a piece) before a UTF-8
    character starts."""
    at = data.rfind(b"\n")
    if at >= 0:
        return at + 1
    at = len(data)
    while at > 1 and (data[at - 1] & 0xC0) == 0x80:  # the continuation bytes of a character...
        at -= 1
    return at - 1 if at > 1 and data[at - 1] >= 0xC0 else len(data)  # ...and its first byte go to the next piece


def records(path: str, start: int, size: int, kind: str) -> Iterator[tuple[bytes, int, bool]]:
    """A file from byte ``start`` as ``(text, offset after it, ends a document)``: JSON lines (whole: a line is one
    object), records separated by an empty line, or the file as one document, in pieces of at most about
    :data:`PIECE_BYTES` cut at line ends; read :data:`READ_BYTES` at a time (the buffer is read from an index, and
    cut only when it is refilled)."""
    at, buffer, i = start, b"", 0  # bytes read up to `at`; buffer[i:] not yet given
    while True:
        eof = at >= size
        if kind == "jsonl":
            end = buffer.find(b"\n", i)
            found = end >= 0
        elif kind == "blank-line":
            end = buffer.find(b"\n\n", i, i + PIECE_BYTES + 1)
            found = end >= 0
        else:
            end, found = -1, False
        if not found and not eof and (kind == "jsonl" or len(buffer) - i < PIECE_BYTES):
            chunk = storage.read_range(path, at, min(size, at + READ_BYTES))
            if not chunk:
                raise DataError(f"{path} ended at byte {at}, before its {size} bytes: was it changed while read?")
            buffer, i, at = buffer[i:] + chunk, 0, at + len(chunk)
            continue
        if i >= len(buffer):
            return
        if found:  # a whole record (its line end kept), then what separated it
            text, i, last = buffer[i:end + 1], end + (1 if kind == "jsonl" else 2), True
        elif eof and len(buffer) - i <= PIECE_BYTES:
            text, i, last = buffer[i:], len(buffer), True
        else:  # a long record or file goes on in the next piece
            cut = _cut(buffer[i:i + PIECE_BYTES])
            text, i, last = buffer[i:i + cut], i + cut, False
        yield text, at - (len(buffer) - i), last


def pieces(files: list[tuple[str, int]], start: Position, documents: str, text_key: str) -> Iterator[
        tuple[Piece, Position]]:
    """The corpus from ``start`` as pieces of documents (at most about :data:`PIECE_BYTES`, cut at line ends), each
    with the position after it."""
    done = start.documents
    for index in range(start.file, len(files)):
        path, size = files[index]
        kind = kind_of(path, documents)
        for text, end, last in records(path, start.offset if index == start.file else 0, size, kind):
            if kind == "jsonl":
                if not text.strip():
                    continue
                try:
                    text = str(json.loads(text)[text_key]).encode("utf-8")
                except (ValueError, KeyError, TypeError):
                    raise DataError(f"{path} before byte {end}: not a JSON object with a '{text_key}' field "
                                    "(--text-key names another)") from None
            elif last and not text.strip() and kind == "blank-line":
                continue  # (empty records between blank lines)
            done += 1 if last else 0
            yield Piece(text, done - 1 if last else done, last), Position(index, end, done) if end < size else \
                Position(index + 1, 0, done)


def split_of(document: int, validation_fraction: float, test_fraction: float) -> str:
    """The split a document goes to, from a hash of its index (the same at every run and on every machine)."""
    draw = (zlib.crc32(f"document-{document}".encode()) % 1_000_000) / 1_000_000
    if draw < validation_fraction:
        return "val"
    if draw < validation_fraction + test_fraction:
        return "test"
    return "train"


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers with an end of document


@dataclass
class Tokenizer:
    """How a prepare turns text into ids: ``encode(pieces) -> [ids]`` (in parallel), ``eod``, ``vocab_size``, and
    the ``tokenizer.json`` text saved beside the shards (None for bytes)."""

    name: str
    vocab_size: int
    eod: int
    json_text: str | None = None
    tokenizer: object = field(default=None, repr=False)  # a hvdtrain.data.tokenizer.BPE (None: bytes)

    def encode(self, texts: list[bytes]) -> list[np.ndarray]:
        """The ids of each text, encoded in parallel (:meth:`hvdtrain.data.tokenizer.BPE.encode_many`)."""
        if self.tokenizer is None:
            return [np.frombuffer(t, np.uint8) for t in texts]
        return self.tokenizer.encode_many([t.decode("utf-8", errors="replace") for t in texts])

    @property
    def sha256(self) -> str:
        return hashlib.sha256((self.json_text or "bytes").encode()).hexdigest()

    @property
    def dtype(self):
        return np.uint16 if self.vocab_size <= 65536 else np.uint32


def bytes_tokenizer() -> Tokenizer:
    return Tokenizer("bytes", 257, 256)


def from_file(text: str, where: str, eod: str = "", folder: str = "") -> Tokenizer:
    """A ``tokenizer.json`` with its end-of-document token: ``eod``, else the model directory's end of sequence
    (generation_config.json, config.json, tokenizer_config.json), else a common name for one."""
    from hvdtrain.data.tokenizer import BPE, eos_of

    bpe = BPE.from_json(text, where)
    names = [eod] if eod else []
    found = None
    if not eod and folder:
        ids = eos_of(folder, bpe.tokenizer)
        found = ids[0] if ids else None
    for name in [*names, *([] if eod else EOD_NAMES)]:
        if found is None:
            found = bpe.tokenizer.token_to_id(name)
    if found is None:
        raise DataError(f"{where} has no end-of-document token ({', '.join(names or EOD_NAMES)} not found); "
                        "name one with --eod TOKEN")
    return Tokenizer("file", bpe.vocab_size, int(found), text, bpe)


def trained_bpe(sample: list[bytes], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (as ``data.tokenizer=bpe`` trains one) with ``<|endoftext|>`` as its end of document."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tok.train_from_iterator((line for text in sample for line in
                             text.decode("utf-8", errors="replace").splitlines(keepends=True)), trainer=trainer)
    from hvdtrain.data.tokenizer import BPE

    return Tokenizer("bpe", int(tok.get_vocab_size()), int(tok.token_to_id("<|endoftext|>")), tok.to_str(), BPE(tok))


def make_tokenizer(settings: Settings, files, output: str) -> Tokenizer:
    """The tokenizer ``--tokenizer`` names (a BPE trained before, by an interrupted run, is reused)."""
    spec = settings.tokenizer
    if spec == "bytes":
        return bytes_tokenizer()
    if spec == "bpe":
        saved = storage.join(output, "tokenizer.json")
        if storage.exists(saved):  # trained by a run that stopped: the same corpus gives the same merges
            return dataclasses.replace(from_file(storage.read_text(saved), saved, "<|endoftext|>"), name="bpe")
        if settings.vocab_size <= 257:
            raise UsageError(f"--vocab-size {settings.vocab_size}: a byte-level BPE needs more than its 256 byte "
                             "tokens and the end of document (e.g. 8192)")
        sample, taken = [], 0
        for piece, _ in pieces(files, Position(), settings.documents, settings.text_key):
            sample.append(piece.text)
            taken += len(piece.text)
            if taken >= settings.sample_bytes:
                break
        started = time.perf_counter()
        tok = trained_bpe(sample, settings.vocab_size)
        console.say(f"[hvdtrain] BPE of {tok.vocab_size} tokens trained on the corpus' first {taken / 1e6:.1f} MB "
                    f"(--sample-bytes) in {time.perf_counter() - started:.1f} s")
        return tok
    folder = spec if storage.is_dir(spec) else ""
    path = storage.join(spec, "tokenizer.json") if folder else spec
    if not storage.exists(path):
        raise DataError(f"--tokenizer '{spec}' is not bytes, bpe, a tokenizer.json or a model directory with one")
    return from_file(storage.read_text(path), path, settings.eod, folder)


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _write(local: Path, uri: str) -> None:
    """A finished local file to ``uri``: renamed into place, or uploaded whole."""
    if storage.is_local(uri):
        os.replace(local, storage.local_path(uri))
    else:
        storage.upload(local, uri)
        local.unlink()


def finished_segments(output: str, settings: Settings) -> list[dict]:
    """The segments a previous run of the same settings finished, in order (a run with other settings: error)."""
    folder = storage.join(output, SEGMENTS)
    found = []
    for name in sorted(storage.listdir(folder)):
        if name.endswith(".json") and not name.startswith("."):
            found.append(json.loads(storage.read_text(storage.join(folder, name))))
    for k, seg in enumerate(found):
        if seg.get("settings") != settings.as_dict():
            raise UsageError(f"--output {output} holds shards prepared with other settings; give a new directory")
        if seg["index"] != k:
            found = found[:k]
            break
    return found


def prepare(settings: Settings, output: str, progress: str | None = None) -> dict:
    """Tokenize the corpus into ``output`` (see the module doc); returns the manifest."""
    files = files_of(settings.input)
    for name, value in (("--validation-fraction", settings.validation_fraction),
                        ("--test-fraction", settings.test_fraction)):
        if not 0.0 <= value < 1.0:
            raise UsageError(f"{name} must be in [0, 1), got {value}")
    if settings.validation_fraction + settings.test_fraction >= 1.0:
        raise UsageError("--validation-fraction and --test-fraction leave nothing to train on")
    storage.check(output)
    if storage.exists(storage.join(output, MANIFEST)):
        manifest = json.loads(storage.read_text(storage.join(output, MANIFEST)))
        if manifest.get("settings") != settings.as_dict():
            raise UsageError(f"--output {output} holds a corpus prepared with other settings; give a new directory")
        console.say(f"[hvdtrain] {output} is prepared already ({manifest['splits']['train']['tokens']:,} training "
                    "tokens): nothing to do")
        return manifest
    storage.makedirs(storage.join(output, SEGMENTS))
    done = finished_segments(output, settings)
    tokenizer = make_tokenizer(settings, files, output)
    if tokenizer.json_text is not None:
        storage.write_text(storage.join(output, "tokenizer.json"), tokenizer.json_text)
    start = Position(*done[-1]["end"]) if done else Position()
    total = sum(size for _, size in files)
    if done:
        console.say(f"[hvdtrain] continuing after segment {len(done) - 1} (of a run that stopped), at file "
                    f"{start.file + 1} of {len(files)}")
    meter = _Meter(total, progress, sum(size for _, size in files[:start.file]) + start.offset)
    index = len(done)
    stream = background(pieces(files, start, settings.documents, settings.text_key))
    with tempfile.TemporaryDirectory(prefix="hvdtrain-prepare-") as tmp:
        while True:
            batch, pos, taken = [], start, 0
            for piece, pos in stream:
                batch.append(piece)
                taken += len(piece.text)
                if taken >= settings.segment_bytes:
                    break
            if not batch:
                break
            done.append(_segment(index, batch, start, pos, tokenizer, settings, output, Path(tmp)))
            _trim()
            meter.advance(sum(size for _, size in files[:pos.file]) + pos.offset, done[-1])
            start, index = pos, index + 1
    meter.close()
    return _manifest(done, tokenizer, settings, output, files)


def background(items: Iterator, depth: int = 64) -> Iterator:
    """``items`` produced by a thread of its own, at most ``depth`` ahead: the corpus is read while the previous
    pieces are encoded (``tokenizers`` releases the interpreter while it encodes)."""
    import queue
    import threading

    ahead: queue.Queue = queue.Queue(depth)
    end = object()

    def produce():
        try:
            for item in items:
                ahead.put(item)
        except BaseException as exc:  # noqa: BLE001 - raised again in the consumer
            ahead.put(exc)
        ahead.put(end)

    threading.Thread(target=produce, daemon=True).start()
    while (item := ahead.get()) is not end:
        if isinstance(item, BaseException):
            raise item
        yield item


ENCODE_BYTES = 2 * 2**20  # text per batch encoding (its items spread over every core)


def _segment(index: int, batch: list[Piece], start: Position, end: Position, tokenizer: Tokenizer,
             settings: Settings, output: str, tmp: Path) -> dict:
    """Tokenize one segment's pieces and write its shards, then its marker; returns the marker."""
    per_split: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    counts = {s: {"documents": 0, "bytes": 0} for s in SPLITS}
    eod = np.asarray([tokenizer.eod], np.uint32)
    groups, current, held = [], [], 0
    for piece in batch:
        current.append(piece)
        held += len(piece.text)
        if held >= ENCODE_BYTES:
            groups.append(current)
            current, held = [], 0
    groups += [current] if current else []
    for group in groups:
        for piece, ids in zip(group, tokenizer.encode([p.text for p in group])):
            split = split_of(piece.document, settings.validation_fraction, settings.test_fraction)
            per_split[split].append(ids.astype(np.uint32))
            counts[split]["bytes"] += len(piece.text)
            if piece.last:
                per_split[split].append(eod)
                counts[split]["documents"] += 1
    shards = {}
    for split, parts in per_split.items():
        if not parts:
            continue
        tokens = np.concatenate(parts).astype(tokenizer.dtype)
        name = f"{split}-{index:05d}.bin"
        local = tmp / name
        tokens.tofile(local)
        _write(local, storage.join(output, name))
        shards[split] = {"file": name, "tokens": int(tokens.size), **counts[split]}
    marker = {"index": index, "start": start.as_list(), "end": end.as_list(), "shards": shards,
              "settings": settings.as_dict()}
    local = tmp / f"{index:05d}.json"
    local.write_text(json.dumps(marker) + "\n")
    _write(local, storage.join(output, SEGMENTS, f"{index:05d}.json"))  # last: the segment is done
    return marker


def _trim() -> None:
    """Give the memory a segment freed back to the system (glibc keeps freed blocks, and the peak of a long
    prepare crept up with them: 205 MB for 2 MB of text, 281 MB for 160 MB)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _manifest(done: list[dict], tokenizer: Tokenizer, settings: Settings, output: str, files) -> dict:
    splits = {}
    for split in SPLITS:
        shards = [seg["shards"][split] for seg in done if split in seg["shards"]]
        splits[split] = {"shards": shards, "tokens": sum(s["tokens"] for s in shards),
                         "documents": sum(s["documents"] for s in shards), "bytes": sum(s["bytes"] for s in shards)}
    if not splits["train"]["tokens"]:
        raise DataError(f"the files of --input '{settings.input}' hold no text to train on")
    manifest = {"format": FORMAT, "version": VERSION, "dtype": np.dtype(tokenizer.dtype).name,
                "tokenizer": {"kind": tokenizer.name, "file": "tokenizer.json" if tokenizer.json_text else None,
                              "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod},
                "splits": splits, "segments": len(done), "input_files": len(files), "input_bytes":
                sum(size for _, size in files), "settings": settings.as_dict()}
    storage.write_text(storage.join(output, MANIFEST), json.dumps(manifest, indent=1) + "\n")
    t = splits["train"]
    console.say(f"[hvdtrain] prepared {len(files)} file(s), {manifest['input_bytes'] / 1e6:.1f} MB: "
                f"{t['tokens']:,} training tokens in {t['documents']:,} documents, validation "
                f"{splits['val']['tokens']:,}, test {splits['test']['tokens']:,}; {len(done)} segment(s); "
                f"{tokenizer.name} tokenizer of {tokenizer.vocab_size:,} tokens ({manifest['dtype']}) -> {output}")
    return manifest


class _Meter:
    """Progress of a prepare: MB of text done, MB/s, the time left; a bar on a terminal, a line every 30 s else."""

    def __init__(self, total: int, mode: str | None, done: int):
        self.total, self.first, self.done = max(1, total), done, done
        self.mode = mode or ("bar" if sys.stdout.isatty() else "lines")
        self.started = self.last = time.perf_counter()

    def advance(self, done: int, segment: dict) -> None:
        self.done = done
        now = time.perf_counter()
        if self.mode == "off" or (self.mode == "lines" and now - self.last < 30 and done < self.total):
            return
        rate = (done - self.first) / max(1e-9, now - self.started)
        left = (self.total - done) / rate if rate > 0 else 0
        share = done / self.total
        line = (f"{done / 1e6:.1f}/{self.total / 1e6:.1f} MB ({share:.0%}), {rate / 1e6:.2f} MB/s, "
                f"ETA {left:.0f} s, segment {segment['index']}")
        if self.mode == "bar":
            sys.stdout.write(f"\r[{'=' * int(share * 24):<24}] {line}\033[K")
            sys.stdout.flush()
        else:
            console.say(f"[hvdtrain] {line}")
        self.last = now

    def close(self) -> None:
        if self.mode == "bar":
            console.say("")
