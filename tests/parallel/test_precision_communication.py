"""Mixed precision and communication options at 2 real ranks."""
import json

import numpy as np
import pytest

from tests.helpers import BIN, horovodrun, run_in_sequence

pytestmark = pytest.mark.parallel


@pytest.fixture(scope="module")
def worker_runs(tmp_path_factory):
    """tests/parallel/workers/mixed_precision.py, then communication.py, in one launch: {script: [rank0, rank1]}."""
    return run_in_sequence(tmp_path_factory.mktemp("precision_communication"),
                           {"mixed_precision.py": "", "communication.py": ""})


def test_fp16_overflow_on_one_rank_is_skipped_by_every_rank(worker_runs):
    r0, r1 = (
        {k: (np.array(v) if isinstance(v, list) and k != "scales" else v) for k, v in r.items()}
        for r in worker_runs["mixed_precision"]
    )
    for r in (r0, r1):
        assert r["wrapper"] == "LossScaleOptimizerV3"  # loss scaling outside the Horovod optimizer
        assert np.abs(r["after_normal"] - r["start"]).max() > 1e-4  # the normal step was applied
        np.testing.assert_array_equal(r["after_overflow"], r["after_normal"])  # the overflowing one skipped
        assert r["scales"][2] == r["scales"][1] / 2  # and the loss scale halved
    assert r0["scales"] == r1["scales"]
    np.testing.assert_array_equal(r0["after_overflow"], r1["after_overflow"])


def test_accumulation_matches_a_k_times_larger_batch_and_fp16_compression_stays_close(worker_runs):
    ranks = [{k: np.array(v) for k, v in r.items()} for r in worker_runs["communication"]]
    for r in ranks:
        moved = np.abs(r["large_batch"] - r["init"]).max()
        assert moved > 1e-2
        # measured: 1.5e-08 apart after a step that moved weights by 0.039
        np.testing.assert_allclose(r["accumulated"], r["large_batch"], atol=1e-6)
        # fp16 on the wire: measured 5.1e-05 apart after 5 steps that moved weights by 0.091
        assert np.abs(r["fp16"] - r["fp32"]).max() < 1e-3
        assert np.abs(r["fp16"] - r["fp32"]).max() < 0.01 * np.abs(r["fp32"] - r["init"]).max()
    for key in ("accumulated", "large_batch", "fp16", "tape_averaged"):
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key])
    # a custom loop's tape through distributed.gradient_tape gives the mean of the ranks' own gradients
    assert not np.allclose(ranks[0]["tape_local"], ranks[1]["tape_local"])
    np.testing.assert_allclose(ranks[0]["tape_averaged"],
                               (ranks[0]["tape_local"] + ranks[1]["tape_local"]) / 2, atol=1e-6)


def test_reduce_scatter_in_the_inputs_buffer_gives_each_rank_its_part_and_leaves_shared_inputs_alone(worker_runs):
    """Horovod patch 0006: Gloo reduce-scatters in the input's buffer when TensorFlow hands it over (nothing else
    reads it) and in a copy otherwise; a wrong hand-over would change the tensor another op reads next."""
    a = np.arange(12, dtype=np.float32)
    whole = 3 * np.concatenate([a, a])  # ranks hold [a, a] and 2 [a, a]
    for rank, r in enumerate(worker_runs["communication"]):
        part = whole[rank * 12:(rank + 1) * 12]
        got = r["reducescatter"]
        np.testing.assert_array_equal(got["alone"], part)
        np.testing.assert_array_equal(got["summed"], part)
        np.testing.assert_allclose(got["averaged"], part / 2)
        np.testing.assert_array_equal(got["input"], (rank + 1) * np.concatenate([a, a]))


def test_horovod_knobs_reach_horovod(tmp_path):
    out = tmp_path / "run"
    horovodrun([BIN / "hvdtrain", "train", "--recipe", "digits-mlp", "--output", out,
                "--set", "train.epochs=2", "--set", "distributed.timeline=timeline.json",
                "--set", "distributed.autotune=true", "--set", "distributed.autotune_log=autotune.csv",
                "--set", "distributed.fusion_threshold_mb=8", "--set", "distributed.grad_compression=fp16",
                "--set", "distributed.backward_passes_per_step=2"], extra=["--gloo"])
    timeline = (out / "timeline.json").read_text()
    assert "ALLREDUCE" in timeline or "allreduce" in timeline.lower()
    assert (out / "autotune.csv").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backward_passes_per_step"] == 2 and summary["steps_per_epoch"] % 2 == 0
