"""The project's Slurm batch script on a real single-node Slurm cluster (munged, slurmctld and slurmd started by
scripts/slurm_cluster.sh in a temporary directory, stopped afterwards), submitted with `sbatch --wait` as a user
would: with srun (PMIx, Horovod's MPI controller) and with horovodrun (Gloo), and a job that fails."""
import json
import os
import subprocess

import pytest

from tests.helpers import ROOT, env

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def slurm():
    import shutil
    import tempfile
    from pathlib import Path

    from tests.conftest import free_port

    # munged refuses a socket below a directory others cannot traverse (pytest's are private): a 755 one in /tmp
    state = Path(tempfile.mkdtemp(prefix="hvdtrain-slurm-"))
    state.chmod(0o755)
    script = ROOT / "scripts" / "slurm_cluster.sh"
    # output to a file, not a pipe: the daemons started in the background keep the script's descriptors
    with open(state / "start.log", "w") as log:
        code = subprocess.run([str(script), "start", str(state), str(free_port()), "2"], stdout=log,
                              stderr=subprocess.STDOUT, timeout=120).returncode
    if code != 0:
        subprocess.run([str(script), "stop", str(state)], capture_output=True, timeout=60)
        pytest.fail(f"the Slurm cluster did not start:\n{(state / 'start.log').read_text()}")
    try:
        yield state
    finally:
        subprocess.run([str(script), "stop", str(state)], capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def test_the_batch_script_trains_under_srun_and_horovodrun_and_a_failing_job_fails(slurm, tmp_path):
    jobs = {"srun": ["train.epochs=3"], "horovodrun": ["train.epochs=3"], "failing": ["train.epoch=3"]}
    procs = {}
    for name, sets in jobs.items():  # submitted together, sharing the node's 2 cores
        e = {**env(), "SLURM_CONF": str(slurm / "slurm.conf"), "LAUNCHER": "srun" if name != "horovodrun"
             else "horovodrun", "HVDTRAIN_HOME": str(ROOT)}
        procs[name] = subprocess.Popen(
            ["sbatch", "--wait", "--parsable", "--oversubscribe", "-N1", "-n2", "--ntasks-per-node=2",
             "--cpus-per-task=1", "-o", str(tmp_path / f"{name}-%j.log"), str(ROOT / "scripts" / "slurm_train.sbatch"),
             "--recipe", "digits-mlp", *(a for s in sets for a in ("--set", s)),
             "--set", "distributed.divergence_check_epochs=1", "--output", str(tmp_path / name)],
            cwd=tmp_path, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {name: (p.wait(timeout=600), p.stdout.read().strip()) for name, p in procs.items()}
    for name, controller in (("srun", "mpi"), ("horovodrun", "gloo")):
        code, job = results[name]
        log = next(tmp_path.glob(f"{name}-*.log")).read_text()
        assert code == 0, log[-3000:]
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["controller"] == controller
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [1, 2, 3]
        # the divergence guard compared every weight across both ranks at each epoch's end, and let the run finish
        assert "ranks diverged" not in log
    code, job = results["failing"]
    assert code != 0
    state = subprocess.run(["scontrol", "show", "job", job.split(";")[0]], capture_output=True, text=True,
                           env={**os.environ, "SLURM_CONF": str(slurm / "slurm.conf")}).stdout
    assert "JobState=FAILED" in state and "ExitCode=2:0" in state
    log = next(tmp_path.glob("failing-*.log")).read_text()
    assert "hvdtrain: error: unknown config key 'train.epoch' (did you mean 'train.epochs'?)" in log
    assert not (tmp_path / "failing").exists()
