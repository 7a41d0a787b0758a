"""The sharded checkpoint format on its own: pieces written by several "ranks" (tensor-parallel halves, ZeRO's flat
ranges across them), read back as any box of any variable; and the one-line errors for a checkpoint that is not
whole or not of this model."""
import json

import numpy as np
import pytest

from hvdtrain.formats import checkpoint
from hvdtrain.formats.checkpoint import CheckpointError, Piece, Reader, write_bundle


def write(folder, written, variables):
    """A checkpoint folder from ``{file: [Piece]}`` and ``{name: {shape, axis, parts}}``."""
    manifest = {"format": checkpoint.FORMAT, "version": 1, "layout": {}, "model": None, "scalars": {"iterations": 7},
                "variables": {}}
    for file, pieces in written.items():
        for name, kind, part, start, stop, key in write_bundle(str(folder / file), pieces):
            entry = manifest["variables"].setdefault(name, {**variables[name], "trainable": True, "pieces": {}})
            entry["pieces"].setdefault(kind, []).append([file, key, part, start, stop])
    (folder / checkpoint.MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture
def kernel():
    return np.arange(4 * 6, dtype=np.float32).reshape(4, 6)  # split on axis 1 into 2 parts of 4 x 3


def test_any_box_of_a_split_variable_reads_from_the_pieces_that_cover_it(tmp_path, kernel):
    halves = np.split(kernel, 2, axis=1)
    m = [h * 10 for h in halves]
    # part 0 whole from rank 0; part 1 as two flat ranges (ZeRO at data=2) from ranks 1 and 3; slot m likewise
    write(tmp_path, {
        "rank-00000": [Piece("k", "param", 0, 0, 12, halves[0]), Piece("k", "m", 0, 0, 12, m[0])],
        "rank-00001": [Piece("k", "param", 1, 0, 5, halves[1].ravel()[:5]), Piece("k", "m", 1, 0, 5, m[1].ravel()[:5])],
        "rank-00003": [Piece("k", "param", 1, 5, 12, halves[1].ravel()[5:]),
                       Piece("k", "m", 1, 5, 12, m[1].ravel()[5:])],
    }, {"k": {"shape": [4, 6], "axis": 1, "parts": 2}})
    reader = Reader(str(tmp_path))
    assert np.array_equal(reader.read("k"), kernel)  # one process
    assert np.array_equal(reader.read("k", "m"), kernel * 10)
    # another tensor-parallel degree: thirds of axis 1, each straddling the saved halves
    for third in range(3):
        assert np.array_equal(reader.read("k", box=((0, 2 * third), (4, 2))), kernel[:, 2 * third: 2 * third + 2])
    # a split along the other axis (another family's plan, say): rows 1..2
    assert np.array_equal(reader.read("k", box=((1, 0), (2, 6))), kernel[1:3])
    assert reader.scalars["iterations"] == 7 and reader.kinds("k") == ["param", "m"]


def test_a_missing_or_unknown_piece_is_a_one_line_error(tmp_path, kernel):
    halves = np.split(kernel, 2, axis=1)
    write(tmp_path, {"rank-00000": [Piece("k", "param", 0, 0, 12, halves[0])],
                     "rank-00001": [Piece("k", "param", 1, 0, 5, halves[1].ravel()[:5])]},  # 7 values lost
          {"k": {"shape": [4, 6], "axis": 1, "parts": 2}})
    reader = Reader(str(tmp_path))
    assert np.array_equal(reader.read("k", box=((0, 0), (4, 3))), halves[0])  # the whole part still reads
    for call, words in [(lambda: reader.read("k"), r"lacks part of k \(param\): 5 of 12 values of slice 1"),
                        (lambda: reader.read("other"), "has no variable other"),
                        (lambda: reader.read("k", "v"), "holds no v of k")]:
        with pytest.raises(CheckpointError, match=words) as info:
            call()
        assert "\n" not in str(info.value)


def test_a_folder_without_a_manifest_is_not_a_checkpoint_of_this_format(tmp_path):
    with pytest.raises(CheckpointError, match="has no manifest.json"):
        Reader(str(tmp_path))
    (tmp_path / checkpoint.MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Reader(str(tmp_path))


def test_a_bundle_larger_than_a_chunk_is_written_in_parts_and_merged(tmp_path, kernel, monkeypatch):
    """Pieces are made when written (a callable's values, a variable's own buffer), a chunk at a time, and the parts
    merged into the rank's one bundle: the same reads as a bundle written at once, no parts left behind."""
    import tensorflow as tf

    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 4 * 7)  # at most 7 values per part
    variable = tf.Variable(kernel * 10)
    made = []

    def lazy():
        made.append(1)
        return tf.constant(kernel.ravel()[5:])

    pieces = [Piece("k", "param", 0, 0, 5, kernel.ravel()[:5]), Piece("k", "param", 0, 5, 24, lazy),
              Piece("k", "m", 0, 0, 24, variable)]
    write(tmp_path, {"rank-00000": pieces},
          {"k": {"shape": [4, 6], "axis": None, "parts": 1}})
    # one bundle: an index, one data file per part (as TensorFlow merges bundles), no part's folder left
    assert made == [1] and sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json", *(f"rank-00000.data-0000{k}-of-00003" for k in range(3)), "rank-00000.index"]
    reader = Reader(str(tmp_path))
    assert np.array_equal(reader.read("k"), kernel) and np.array_equal(reader.read("k", "m"), kernel * 10)


def test_reading_a_checkpoint_leaves_no_data_file_buffered(tmp_path, monkeypatch):
    """TensorFlow's bundle reader keeps a 1 MB buffer for each data file it has read from until it is closed, and a
    rank's bundle is written in data files of CHUNK_BYTES: readers kept open over a whole checkpoint held one buffer
    per data file (writing a 113M-parameter model.keras from a data=4 checkpoint's 44 data files grew the resident
    set 69 MB with them kept open, 21 MB closed). Here 40 data files of 1.2 MB, each variable read whole: the
    resident set grows by far less than 40 MB."""
    import gc

    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 4 * 300_000)
    values = [np.full(150_000, i, np.float32) for i in range(80)]  # two variables per data file
    write(tmp_path, {"rank-00000": [Piece(f"w{i}", "param", 0, 0, v.size, v) for i, v in enumerate(values)]},
          {f"w{i}": {"shape": [v.size], "axis": None, "parts": 1} for i, v in enumerate(values)})
    assert len(list(tmp_path.glob("rank-00000.data-*"))) == 40

    def resident_mb():
        return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024

    reader = Reader(str(tmp_path))
    gc.collect()
    before = resident_mb()
    for i, v in enumerate(values):
        assert np.array_equal(reader.read(f"w{i}"), v)
    grown = resident_mb() - before
    assert grown < 15, f"{grown:.0f} MB more resident after reading 40 data files"
