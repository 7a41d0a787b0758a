"""``data.source: tokens``: a corpus prepared by ``hvdtrain data prepare`` (:mod:`hvdtrain.data.prepare`), streamed.

Each shard of a split is cut into windows of ``context_length + 1`` tokens (inputs, and the targets one token on),
consecutive and not overlapping, never across shards. Nothing is loaded at start but the manifest: a rank reads the
windows of its batches and nothing else, from memory maps of local shards or by ranged reads of shards on object
storage (through a bounded cache of chunks: :class:`Chunks`), so start-up time and memory do not grow with the corpus.

**The order of windows** depends on ``(seed, epoch)`` alone, never on the layout: each epoch the shards are put in an
order drawn from ``(seed, epoch)``, taken in groups of consecutive shards holding at least ``data.shuffle_buffer``
windows, and the windows of each group are put in an order drawn from ``(seed, epoch, group)``. The epoch's windows,
group after group, are cut into global batches, of which data-parallel replica ``r`` takes the ``r``-th part; so at
any number of replicas the global batches are those of one process (tested), and a run resumed at another layout
goes on from the same window. A rank needs at most the shards of one group at a time (MosaicML streaming's reason for
shuffling by shard groups): what a cache of object storage must hold is bounded by the group, not by the corpus.
Validation and test are the prepared splits' windows in order (or their first ``limit`` windows).
"""
from __future__ import annotations

import functools
import json
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from hvdtrain import storage
from hvdtrain.data.prepare import FORMAT, MANIFEST, VERSION
from hvdtrain.data.sharding import shard_indices
from hvdtrain.data.source import AUTOTUNE, LANGUAGE_MODEL, Source
from hvdtrain.errors import DataError

CHUNK_BYTES = 1 << 20  # the unit of ranged reads from object storage


@dataclass(frozen=True)
class Shard:
    uri: str
    tokens: int
    windows: int


class Chunks:
    """Byte ranges of files on object storage through an in-memory cache of 1 MiB chunks, least recently used out
    first, at most ``limit`` bytes (a sequential read fetches each chunk once; ranks of one job read their own)."""

    def __init__(self, limit: int):
        self.limit = max(limit, CHUNK_BYTES)
        self.cache: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self.held = 0

    def read(self, uri: str, start: int, stop: int, size: int) -> bytes:
        parts = []
        for k in range(start // CHUNK_BYTES, (stop - 1) // CHUNK_BYTES + 1):
            key = (uri, k)
            data = self.cache.pop(key, None)
            if data is None:
                data = storage.read_range(uri, k * CHUNK_BYTES, min(size, (k + 1) * CHUNK_BYTES))
                self.held += len(data)
            self.cache[key] = data
            parts.append(data)
        while self.held > self.limit and len(self.cache) > 1:
            _, old = self.cache.popitem(last=False)
            self.held -= len(old)
        first = start - (start // CHUNK_BYTES) * CHUNK_BYTES
        return b"".join(parts)[first:first + stop - start]


def read_manifest(path: str) -> dict:
    """A prepared directory's manifest (one-line errors for a missing, foreign or newer one)."""
    storage.check(path)
    uri = storage.join(path, MANIFEST)
    if not storage.exists(uri):
        raise DataError(f"data.path='{path}' holds no {MANIFEST}: prepare it with hvdtrain data prepare --input ... "
                        f"--output {path} (a prepare that stopped is finished by running it again)")
    try:
        manifest = json.loads(storage.read_text(uri))
    except ValueError as exc:
        raise DataError(f"{uri} is not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{uri} is not the manifest of a prepared corpus (format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise DataError(f"{uri} is of version {manifest.get('version')} of the format; this hvdtrain reads version "
                        f"{VERSION}: prepare the corpus again")
    return manifest


class TokenSource(Source):
    """A prepared corpus as windows of ``context_length`` tokens (see the module doc).

    Args:
        path: the prepared directory (local or ``s3://``).
        context_length: tokens per window.
        tokenizer: ``data.tokenizer`` when it is a file (a model's tokenizer.json): it must be the one the corpus
            was prepared with.
        shuffle_windows: at least this many windows are shuffled together (``data.shuffle_buffer``).
        cache_bytes: the most bytes of shards on object storage held in memory per rank.
    """

    task = LANGUAGE_MODEL

    def __init__(self, path: str, context_length: int, tokenizer: str = "", shuffle_windows: int = 10_000,
                 cache_bytes: int = 256 * 2**20):
        from hvdtrain.data import tokenizer as tokenizers

        self.path, self.context = path, context_length
        manifest = read_manifest(path)
        self.manifest = manifest
        info = manifest["tokenizer"]
        self.dtype = np.dtype(manifest["dtype"])
        if info["file"]:
            text = storage.read_text(storage.join(path, info["file"]))
            self.tokenizer = tokenizers.BPE.from_json(text, storage.join(path, info["file"]))
        else:
            self.tokenizer = tokenizers.Bytes()
        self.tokenizer.eos = (int(info["eod"]),)
        if tokenizer and tokenizer not in ("bytes", "bpe"):
            import hashlib

            given = hashlib.sha256(storage.read_text(tokenizer).encode()).hexdigest()
            if given != info["sha256"]:
                raise DataError(f"data.tokenizer '{tokenizer}' is not the tokenizer data.path='{path}' was prepared "
                                f"with ({info['file'] or info['kind']}); prepare the corpus with it, or use that one")
        self.input_shape = (context_length,)
        self.num_classes = int(info["vocab_size"])
        self.shuffle_windows = max(1, shuffle_windows)
        self.splits = {split: self._shards(split) for split in ("train", "val", "test")}
        self.bytes_per_token = {s: manifest["splits"][s]["bytes"] / manifest["splits"][s]["tokens"]
                                for s in self.splits if manifest["splits"][s]["tokens"]}
        self.chunks = None if storage.is_local(path) else Chunks(cache_bytes)
        self._maps: dict[str, np.ndarray] = {}

    def _shards(self, split: str) -> list[Shard]:
        out = []
        for shard in self.manifest["splits"][split]["shards"]:
            uri = storage.join(self.path, shard["file"])
            out.append(Shard(uri, int(shard["tokens"]), max(0, (int(shard["tokens"]) - 1) // self.context)))
        return out

    def check_shards(self) -> None:
        """One line for a shard that is missing or whose size disagrees with the manifest (before any step)."""
        for shards in self.splits.values():
            for shard in shards:
                if not storage.exists(shard.uri):
                    raise DataError(f"{shard.uri} is missing: the manifest of {self.path} lists it")
                size = storage.size(shard.uri)
                if size % self.dtype.itemsize or size // self.dtype.itemsize != shard.tokens:
                    raise DataError(f"{shard.uri} has {size} bytes, not the {shard.tokens} {self.dtype.name} tokens "
                                    "the manifest lists: it is truncated or from another prepare")

    # ---- reading windows

    def _tokens(self, shard: Shard, start: int, stop: int) -> np.ndarray:
        if self.chunks is not None:
            item = self.dtype.itemsize
            data = self.chunks.read(shard.uri, start * item, stop * item, shard.tokens * item)
            return np.frombuffer(data, self.dtype)
        if shard.uri not in self._maps:
            self._maps[shard.uri] = np.memmap(storage.local_path(shard.uri), self.dtype, mode="r",
                                              shape=(shard.tokens,))
        return self._maps[shard.uri][start:stop]

    def _windows(self, shards: list[Shard], picks) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and targets of windows ``picks``: ``(shard index, window in shard)`` pairs."""
        t = self.context
        rows = np.empty((len(picks), t + 1), np.int32)
        for i, (s, w) in enumerate(picks):
            rows[i] = self._tokens(shards[s], w * t, w * t + t + 1)
        return rows[:, :-1], rows[:, 1:]

    # ---- the training order

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a few epochs' layouts, while a rank is at their turn
    def _epoch(self, seed: int, epoch: int):
        """The epoch's groups: ``[(shard indices in order, their windows' cumulative counts)]`` and the first window
        of each group."""
        shards = self.splits["train"]
        order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(shards))
        groups, current, held = [], [], 0
        for s in order:
            current.append(int(s))
            held += shards[s].windows
            if held >= self.shuffle_windows:
                groups.append(current)
                current, held = [], 0
        if current:
            groups.append(current)
        starts = np.cumsum([0] + [sum(shards[s].windows for s in g) for g in groups])
        return groups, starts

    @functools.lru_cache(maxsize=2)  # noqa: B019
    def _group(self, seed: int, epoch: int, group: int) -> tuple[np.ndarray, np.ndarray]:
        """The group's windows in their drawn order as ``(shard index, window)`` columns."""
        groups, _ = self._epoch(seed, epoch)
        shards = self.splits["train"]
        members = groups[group]
        counts = [shards[s].windows for s in members]
        which = np.repeat(np.asarray(members, np.int64), counts)
        local = np.concatenate([np.arange(c, dtype=np.int64) for c in counts])
        order = np.random.default_rng([seed, epoch, group, 0x5EED]).permutation(len(which))
        return which[order], local[order]

    def window_order(self, seed: int, epoch: int, positions) -> list[tuple[int, int]]:
        """The training windows at ``positions`` of epoch ``epoch``'s order (``(shard index, window)`` each)."""
        _, starts = self._epoch(seed, epoch)
        out = []
        for p in np.asarray(positions, np.int64):
            g = int(np.searchsorted(starts, p, side="right") - 1)
            which, local = self._group(seed, epoch, g)
            out.append((int(which[p - starts[g]]), int(local[p - starts[g]])))
        return out

    def num_examples(self, split: str) -> int:
        return sum(s.windows for s in self.splits[split])

    def train_dataset(self, rank: int, size: int, batch_size: int, seed: int, shuffle_buffer: int,
                      start: int = 0) -> tf.data.Dataset:
        """This replica's part of each global batch, endless, from the ``start``-th global batch (see the module
        doc); ``shuffle_buffer`` is the source's ``shuffle_windows``."""
        glob = size * batch_size
        per_epoch = self.num_train // glob
        if per_epoch < 1:
            raise DataError(f"{self.num_train} training windows are fewer than one global batch of {glob}; lower "
                            "data.batch_size_per_rank or data.context_length")
        shards = self.splits["train"]

        def batch(step):
            epoch, k = divmod(int(step), per_epoch)
            first = k * glob + rank * batch_size
            return self._windows(shards, self.window_order(seed, epoch, range(first, first + batch_size)))

        return self._stream(tf.data.Dataset.range(start, 2**62), batch, batch_size)

    def _stream(self, steps: tf.data.Dataset, read, batch_size: int) -> tf.data.Dataset:
        t = self.context

        def load(step):
            x, y = tf.numpy_function(read, [step], (tf.int32, tf.int32), stateful=False)
            x.set_shape([batch_size, t])
            y.set_shape([batch_size, t])
            return x, y

        return steps.map(load, num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(AUTOTUNE)

    def eval_dataset(self, split: str, rank: int, size: int, batch_size: int, equal: bool,
                     limit: int = 0) -> tf.data.Dataset | None:
        """This rank's part (round-robin) of the split's windows in order, or of its first ``limit``."""
        n = self.num_examples(split)
        if limit:
            n = min(n, limit)
        if n == 0:
            return None
        shards = self.splits[split]
        ends = np.cumsum([s.windows for s in shards])
        mine = np.arange(n) if n < size and rank == 0 else (np.arange(0) if n < size else shard_indices(
            n, rank, size, equal=equal))
        if len(mine) == 0:
            return None
        picks = [(int(np.searchsorted(ends, i, side="right")),) for i in mine]
        picks = [(s, int(i - (ends[s - 1] if s else 0))) for (s,), i in zip(picks, mine)]

        def read(k):
            k = int(k)
            return self._windows(shards, picks[k * batch_size:(k + 1) * batch_size])

        batches = -(-len(picks) // batch_size)
        last = len(picks) - (batches - 1) * batch_size

        def load(k):
            x, y = tf.numpy_function(read, [k], (tf.int32, tf.int32), stateful=False)
            rows = tf.where(k == batches - 1, last, batch_size)
            x = tf.reshape(x, [rows, self.context])
            return x, tf.reshape(y, [rows, self.context])

        return tf.data.Dataset.range(batches).map(load, num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(
            AUTOTUNE)

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """A split's windows in memory (its first 4,096: calibration and small reports, never a whole corpus)."""
        ds = self.eval_dataset(split, 0, 1, 256, equal=False, limit=4096)
        if ds is None:
            return np.zeros((0, self.context), np.int32), np.zeros((0, self.context), np.int32)
        parts = list(ds)
        return np.concatenate([p[0].numpy() for p in parts]), np.concatenate([p[1].numpy() for p in parts])

    def sample_inputs(self, count: int, seed: int = 0) -> np.ndarray:
        batches = self.train_dataset(0, 1, 32, seed, 0)
        return np.concatenate([b[0].numpy() for b in batches.take(max(1, -(-count // 32)))])[:count]

    def missing_split_note(self, split: str) -> str | None:
        if self.num_examples(split):
            return None
        return (f"there is no {split} split in {self.path} (no window of {self.context + 1} tokens); prepare it with "
                f"--{'test' if split == 'test' else 'validation'}-fraction above 0")
