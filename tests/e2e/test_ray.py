"""Training on a Ray cluster through Horovod's Ray integration, on real local Ray clusters: one started by the
driver (`ray.init`), and two nodes on 127.0.0.1 and 127.0.0.2 started by scripts/ray_cluster.sh."""
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import BIN, ROOT, env, job, run, wait_for_epochs

pytestmark = pytest.mark.e2e


def ray_env(**extra):
    return {**env(), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", **extra}


def test_train_on_a_local_ray_cluster_with_the_usual_artifacts(tmp_path):
    out = tmp_path / "run"
    proc = run([str(BIN / "hvdtrain"), "train", "--ray", "--np", "2", "--recipe", "digits-cnn", "--set",
                "train.epochs=4", "--output", str(out)], env=ray_env(), timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["test_accuracy"] > 0.85
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert (out / "model.keras").exists() and (out / "curves.png").exists() and any((out / "tensorboard").iterdir())
    assert "epoch 4/4:" in proc.stdout + proc.stderr  # the chief's progress, forwarded by Ray


def test_a_users_function_on_ray_workers_ends_with_identical_weights(tmp_path):
    """hvdtrain.ray.run: each worker trains on its own shard from its own random init; both end equal. The local
    cluster it starts runs them at normal priority (Ray's default nice 15 lets any busy process starve them)."""
    script = tmp_path / "on_ray.py"
    script.write_text(f"""
import json, os, sys
sys.path.insert(0, {str(ROOT)!r})
import hvdtrain

def train():
    import numpy as np, tensorflow as tf
    import models
    from hvdtrain.data import digits
    hvdtrain.init()
    splits = digits.load()
    ds = splits.train_dataset(hvdtrain.rank(), hvdtrain.size(), batch_size=32, seed=0, shuffle_buffer=2000)
    tf.keras.utils.set_random_seed(100 + hvdtrain.rank())  # different initial weights on each worker
    model = models.build("mlp", input_shape=(8, 8, 1), num_classes=10, dropout=0.0)
    model.compile(hvdtrain.wrap_optimizer(tf.keras.optimizers.SGD(0.05)),
                  tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(ds, epochs=2, steps_per_epoch=10, verbose=0,
              callbacks=hvdtrain.callbacks.default_callbacks(steps_per_epoch=10))
    return hvdtrain.rank(), os.nice(0), np.concatenate([w.ravel() for w in model.get_weights()]).tolist()

results = hvdtrain.ray.run(train, num_workers=2)
print(json.dumps(results))
""")
    proc = run([sys.executable, str(script)], env=ray_env(), timeout=600)
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r[0] for r in results] == [0, 1] and [r[1] for r in results] == [0, 0]
    np.testing.assert_array_equal(results[0][2], results[1][2])


@pytest.fixture
def two_node_cluster():
    import shutil
    import tempfile
    from pathlib import Path

    from tests.conftest import free_port

    state = Path(tempfile.mkdtemp(prefix="hvr-"))  # short: Ray's socket paths must fit 107 bytes
    script = ROOT / "scripts" / "ray_cluster.sh"
    address = run([str(script), "start", str(state), str(free_port())], env=ray_env(), timeout=180).stdout.strip()
    try:
        yield address
    finally:
        subprocess.run([str(script), "stop", str(state)], env=ray_env(), capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def test_elastic_ray_job_goes_on_when_a_worker_is_killed(two_node_cluster, tmp_path):
    out = tmp_path / "elastic"
    cmd = [str(BIN / "hvdtrain"), "train", "--ray", two_node_cluster, "--network-interface", "lo", "--elastic",
           "--min-np", "1", "--max-np", "2", "--recipe", "digits-cnn", "--set", "train.epochs=8",
           "--set", "data.batch_size_per_rank=8", "--set", "train.steps_per_execution=1",
           "--set", "train.commit_every_batches=5", "--output", str(out)]
    log = tmp_path / "output.log"
    with job(cmd, log, ray_env()) as proc:
        wait_for_epochs(out, 2, proc, log)
        workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and b"ray::BaseHorovodWorker" in
                   open(f"/proc/{p}/cmdline", "rb").read()]
        assert len(workers) == 2
        # scripts/ray_cluster.sh runs them at normal priority: /proc/PID/stat's 19th field is the nice value
        assert [open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[16] for p in workers] == ["0", "0"]
        os.kill(max(workers), signal.SIGKILL)
        proc.wait(timeout=400)
    output = log.read_text()
    assert proc.returncode == 0, output[-3000:]
    assert re.search(r"elastic: 1 rank\(s\), from epoch \d+ batch \d+", output), output[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 9))  # every epoch, once
    assert json.loads((out / "summary.json").read_text())["test_accuracy"] > 0.9
