"""Two "hosts" on one machine for tests: Linux network namespaces joined by a bridge, each with its own address,
hostname and sshd. Nothing global changes: the bridge lives in a third namespace, /etc/hosts is bind-mounted in a
private mount namespace per host, ssh keys and known_hosts live in a temporary HOME; everything is removed after.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

HOSTS = {"hostA": "10.77.0.11", "hostB": "10.77.0.12"}
PREFIX = "hvdt"
SSH_PORT = 2222


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check)


def available() -> str | None:
    """None when the namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, sshd)"
    for tool in ("ip", "unshare", "/usr/sbin/sshd", "ssh-keygen"):
        if not shutil.which(tool):
            return f"{tool} is not installed (scripts/setup.sh installs iproute2 and openssh-server)"
    probe = f"{PREFIX}probe{os.getpid()}"  # one per process: pytest -n 2 collects this module in both workers at once
    made = sh("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create network namespaces here ({made.stderr.strip()})"
    sh("ip", "netns", "del", probe, check=False)
    return None


class TwoHosts:
    """hostA and hostB with sshd on port 2222; ``run_on(host, cmd)`` runs a command inside a host."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.home = workdir / "home"
        self.key = self.home / ".ssh" / "id_ed25519"
        self.hosts_file = workdir / "hosts"
        self.sshd: list[subprocess.Popen] = []
        self.ssh_dir = Path(os.path.expanduser("~root")) / ".ssh"
        self.made_ssh_dir = False

    def ns(self, host: str) -> str:
        return f"{PREFIX}{host[-1]}"

    def prefix(self, host: str) -> list[str]:
        """Command prefix that enters ``host``: its network, hostname and /etc/hosts."""
        # ssh reads ~/.ssh of the passwd entry, not $HOME: bind our temporary one over /root/.ssh too.
        inner = (f"hostname {host} && mount --bind {self.hosts_file} /etc/hosts && "
                 f"mount --bind {self.home}/.ssh {self.ssh_dir} && exec \"$@\"")
        return ["ip", "netns", "exec", self.ns(host), "unshare", "--uts", "--mount", "sh", "-c", inner, "sh"]

    def start(self) -> None:
        sw = f"{PREFIX}S"
        sh("ip", "netns", "add", sw)
        sh("ip", "netns", "exec", sw, "ip", "link", "add", "br0", "type", "bridge")
        sh("ip", "netns", "exec", sw, "ip", "link", "set", "br0", "up")
        for host, addr in HOSTS.items():
            ns = self.ns(host)
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", f"{ns}v", "type", "veth", "peer", "name", f"{ns}p")
            sh("ip", "link", "set", f"{ns}v", "netns", ns)
            sh("ip", "link", "set", f"{ns}p", "netns", sw)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", f"{ns}v", "name", "eth0")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            sh("ip", "netns", "exec", sw, "ip", "link", "set", f"{ns}p", "master", "br0")
            sh("ip", "netns", "exec", sw, "ip", "link", "set", f"{ns}p", "up")
        lines = ["127.0.0.1 localhost", *(f"{addr} {host}" for host, addr in HOSTS.items())]
        self.hosts_file.write_text("\n".join(lines) + "\n")
        (self.home / ".ssh").mkdir(parents=True)
        if not self.ssh_dir.exists():  # a mount point is needed; removed again in stop()
            self.ssh_dir.mkdir(mode=0o700)
            self.made_ssh_dir = True
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key))
        shutil.copy(f"{self.key}.pub", self.home / ".ssh" / "authorized_keys")
        (self.home / ".ssh" / "config").write_text(
            f"Host *\n  Port {SSH_PORT}\n  StrictHostKeyChecking no\n  UserKnownHostsFile {self.home}/.ssh/known\n"
            f"  IdentityFile {self.key}\n  LogLevel ERROR\n")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory (Debian's standard path)
        for host in HOSTS:
            hostkey = self.dir / f"hostkey-{host}"
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey))
            cfg = self.dir / f"sshd-{host}.conf"
            cfg.write_text(
                f"Port {SSH_PORT}\nHostKey {hostkey}\nPidFile {self.dir}/sshd-{host}.pid\nUsePAM no\n"
                f"PermitRootLogin prohibit-password\nPasswordAuthentication no\nStrictModes no\n"
                f"AuthorizedKeysFile {self.home}/.ssh/authorized_keys\nPermitUserEnvironment no\n"
                "AcceptEnv *\n")
            self.sshd.append(subprocess.Popen([*self.prefix(host), "/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + 20
        for host in HOSTS:
            while self.run_on("hostA", ["ssh", host, "hostname"],
                              check=False).stdout.strip() != host:
                if time.time() > deadline:
                    raise RuntimeError(f"sshd on {host} did not come up")
                time.sleep(0.3)

    def env(self, base: dict[str, str]) -> dict[str, str]:
        e = dict(base)
        e["HOME"] = str(self.home)  # ssh keys, known hosts and Horovod's ~/.horovod cache stay here
        return e

    def run_on(self, host: str, cmd: list[str], env: dict[str, str] | None = None, timeout: float = 60,
               check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix(host), *cmd], capture_output=True, text=True, timeout=timeout,
                              env=self.env(env or dict(os.environ)), check=check)

    def stop(self) -> None:
        for proc in self.sshd:
            proc.terminate()
        for proc in self.sshd:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for ns in (f"{PREFIX}A", f"{PREFIX}B", f"{PREFIX}S"):
            sh("ip", "netns", "del", ns, check=False)
        if self.made_ssh_dir:
            try:
                self.ssh_dir.rmdir()
            except OSError:
                pass
