"""Corpora prepared once into token shards (hvdtrain data prepare) and streamed (data.source: tokens)."""
import json
import shutil

import numpy as np
import pytest

from hvdtrain.data import prepare as P
from hvdtrain.data import text
from hvdtrain.data.tokens import TokenSource
from hvdtrain.errors import DataError, UsageError

CORPUS = text.embedded_corpus()


def settings(path, **over) -> P.Settings:
    base = dict(input=str(path), tokenizer="bpe", vocab_size=512, validation_fraction=0.05, test_fraction=0.05,
                documents="blank-line", text_key="text", sample_bytes=100_000, segment_bytes=40_000, eod="")
    return P.Settings(**{**base, **over})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """120 KB of the corpus in two files, prepared in segments of 40 KB (several shards per split)."""
    base = tmp_path_factory.mktemp("prepared")
    (base / "in").mkdir()
    (base / "in" / "a.txt").write_bytes(CORPUS[:60_000])
    (base / "in" / "b.txt").write_bytes(CORPUS[60_000:120_000])
    manifest = P.prepare(settings(base / "in" / "*.txt"), str(base / "out"), progress="off")
    return base, manifest


def test_documents_become_token_shards_with_an_end_of_document_after_each(prepared):
    base, manifest = prepared
    out = base / "out"
    tok = P.from_file((out / "tokenizer.json").read_text(), "t", "<|endoftext|>")
    splits = manifest["splits"]
    assert manifest["segments"] >= 3 and manifest["dtype"] == "uint16" and manifest["tokenizer"]["vocab_size"] == 512
    # every document of every split is in its shards, each followed by the end of document
    tokens = {s: np.concatenate([np.fromfile(out / sh["file"], np.uint16) for sh in splits[s]["shards"]])
              for s in ("train", "val", "test")}
    for s, ids in tokens.items():
        assert (ids == tok.eod).sum() == splits[s]["documents"] and ids[-1] == tok.eod
    assert sum(splits[s]["documents"] for s in splits) == CORPUS[:60_000].count(b"\n\n") + CORPUS[60_000:120_000].count(
        b"\n\n") + 2  # each file's last record too
    assert sum(splits[s]["bytes"] for s in splits) <= 120_000
    # the held-out documents are 5% each (by a hash of their index), and each is the tokenizer's encoding
    assert 0.02 < splits["val"]["documents"] / splits["train"]["documents"] < 0.1
    first = tokens["train"][: int(np.argmax(tokens["train"] == tok.eod))]
    docs = [d for d in CORPUS[:60_000].split(b"\n\n")]
    assert any(tok.encode([d + b"\n"])[0].tolist() == first.tolist() or tok.encode([d])[0].tolist() == first.tolist()
               for d in docs[:5])


def test_a_killed_prepare_is_finished_by_running_it_again(prepared, tmp_path):
    """Kill after a segment: its shards and marker stay, the half-written next one leaves only a temporary file
    that nothing vouches for; the rerun keeps the finished segments and writes the same files."""
    base, manifest = prepared
    out = tmp_path / "out"
    shutil.copytree(base / "out", out)
    (out / "manifest.json").unlink()
    last = manifest["segments"] - 1
    (out / "segments" / f"{last:05d}.json").unlink()  # the last segment was not finished
    for shard in out.glob(f"*-{last:05d}.bin"):
        shard.write_bytes(b"\x00" * 3)  # and its shards are garbage
    again = P.prepare(settings(base / "in" / "*.txt"), str(out), progress="off")
    assert again == manifest
    for shard in (base / "out").glob("*.bin"):
        assert (out / shard.name).read_bytes() == shard.read_bytes()
    with pytest.raises(UsageError, match="prepared with other settings"):
        P.prepare(settings(base / "in" / "*.txt", vocab_size=600), str(out), progress="off")


def test_the_batches_at_data_2_are_those_of_one_process(prepared):
    """Each replica's part of a global batch, from (seed, epoch), at any number of replicas; a resumed stream
    (``start``) goes on from the same window; the order moves with the epoch and the seed."""
    source = TokenSource(str(prepared[0] / "out"), 16, shuffle_windows=40)
    one = list(source.train_dataset(0, 1, 8, seed=3, shuffle_buffer=0).take(12))
    halves = [list(source.train_dataset(r, 2, 4, seed=3, shuffle_buffer=0).take(12)) for r in (0, 1)]
    for k in range(12):
        x = np.concatenate([halves[0][k][0].numpy(), halves[1][k][0].numpy()])
        assert np.array_equal(x, one[k][0].numpy())
    later = list(source.train_dataset(1, 2, 4, seed=3, shuffle_buffer=0, start=7).take(3))
    assert np.array_equal(later[0][1].numpy(), halves[1][7][1].numpy())
    per_epoch = source.num_train // 8
    other_epoch = list(source.train_dataset(0, 1, 8, seed=3, shuffle_buffer=0, start=per_epoch).take(1))
    other_seed = list(source.train_dataset(0, 1, 8, seed=4, shuffle_buffer=0).take(1))
    assert not np.array_equal(other_epoch[0][0].numpy(), one[0][0].numpy())
    assert not np.array_equal(other_seed[0][0].numpy(), one[0][0].numpy())
    # an epoch visits every window once, shuffled across shards; targets are the inputs one token on
    visited = source.window_order(3, 0, range(source.num_train))
    assert len(set(visited)) == source.num_train and visited != sorted(visited)
    groups, _ = source._epoch(3, 0)
    assert len(groups) == len(source.splits["train"])  # shards of more than 40 windows: a group each
    together = TokenSource(str(prepared[0] / "out"), 16, shuffle_windows=10**6)  # one group: all mixed
    assert len({shard for shard, _ in together.window_order(3, 0, range(40))}) > 1
    assert np.array_equal(one[0][0].numpy()[:, 1:], one[0][1].numpy()[:, :-1])


def test_validation_is_the_prepared_split_in_order_and_its_first_batches(prepared):
    source = TokenSource(str(prepared[0] / "out"), 16)
    whole = np.concatenate([b[0].numpy() for b in source.eval_dataset("val", 0, 1, 5, equal=False)])
    assert len(whole) == source.num_examples("val") > 10
    parts = [np.concatenate([b[0].numpy() for b in source.eval_dataset("val", r, 2, 5, equal=False)]) for r in (0, 1)]
    assert sorted(map(bytes, np.concatenate(parts))) == sorted(map(bytes, whole))
    first = np.concatenate([b[0].numpy() for b in source.eval_dataset("val", 0, 1, 5, equal=False, limit=7)])
    assert np.array_equal(first, whole[:7])
    assert 2.0 < source.bytes_of_token("val") < 6.0  # text bytes per token, for bits per byte


def test_bad_prepared_directories_are_one_line(prepared, tmp_path):
    """A missing or truncated shard, a manifest of another version, a tokenizer other than the one the corpus was
    prepared with, an input that matches nothing: one line naming the file."""
    from hvdtrain import config, data

    base = prepared[0]

    def load(folder, **extra):
        cfg = config.load("llama-tiny", overrides=["data.source=tokens", f"data.path={folder}",
                                                   "data.context_length=16", *[f"{k}={v}" for k, v in extra.items()]])
        return data.load(cfg.data, model_name="llama")

    def broken(name):
        folder = tmp_path / name
        shutil.copytree(base / "out", folder)
        return folder

    truncated = broken("truncated")
    shard = sorted(truncated.glob("train-*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(DataError, match=rf"{shard.name} has \d+ bytes, not the \d+ uint16 tokens the manifest lists"):
        load(truncated)
    missing = broken("missing")
    (sorted(missing.glob("val-*.bin"))[0]).unlink()
    with pytest.raises(DataError, match="val-0000.*is missing: the manifest of"):
        load(missing)
    newer = broken("newer")
    manifest = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(DataError, match="is of version 99 of the format; this hvdtrain reads version 1"):
        load(newer)
    other = tmp_path / "other.json"
    other.write_text(P.trained_bpe([CORPUS[:30_000]], 300).json_text)
    with pytest.raises(DataError, match="is not the tokenizer data.path=.* was prepared with"):
        load(base / "out", **{"data.tokenizer": str(other)})
    with pytest.raises(DataError, match="holds no manifest.json: prepare it with hvdtrain data prepare"):
        load(tmp_path)
    with pytest.raises(DataError, match="no files match --input"):
        P.prepare(settings(tmp_path / "nothing-*.txt"), str(tmp_path / "x"), progress="off")
