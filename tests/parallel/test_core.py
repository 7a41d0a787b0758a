"""The distributed core at 2 real Horovod ranks (horovodrun), checking what each rank did."""
import numpy as np
import pytest

from tests.helpers import run_in_sequence

pytestmark = pytest.mark.parallel


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The workers of this file one after another in one launch: {script: [rank0, rank1]}."""
    return run_in_sequence(tmp_path_factory.mktemp("core"), {
        "train_identical.py": "--plain", "callbacks_behaviour.py": "", "divergence.py": "minimize,apply_gradients"})


@pytest.fixture(scope="module")
def identical_run(runs):
    """The wrapped run and, in the same launch, the plain one (the negative control)."""
    return runs["train_identical"]


def test_ranks_end_with_identical_weights_after_training_on_different_data(identical_run):
    r0, r1 = identical_run
    assert r0["size"] == r1["size"] == 2
    assert r0["first_labels"] != r1["first_labels"]  # each rank saw its own shard
    assert not np.allclose(r0["init"], r1["init"])  # and started from its own random init
    final0, final1 = np.array(r0["final"]), np.array(r1["final"])
    assert not np.allclose(final0, r0["init"])  # training moved the weights
    np.testing.assert_array_equal(final0, final1)


def test_negative_control_without_horovod_the_ranks_diverge(identical_run):
    """The same training with a plain optimizer and no broadcast: proves the test above can fail."""
    r0, r1 = (r["plain"] for r in identical_run)
    assert not np.allclose(r0["init"], r1["init"])
    assert np.abs(np.array(r0["final"]) - np.array(r1["final"])).max() > 1e-3


@pytest.fixture(scope="module")
def callbacks_run(runs):
    return runs["callbacks_behaviour"]


def test_metric_average_reports_the_mean_over_ranks(callbacks_run):
    r0, r1 = callbacks_run
    for epoch in range(3):
        # a metric worth 0 on rank 0 and 1 on rank 1 reaches later callbacks as 0.5 on both
        assert r0["logs"][epoch]["rank_value"] == r1["logs"][epoch]["rank_value"] == 0.5
        # the ranks' own losses differ (different data); both later see their mean
        local = [r0["local_loss"][epoch], r1["local_loss"][epoch]]
        assert local[0] != local[1]
        assert r0["logs"][epoch]["loss"] == pytest.approx(np.mean(local), rel=1e-5)
        assert r1["logs"][epoch]["loss"] == r0["logs"][epoch]["loss"]


def test_learning_rate_is_scaled_by_world_size_and_warmed_up(callbacks_run):
    for r in callbacks_run:
        plan, lrs = r["plan"], r["lrs"]
        assert plan["data_ranks"] == 2
        assert plan["learning_rate"] == pytest.approx(2 * plan["base_learning_rate"])
        warm = plan["warmup_steps"]
        assert warm == 2 * plan["steps_per_epoch"]
        assert len(lrs) == plan["total_steps"]
        assert lrs[0] == pytest.approx(plan["base_learning_rate"])
        # linear ramp over the warmup, then the scaled rate
        expected = [plan["base_learning_rate"] * (1 + s / warm) for s in range(warm)]
        np.testing.assert_allclose(lrs[:warm], expected, rtol=1e-5)
        np.testing.assert_allclose(lrs[warm:], plan["learning_rate"], rtol=1e-6)
    assert callbacks_run[0]["lrs"] == callbacks_run[1]["lrs"]


@pytest.fixture(scope="module")
def divergence_run(runs):
    """A custom train step that averages (minimize), then one that falls in the trap (apply_gradients)."""
    return runs["divergence"]


def test_divergence_guard_stops_every_rank_on_the_apply_gradients_trap(divergence_run):
    r0, r1 = (r["apply_gradients"] for r in divergence_run)
    for r in (r0, r1):
        assert r["error"] is not None, "the guard did not fire"
        assert r["error"].startswith("ranks diverged by epoch 1:")
        assert r["variables"][0] in r["error"]  # names the first diverged variable
        assert "relative spread" in r["error"] and "apply_gradients" in r["error"]
        assert "\n" not in r["error"]
    assert r0["error"] == r1["error"]  # every rank stops with the same line


def test_divergence_guard_never_fires_on_an_averaged_run(divergence_run):
    r0, r1 = (r["minimize"] for r in divergence_run)
    assert r0["error"] is None and r1["error"] is None
    assert r0["epochs_done"] == r1["epochs_done"] == 3
    assert len(r0["guard_seconds"]) == 3  # it did check, every epoch
