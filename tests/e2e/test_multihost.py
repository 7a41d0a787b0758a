"""A real multi-host run: two hosts in Linux network namespaces with their own addresses, hostnames and sshd,
reached by horovodrun over ssh, with Gloo and then with MPI. The closest stand-in for a cluster on one machine;
see tests/multihost.py for what it sets up (and removes)."""
import json

import numpy as np
import pytest

from tests.helpers import BIN, ROOT, env
from tests.multihost import TwoHosts, available

pytestmark = [pytest.mark.e2e, pytest.mark.parallel]
reason = available()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    if reason:
        pytest.skip(f"multi-host test skipped: {reason}")
    h = TwoHosts(tmp_path_factory.mktemp("hosts"))
    try:
        h.start()
        yield h
    finally:
        h.stop()


def launch(hosts, controller, *command, timeout=600):
    """horovodrun started inside hostA, as a user logged in there would."""
    cmd = [str(BIN / "horovodrun"), "-np", "2", "-H", "hostA:1,hostB:1", "-p", "2222", "--ssh-identity-file",
           str(hosts.key), "--network-interface", "eth0", f"--{controller}", *map(str, command)]
    proc = hosts.run_on("hostA", cmd, env=env(), timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_two_hosts_train_to_identical_weights(hosts, tmp_path, controller):
    launch(hosts, controller, BIN / "python", ROOT / "tests" / "parallel" / "workers" / "train_identical.py", tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert (r0["host"], r1["host"]) == ("hostA", "hostB")  # one rank on each host
    assert r0["controller"] == r1["controller"] == controller
    assert r0["first_labels"] != r1["first_labels"]
    np.testing.assert_array_equal(r0["final"], r1["final"])


def test_hvdtrain_train_across_two_hosts(hosts, tmp_path):
    out = tmp_path / "run"
    launch(hosts, "gloo", BIN / "hvdtrain", "train", "--recipe", "digits-mlp", "--set", "train.epochs=2",
           "--output", out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["test_accuracy"] > 0.5
