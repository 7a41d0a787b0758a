"""Servers shared by the tests that need them, started once per session by the project's own scripts and stopped
afterwards: a Ceph S3 gateway (scripts/s3_server.sh) and a Slurm cluster (scripts/slurm_cluster.sh)."""
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
import hvdtrain  # noqa: E402,F401 - sets TF_USE_LEGACY_KERAS (TF 2.21), for workers that import TF first

# Seconds each of the slowest test files took in a run of the whole suite (JUnit times, 2 cores). `make test` runs
# two workers that take whole files; the longest start first, so that no worker is left alone with one at the end.
FILE_SECONDS = {
    "tests/e2e/test_parallel_cli.py": 480, "tests/parallel/test_layouts.py": 300, "tests/e2e/test_compression.py": 210,
    "tests/e2e/test_pretrained.py": 200,
    "tests/e2e/test_serving.py": 168, "tests/e2e/test_object_storage.py": 200, "tests/e2e/test_fault_tolerance.py": 138,
    "tests/e2e/test_train_cli.py": 132, "tests/e2e/test_ray.py": 120, "tests/e2e/test_benchmark.py": 110,
    "tests/e2e/test_corpus.py": 95, "tests/e2e/test_language_model.py": 90, "tests/e2e/test_multihost.py": 66,
    "tests/e2e/test_launchers.py": 53, "tests/e2e/test_server.py": 110,
    "tests/e2e/test_bad_input.py": 51, "tests/parallel/test_precision_communication.py": 51,
    "tests/e2e/test_data_cli.py": 50, "tests/e2e/test_slurm.py": 49, "tests/parallel/test_core.py": 16,
}


def pytest_collection_modifyitems(session, config, items):
    """The slowest files first (a stable sort: within a file the order stays)."""
    items.sort(key=lambda item: -FILE_SECONDS.get(item.nodeid.split("::")[0], 0))


def free_port(span: int = 2) -> int:
    """A port whose next ``span - 1`` ports are free too, below the kernel's ephemeral range: a port the kernel
    handed out as free is in that range, and another test's outgoing connection could take it (or the port after
    it) before the server binds it (a Slurm daemon found its port taken that way, under `pytest -n 2`)."""
    try:
        low_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low_ephemeral = 32768
    rng = random.Random()  # seeded from the OS: each xdist worker draws its own ports
    for _ in range(200):
        port = rng.randrange(20000, max(20001, low_ephemeral - span))
        if all(_free(port + i) for i in range(span)):
            return port
    raise RuntimeError("no free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def read_env(path: Path) -> dict[str, str]:
    """``export K=V`` lines as a dict."""
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("export ") and "=" in line:
            key, value = line[len("export "):].split("=", 1)
            out[key] = value
    return out


def shared_once(tmp_path_factory, name: str, build) -> Path:
    """A folder ``build(folder)`` fills once per test session, whichever pytest worker asks first; a worker that
    asks while another builds waits for it (a file lock), then reuses what it built."""
    import fcntl
    import shutil

    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # the folder the workers share
    folder = root / f"shared-{name}"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
            folder.mkdir()
            build(folder)
            (folder / ".built").write_text("")
    return folder


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The README's main job (digits-cnn, 60 epochs at 2 ranks, Gloo), each rank under strace to see what it writes:
    ``(output folder, strace folder, horovodrun's stdout)``. The train CLI's tests check the run; compression's use
    its model (trained once for both)."""
    from tests.helpers import BIN, horovodrun

    def build(base):
        out, traces = base / "run", base / "traces"
        traces.mkdir()
        calls = "openat,open,creat,mkdir,mkdirat,rename,renameat,renameat2,unlink,unlinkat,rmdir"
        # --seccomp-bpf: the kernel stops a rank only at the traced calls, not at every system call (the run took
        # 60 s under strace without it, 44 s with it, 38 s without strace; measured alone)
        wrapped = (f"exec strace --seccomp-bpf -f -qq -e trace={calls} -o {traces}/rank$HOROVOD_RANK.txt "
                   f"{BIN}/hvdtrain train --recipe digits-cnn --output {out}")
        proc = horovodrun(["sh", "-c", wrapped], extra=["--gloo"], timeout=600)
        (base / "stdout.txt").write_text(proc.stdout)

    base = shared_once(tmp_path_factory, "demo-run", build)
    return base / "run", base / "traces", (base / "stdout.txt").read_text()


LLAMA_CONTEXT = 32  # the window of llama_run, in tokens


@pytest.fixture(scope="session")
def llama_run(tmp_path_factory):
    """A small llama (2 blocks, width 64, 4 query and 2 key-value heads, context 32 tokens) and its BPE of 512
    tokens, trained 8 epochs on 60 KB of the embedded corpus (23 steps of under a second each): the language model
    of the serving tests (tests/e2e/test_serving.py, test_server.py), made once per session."""
    from hvdtrain.data import text
    from tests.helpers import BIN, run

    def build(base):
        (base / "corpus.txt").write_bytes(text.embedded_corpus()[:60_000])
        run([str(BIN / "hvdtrain"), "train", "--recipe", "llama-tiny", "--set", f"data.path={base / 'corpus.txt'}",
             "--set", "model.params={num_layers: 2, width: 64, num_heads: 4, kv_heads: 2}", "--set",
             f"data.context_length={LLAMA_CONTEXT}", "--set", "data.vocab_size=512", "--set",
             "data.batch_size_per_rank=32", "--set", "train.epochs=8", "--output", str(base / "run")], timeout=600)

    return shared_once(tmp_path_factory, "llama-run", build) / "run"


@pytest.fixture(scope="session")
def llama_draft(llama_run, tmp_path_factory):
    """The family's default llama student distilled from llama_run at 2 ranks (`hvdtrain compress --method
    distill`), one seed against the same student without the teacher: a draft for speculative decoding, not an
    accuracy claim (that one is digits-cnn's, tests/e2e/test_compression.py). ``(folder, the command's stdout)``."""
    from tests.helpers import BIN, horovodrun

    def build(base):
        proc = horovodrun([BIN / "hvdtrain", "compress", "--model", llama_run, "--method", "distill", "--set",
                           "compression.latency_rounds=1", "--set", "compression.latency_calls=3", "--set",
                           "compression.distill_epochs=5", "--set", "compression.baseline_seeds=1", "--output",
                           base / "distill"], extra=["--gloo"], timeout=900)
        (base / "stdout.txt").write_text(proc.stdout + proc.stderr)

    base = shared_once(tmp_path_factory, "llama-draft", build)
    return base / "distill", (base / "stdout.txt").read_text()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server on 127.0.0.1 (Ceph's radosgw on a one-OSD, memory-backed cluster) and its environment."""
    script = ROOT / "scripts" / "s3_server.sh"
    failures = []
    for _ in range(2):  # a second start in a fresh directory on other ports (one in CI failed at its monitor once)
        state = tmp_path_factory.mktemp("ceph")
        proc = subprocess.run([str(script), "start", str(state), str(free_port())], capture_output=True, text=True,
                              timeout=180)
        if proc.returncode == 0:
            break
        subprocess.run([str(script), "stop", str(state)], capture_output=True, timeout=60)
        failures.append(proc.stderr[-3000:])
    else:
        pytest.fail("the S3 server did not start:\n" + "\n--- again:\n".join(failures))
    environment = read_env(state / "env")
    try:
        yield {"env": environment, "state": state}
    finally:
        subprocess.run([str(script), "stop", str(state)], capture_output=True, timeout=60)


@pytest.fixture
def bucket(s3_server, request):
    """A fresh bucket for one test, named after it."""
    import re

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") or "bucket"
    subprocess.run([str(ROOT / "scripts" / "s3_server.sh"), "bucket", str(s3_server["state"]), name],
                   check=True, capture_output=True, timeout=60,
                   env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable})
    return f"s3://{name}"
