"""Helpers for the tests: running commands, and scripts at 2 ranks under horovodrun."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def env() -> dict[str, str]:
    """Environment for child processes: the venv first on PATH, quiet TensorFlow."""
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e["TF_CPP_MIN_LOG_LEVEL"] = "2"
    e["PYTHONPATH"] = str(ROOT)
    # Open MPI's ranks spin while they wait unless the node is oversubscribed; two pytest workers on 2 cores do
    # oversubscribe it, so they yield as Open MPI's own oversubscribed mode does (a 2-rank run under MPI, measured
    # alone: 21.0-23.1 s of CPU against 23.2-27.5 s spinning)
    e.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    return e


def run(cmd: list[str], timeout: float = 300, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a command, capture its output, and fail the test with that output when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=kw.pop("env", env()), **kw)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                    f"\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


def horovodrun(args: list, np: int = 2, timeout: float = 300, check: bool = True,
               extra: list[str] | None = None, cwd: Path | None = None,
               environment: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``horovodrun -np N -H localhost:N [EXTRA] ARGS``, as a user runs it (``environment``: added to the ranks')."""
    cmd = [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", *(extra or []), *map(str, args)]
    return run(cmd, timeout=timeout, check=check, cwd=cwd, env={**env(), **(environment or {})})


def hvdtrain_at(np: int, args: list, failpoint: str | None = None, check: bool = True,
                timeout: float = 600) -> subprocess.CompletedProcess:
    """``hvdtrain ARGS`` as a user runs it: in one process at ``np`` 1, else under ``horovodrun --gloo -np N``;
    ``failpoint``: ``HVDTRAIN_FAILPOINT`` (a SIGKILL at a point of the run: hvdtrain.rundir.failpoint)."""
    e = {**env(), **({"HVDTRAIN_FAILPOINT": failpoint} if failpoint else {})}
    cmd = [str(BIN / "hvdtrain"), *map(str, args)]
    if np > 1:
        cmd = [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", "--gloo", *cmd]
    return run(cmd, timeout=timeout, check=check, env=e)


def mpirun(args: list, np: int = 2, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """OpenMPI's ``mpirun`` at ``np`` local ranks, with the flags needed as root and on few cores."""
    e = env()
    e.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", str(np),
           "-x", "PATH", "-x", "PYTHONPATH", "-x", "TF_CPP_MIN_LOG_LEVEL", *map(str, args)]
    return run(cmd, timeout=timeout, check=check, env=e)


def run_parallel(script: str, outdir: Path, *args: str, np: int = 2, timeout: float = 300,
                 launcher: str = "horovodrun", environment: dict[str, str] | None = None) -> list[dict]:
    """Run ``tests/parallel/workers/SCRIPT`` at ``np`` ranks; each rank writes ``rank{r}.json``; return them.

    ``horovodrun --gloo`` unless ``launcher="mpirun"``: under MPI a rank that waits for its peer spins, and on 2
    cores shared by two pytest workers the layouts' launch took 265 s under MPI and 208 s under Gloo (measured side
    by side, the other core kept busy). MPI runs in the tests that are about it (tests/e2e/test_launchers.py,
    test_multihost.py, the collectives benchmark's MPI floor)."""
    outdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, ROOT / "tests" / "parallel" / "workers" / script, outdir, *args]
    if launcher == "mpirun":
        mpirun(command, np=np, timeout=timeout)
    else:
        horovodrun(command, np=np, timeout=timeout, extra=["--gloo"], environment=environment)
    return [json.loads((outdir / f"rank{r}.json").read_text()) for r in range(np)]


def run_in_sequence(base: Path, scripts: dict[str, str], np: int = 2, timeout: float = 300,
                    environment: dict[str, str] | None = None) -> dict[str, list[dict]]:
    """Several ``tests/parallel/workers`` scripts one after another in the same ranks of one launch
    (workers/in_sequence.py), each given its argument (``""``: none) and its folder ``base/STEM`` (made if missing;
    a caller may fill it first); return ``{stem: [rank0, rank1, ...]}`` from each folder's ``rank{r}.json``."""
    folders = {Path(script).stem: base / Path(script).stem for script in scripts}
    steps = []
    for script, arg in scripts.items():
        folders[Path(script).stem].mkdir(parents=True, exist_ok=True)
        steps += [f"{script}:{arg}" if arg else script, str(folders[Path(script).stem])]
    run_parallel("in_sequence.py", base, *steps, np=np, timeout=timeout, environment=environment)
    return {stem: [json.loads((folder / f"rank{r}.json").read_text()) for r in range(np)]
            for stem, folder in folders.items()}


@contextlib.contextmanager
def job(cmd: list[str], log: Path, environment: dict[str, str]):
    """A long job started in its own session with its output going to ``log``; killed on leaving if still running.

    The output goes to a file and not a pipe: nobody reads a pipe while the test waits on the job, and a chatty job
    (Ray forwards every worker's warnings and stack traces) can fill the pipe's 64 KB and stop at its next write.
    """
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=environment, start_new_session=True, stdout=f, stderr=subprocess.STDOUT,
                                text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for_epochs(out: Path, epochs: int, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Wait until ``out/metrics.jsonl`` has ``epochs`` lines, failing if ``proc`` ends first or time runs out."""
    import time

    deadline = time.time() + timeout
    metrics = out / "metrics.jsonl"
    while not metrics.exists() or len(metrics.read_text().splitlines()) < epochs:
        ended = proc.poll() is not None
        if ended or time.time() > deadline:
            what = f"the job ended (exit {proc.returncode})" if ended else f"{timeout:.0f} s passed"
            raise AssertionError(f"{what} before epoch {epochs}:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)
