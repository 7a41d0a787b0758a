"""No rank builds or keeps the whole model: measured peak memory (resident set), not counted bytes.

tests/parallel/workers/memory.py trains a small gpt and then a larger one (26M parameters) in one process,
writes a sharded checkpoint, reads it back as a resume does and streams model.keras on the chief; the larger
model's growth of the peak resident set over the small one's is what its size costs each rank. At tensor=2 x
pipeline=2 each rank should hold about a quarter of the weights, gradients and optimizer state; the test allows
half of the one-process growth, so it fails if any rank ever holds a whole copy (weights alone of the larger gpt
are 100 MB, with Adam's state 300 MB).
"""
import pytest

from tests.helpers import run_parallel

pytestmark = pytest.mark.parallel


def measure(tmp_path, np_, layout):
    from hvdtrain.data import text

    tmp_path.mkdir(parents=True)
    (tmp_path / "corpus.txt").write_bytes(text.embedded_corpus()[:20_000])
    ranks = run_parallel("memory.py", tmp_path, layout, np=np_, timeout=900)
    return [r["large"] - r["small"] for r in ranks], ranks[0]["large_parameters"]


def test_each_rank_grows_by_at_most_half_of_one_process_at_tensor_2_x_pipeline_2(tmp_path):
    (one,), parameters = measure(tmp_path / "one", 1, "")
    split, _ = measure(tmp_path / "split", 4, "parallel.tensor=2,parallel.pipeline=2")
    assert parameters > 20_000_000
    assert one > 3 * 4 * parameters  # one process: weights, gradients and Adam's two slots at least
    worst = max(split)
    print(f"peak growth: one process {one / 2**20:.0f} MB; tensor=2 x pipeline=2 per rank "
          f"{', '.join(f'{g / 2**20:.0f}' for g in split)} MB ({worst / one:.2f} of one process)")
    assert worst <= one / 2
