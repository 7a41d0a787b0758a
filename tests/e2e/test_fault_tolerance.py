"""Crashes, corrupt checkpoints, failing ranks and diverging losses, as a user meets them."""
import json
import os
import re
import signal
import sys
import time

import pytest

from tests.helpers import BIN, ROOT, env, horovodrun, job, run, wait_for_epochs

pytestmark = pytest.mark.e2e

TRAIN = [str(BIN / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo", str(BIN / "hvdtrain"), "train",
         "--recipe", "digits-mlp", "--set", "train.epochs=6", "--set", "train.keep_checkpoints=2"]


def summary(out):
    return json.loads((out / "summary.json").read_text())


def metric_epochs(out):
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoint_epochs(out):
    return sorted(int(p.name[6:]) for p in (out / "checkpoints").glob("epoch-*") if (p / "state.json").exists())


def test_killed_inside_the_checkpoint_window_each_epoch_is_kept_exactly_once(tmp_path):
    """SIGKILL on purpose at each point between an epoch's metrics line and its checkpoint, one after another on
    the same output directory; every resume must restart after the last complete checkpoint and the finished run
    must hold each epoch's line once, and match an uninterrupted run."""
    reference, out = tmp_path / "reference", tmp_path / "crashed"
    run([*TRAIN, "--output", str(reference)], timeout=600)

    def killed_at(point):
        proc = run([*TRAIN, "--output", str(out)], env={**env(), "HVDTRAIN_FAILPOINT": point}, check=False,
                   timeout=600)
        assert proc.returncode != 0, proc.stdout[-2000:]
        return proc

    killed_at("after-metrics@2")  # epoch 2's line written, its checkpoint not yet
    assert metric_epochs(out) == [1, 2] and checkpoint_epochs(out) == [1]
    proc = killed_at("mid-checkpoint@3")  # epoch 3's files written, its marker not yet
    assert "resuming after epoch 1" in proc.stdout
    assert metric_epochs(out) == [1, 2, 3] and checkpoint_epochs(out) == [1, 2]
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".epoch-0003")]  # the partial one
    proc = killed_at("after-checkpoint@4")  # epoch 4 complete, then killed before its end-of-epoch work is over
    assert "resuming after epoch 2" in proc.stdout and "incomplete checkpoint" in proc.stderr
    assert metric_epochs(out) == [1, 2, 3, 4] and checkpoint_epochs(out) == [2, 3, 4]  # killed before pruning
    assert not (out / "summary.json").exists()

    again = run([*TRAIN, "--output", str(out)], timeout=600)
    assert "resuming after epoch 4" in again.stdout
    assert metric_epochs(out) == [1, 2, 3, 4, 5, 6]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    # Tolerance: the data order and the optimizer state resume exactly, dropout's random draws do not, so the
    # runs are close but not bit-equal (0.03 is 11 of the 360 test digits).
    assert summary(out)["test_accuracy"] == pytest.approx(summary(reference)["test_accuracy"], abs=0.03)
    assert summary(out)["test_loss"] == pytest.approx(summary(reference)["test_loss"], abs=0.08)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path):
    out = tmp_path / "run"
    base = [str(BIN / "hvdtrain"), "train", "--recipe", "digits-mlp", "--output", str(out)]
    run([*base, "--set", "train.epochs=3"])
    data = next((out / "checkpoints" / "epoch-0003").glob("rank-00000.data-*"))
    data.write_bytes(data.read_bytes()[:100])  # truncated
    proc = run([*base, "--set", "train.epochs=4"])
    assert "checkpoint" in proc.stderr and "unreadable" in proc.stderr and "epoch-0003" in proc.stderr
    assert "resuming after epoch 2" in proc.stdout
    assert summary(out)["epochs"] == 4


def test_a_failing_rank_stops_the_whole_job_quickly(tmp_path):
    start = time.time()
    proc = horovodrun([sys.executable, ROOT / "tests" / "parallel" / "workers" / "fail_rank1.py", tmp_path / "out"],
                      extra=["--gloo"], check=False, timeout=300)
    elapsed = time.time() - start
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stdout + proc.stderr
    assert elapsed < 120  # bounded: measured 17.5 s, mostly start-up; 50 epochs would take minutes
    assert not (tmp_path / "out" / "summary.json").exists()


def test_nan_loss_stops_with_epoch_and_step_and_keeps_no_nan_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = run([str(BIN / "hvdtrain"), "train", "--recipe", "digits-mlp", "--set", "train.optimizer=sgd",
                "--set", "train.learning_rate=1e12", "--set", "train.warmup_epochs=0", "--output", str(out)],
               check=False)
    assert proc.returncode == 1
    assert "loss became nan at epoch 1, step" in proc.stderr.lower() or "loss became inf" in proc.stderr.lower()
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    assert not (out / "model.keras").exists()


def rank_pids(marker: str, rank: int) -> list[int]:
    """Processes whose command line contains ``marker`` and whose environment says HOROVOD_RANK=rank."""
    pids = []
    for proc in os.listdir("/proc"):
        if not proc.isdigit():
            continue
        try:
            cmdline = open(f"/proc/{proc}/cmdline", "rb").read().decode(errors="replace")
            environ = open(f"/proc/{proc}/environ", "rb").read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if marker in cmdline and "hvdtrain" in cmdline and f"HOROVOD_RANK={rank}" in environ:
            pids.append(int(proc))
    return pids


def test_elastic_job_survives_a_killed_worker(tmp_path):
    out = tmp_path / "elastic"
    cmd = [str(BIN / "horovodrun"), "-np", "2", "--min-np", "1", "--max-np", "2",
           "--host-discovery-script", str(ROOT / "scripts" / "discover_hosts.sh"), "--network-interface", "lo",
           str(BIN / "hvdtrain"), "train", "--recipe", "digits-cnn", "--elastic", "--set", "train.epochs=5",
           "--set", "data.batch_size_per_rank=8", "--set", "train.steps_per_execution=1",
           "--set", "train.commit_every_batches=5", "--output", str(out)]
    log = tmp_path / "output.log"
    with job(cmd, log, env()) as proc:
        wait_for_epochs(out, 2, proc, log)
        time.sleep(0.3)  # into epoch 3
        victims = rank_pids(str(out), 1)
        assert victims, "rank 1 not found"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=300)
    output = log.read_text()
    assert proc.returncode == 0, output[-3000:]
    resumed = re.search(r"elastic: 1 rank\(s\), from epoch (\d+) batch (\d+)", output)
    assert resumed and int(resumed.group(1)) >= 3  # went on alone from the last commit, after epoch 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]  # every epoch finished, none lost
    assert summary(out)["world_size"] == 1 and summary(out)["test_accuracy"] > 0.9
    # the cosine schedule followed progress in epochs, not the 2-rank step count (which would have ended it early)
    assert rows[3]["lr"] > 0


def test_elastic_job_grows_when_a_host_is_added(tmp_path):
    """Scale-up: a job started on one slot takes in a second when discovery lists it, and the new rank starts from
    rank 0's committed state."""
    out, hosts = tmp_path / "grow", tmp_path / "hosts.txt"
    hosts.write_text("localhost:1\n")
    cmd = [str(BIN / "horovodrun"), "-np", "1", "--min-np", "1", "--max-np", "2",
           "--host-discovery-script", str(ROOT / "scripts" / "discover_hosts.sh"), "--network-interface", "lo",
           str(BIN / "hvdtrain"), "train", "--recipe", "digits-cnn", "--elastic", "--set", "train.epochs=5",
           "--set", "data.batch_size_per_rank=8", "--set", "train.steps_per_execution=1",
           "--set", "train.commit_every_batches=5", "--output", str(out)]
    log = tmp_path / "output.log"
    with job(cmd, log, {**env(), "HOSTS_FILE": str(hosts)}) as proc:
        wait_for_epochs(out, 1, proc, log)
        hosts.write_text("localhost:1\n127.0.0.1:1\n")  # a second host joins after epoch 1
        proc.wait(timeout=300)
    output = log.read_text()
    assert proc.returncode == 0, output[-3000:]
    assert re.search(r"elastic: 1 rank\(s\), from epoch 1 batch 0", output)
    grown = re.search(r"elastic: 2 rank\(s\), from epoch (\d+) batch (\d+)", output)
    assert grown and int(grown.group(1)) >= 2, output[-3000:]  # joined after epoch 1, kept what was done
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert summary(out)["world_size"] == 2 and summary(out)["test_accuracy"] > 0.9
