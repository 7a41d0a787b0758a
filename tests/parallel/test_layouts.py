"""Tensor, pipeline and data parallelism and sharded optimizer states at 2 and 4 real ranks (horovodrun, Gloo).

Every layout trains a small gpt for 3 steps and is checked against the same model trained in one process on the
same global batches (tests/parallel/workers/layouts.py): the full weights gathered on rank 0 must equal the
one-process weights to float32 tolerance, and each rank must hold only its part. Negative controls show the check
fails when an operator is wrong.
"""
import numpy as np
import pytest

from tests.helpers import run_parallel

pytestmark = pytest.mark.parallel

# Measured: at most 2.6e-6 apart (float32 sums in another order) after 3 Adam steps that moved weights by 3.0e-3;
# the negative controls are 3.4e-3 and 6.0e-3 apart.
TOLERANCE = 1e-5


def run_layout(tmp_path, np_, *settings):
    return run_parallel("layouts.py", tmp_path, *settings, np=np_, timeout=300)


def flat(ws):
    return np.concatenate([np.asarray(w) for w in ws])


def apart(r0) -> tuple[float, float]:
    """(max difference from the one-process weights, how far training moved the weights)."""
    parallel, reference, initial = flat(r0["parallel"]), flat(r0["reference"]), flat(r0["initial"])
    return float(np.abs(parallel - reference).max()), float(np.abs(reference - initial).max())


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    return run_layout(tmp_path_factory.mktemp("tp2"), 2, "parallel.tensor=2")


def test_tensor_parallel_matches_one_process(tp2):
    diff, moved = apart(tp2[0])
    assert moved > 1e-3 and diff < TOLERANCE


def test_tensor_parallel_ranks_hold_half_of_each_split_layer(tp2):
    r0, r1 = tp2
    assert (r0["tensor_rank"], r1["tensor_rank"]) == (0, 1) and r0["data_rank"] == r1["data_rank"] == 0
    full = r0["reference_param_bytes"]
    for r in (r0, r1):
        m = r["memory"]
        replicated = m["param_bytes_per_rank"] - m["sharded_param_bytes_per_rank"]
        # the split layers' bytes are half of the one-process model's; the rest (norms, embedding) is replicated
        assert 2 * m["sharded_param_bytes_per_rank"] + replicated == full
        assert m["sharded_param_bytes_per_rank"] * 2 == full - replicated
        assert m["optimizer_bytes_per_rank"] == 2 * m["param_bytes_per_rank"]  # Adam: two slots per weight
    assert r0["loss"] == r1["loss"]  # both shards of one replica report the replica's loss


def test_negative_control_g_as_a_plain_allreduce_breaks_equivalence(tmp_path):
    """Horovod's registered gradient of allreduce sums over the group: used as Megatron's g it doubles gradients."""
    diff, moved = apart(run_layout(tmp_path, 2, "parallel.tensor=2", "negative=g")[0])
    assert diff > 100 * TOLERANCE


def test_data_x_tensor_with_sharded_optimizer_and_recompute_matches_one_process(tmp_path, tp2):
    ranks = run_layout(tmp_path, 4, "parallel.tensor=2", "parallel.shard_optimizer=true", "parallel.recompute=true")
    diff, moved = apart(ranks[0])
    assert moved > 1e-3 and diff < TOLERANCE
    # ranks 0,1 are the tensor group of replica 0; ranks 2,3 of replica 1 (tensor innermost)
    assert [(r["tensor_rank"], r["data_rank"]) for r in ranks] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    for r in ranks:  # ZeRO-1 at data=2: each rank keeps the optimizer state of half of its parameters
        assert r["memory"]["optimizer_bytes_per_rank"] * 2 == tp2[0]["memory"]["optimizer_bytes_per_rank"]
    assert ranks[0]["loss"] != ranks[2]["loss"]  # the replicas trained on different halves of the batch


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_schedules_match_one_process(tmp_path, schedule):
    r0, r1 = run_layout(tmp_path, 2, "parallel.pipeline=2", "parallel.microbatches=4",
                        f"parallel.schedule={schedule}")
    diff, moved = apart(r0)
    assert moved > 1e-3 and diff < TOLERANCE
    assert (r0["stage"], r1["stage"]) == (0, 1)
    # each stage holds its own layers only: the embedding on the first, the logits on the last
    assert r0["module_variables"][0].startswith("embed/") and not any("logits" in v for v in r0["module_variables"])
    assert r1["module_variables"][-1].startswith("logits/") and not any("embed" in v for v in r1["module_variables"])
    assert r0["memory"]["param_bytes_per_rank"] + r1["memory"]["param_bytes_per_rank"] == r0["reference_param_bytes"]
    # 4 micro-batches of 8/4 examples x 16 positions x width 32, each way, 3 steps
    assert r0["sent"] == r1["received"] == r1["sent"] == r0["received"] == 3 * 4 * 2 * 16 * 32
    assert len(r0["timings"]) == len(r1["timings"]) == 8  # 4 forwards and 4 backwards per stage


def test_pipeline_negative_control_a_lost_gradient_breaks_equivalence(tmp_path):
    diff, _ = apart(run_layout(tmp_path, 2, "parallel.pipeline=2", "parallel.microbatches=2", "negative=drop_grad")[0])
    assert diff > 100 * TOLERANCE


def test_data_x_pipeline_with_sharded_optimizer_matches_one_process(tmp_path):
    ranks = run_layout(tmp_path, 4, "parallel.pipeline=2", "parallel.microbatches=2", "parallel.shard_optimizer=true")
    diff, moved = apart(ranks[0])
    assert moved > 1e-3 and diff < TOLERANCE
    assert [(r["stage"], r["data_rank"]) for r in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_tensor_x_pipeline_matches_one_process(tmp_path):
    ranks = run_layout(tmp_path, 4, "parallel.pipeline=2", "parallel.tensor=2", "parallel.microbatches=2")
    diff, moved = apart(ranks[0])
    assert moved > 1e-3 and diff < TOLERANCE
    assert [(r["stage"], r["tensor_rank"]) for r in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
