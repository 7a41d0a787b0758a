"""Launch scripts and container files: linted, and the launchers run for real at 2 ranks."""
import json
import os
import shutil
import stat
import subprocess

import numpy as np
import pytest
import yaml

from tests.helpers import BIN, ROOT, env, run, run_parallel

pytestmark = pytest.mark.e2e
SCRIPTS = sorted([*(ROOT / "scripts").glob("*.sh"), *(ROOT / "scripts").glob("*.sbatch"),
                  ROOT / "docker" / "entrypoint.sh", ROOT / ".ci" / "run"])


def test_every_script_passes_shellcheck():
    run([str(BIN / "shellcheck"), *map(str, SCRIPTS)])


def test_dockerfiles_pass_hadolint_and_install_through_the_ci_script():
    dockerfiles = sorted((ROOT / "docker").glob("Dockerfile.*"))
    assert [d.name for d in dockerfiles] == ["Dockerfile.cpu", "Dockerfile.gpu"]
    run([str(BIN / "hadolint"), *map(str, dockerfiles)])
    for d in dockerfiles:
        assert "bash scripts/setup.sh" in d.read_text()  # the same install logic that `make test` runs
        assert "ARG HVDTRAIN_STACK=current" in d.read_text()  # either stack, as setup.sh chooses it
    assert "HVDTRAIN_GPU=1" in (ROOT / "docker" / "Dockerfile.gpu").read_text()
    assert "HOROVOD_GPU_OPERATIONS=NCCL" in (ROOT / "scripts" / "setup.sh").read_text()


def test_compose_and_mpijob_are_well_formed():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    assert {"launcher", "worker"} <= set(compose["services"])
    assert "launcher:1,worker:1" in compose["services"]["launcher"]["command"]
    job = yaml.safe_load((ROOT / "docker" / "mpijob.yaml").read_text())
    assert job["kind"] == "MPIJob"
    worker = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
    gpus = worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == job["spec"]["slotsPerWorker"]  # one rank per GPU
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in worker["volumes"])  # /dev/shm for NCCL


def dry(script, *args, **extra):
    e = env()
    e.update(DRY_RUN="1", **extra)
    return subprocess.run([str(ROOT / "scripts" / script), *args], capture_output=True, text=True, env=e,
                          check=True).stdout


def test_train_sh_builds_the_horovodrun_command(tmp_path):
    out = dry("train.sh", "--recipe", "digits-cnn", HOSTS="a:2,b:3", NETWORK_INTERFACE="eth0", CONTROLLER="gloo")
    assert "-np 5 -H a:2\\,b:3 --gloo --network-interface eth0" in out
    assert out.strip().endswith("train --recipe digits-cnn")
    # by default MPI's controller where mpirun is installed (ranks yield while they wait), else Gloo's
    assert "--mpi --mpi-args=--mca\\ mpi_yield_when_idle\\ 1 " in dry("train.sh", "--recipe", "x")
    no_mpi = tmp_path / "bin"
    no_mpi.mkdir()
    for tool in ("bash", "dirname"):
        (no_mpi / tool).symlink_to(shutil.which(tool))
    assert " --gloo " in dry("train.sh", "--recipe", "x", PATH=str(no_mpi))


def test_slurm_script_builds_hosts_from_the_nodelist(tmp_path):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\nprintf 'node1\\nnode2\\n'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = dry("slurm_train.sbatch", "--recipe", "digits-cnn", LAUNCHER="horovodrun",
              SLURM_JOB_NODELIST="node[1-2]", SLURM_NTASKS_PER_NODE="4(x2)",
              PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert "-np 8 -H node1:4\\,node2:4 --gloo" in out
    assert "srun --mpi=pmix" in dry("slurm_train.sbatch", "--recipe", "x")


def test_train_sh_runs_at_two_ranks(tmp_path):
    out = tmp_path / "run"
    e = env()
    e["NP"] = "2"
    run([str(ROOT / "scripts" / "train.sh"), "--recipe", "digits-mlp", "--set", "train.epochs=2",
         "--set", "train.precision=mixed_bfloat16", "--output", str(out)], env=e, timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["controller"] == "mpi"  # the default where mpirun is installed
    assert summary["precision"] == "mixed_bfloat16" and summary["test_accuracy"] > 0.5  # the CLI's bfloat16 run


def test_mpirun_script_trains_at_two_ranks_with_the_mpi_controller(tmp_path):
    out = tmp_path / "run"
    proc = run([str(ROOT / "scripts" / "mpirun_train.sh"), "--recipe", "digits-mlp", "--set", "train.epochs=2",
                "--output", str(out)], timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["controller"] == "mpi"
    # mpirun hands ranks a pseudo-terminal: progress must still be whole lines (no bar), from rank 0 only
    assert "\r" not in proc.stdout
    assert [ln[:9] for ln in proc.stdout.splitlines() if ln.startswith("epoch ")] == ["epoch 1/2", "epoch 2/2"]


def test_weights_identical_under_mpirun(tmp_path):
    r0, r1 = run_parallel("train_identical.py", tmp_path, launcher="mpirun")
    assert r0["first_labels"] != r1["first_labels"]
    np.testing.assert_array_equal(r0["final"], r1["final"])
