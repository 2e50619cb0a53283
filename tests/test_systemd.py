"""The systemd unit under a real systemd: a Debian 12 rootfs (debootstrap, cached between runs)
with systemd as PID 1 in a container, berth installed offline from wheels built here by the
README's own install script (systemd/install.sh), the test engine's socket bind-mounted for
berthd. Shown with systemctl and journalctl: start is active only after READY, reload with a
good and a bad file, restart keeps replicas, the watchdog kills and restarts a berthd that stops
answering, exit code 2 is not restarted, logs reach the journal, and the unit's hardening leaves
berthd able to do all of that. The transcript goes to BERTH_SYSTEMD_TRANSCRIPT when it is set."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from helpers import ROOT, SESSION, TEST_LABEL

CACHE = Path(os.environ.get("BERTH_TEST_CACHE", "/var/cache/berth-tests"))
ROOTFS_TAR = CACHE / "debian-bookworm-systemd.tar"
IMAGE = "berth-test/debian-systemd:bookworm"
PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv"
ENGINE_STANDIN = """[Unit]
Description=Docker engine (outside this container; its socket is bind-mounted)
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/bin/test -S /run/docker.sock
"""


def build_rootfs() -> None:
    """debootstrap a minimal Debian 12 with systemd and Python, kept as a tar in CACHE."""
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not Path(debootstrap).exists():
        pytest.fail("debootstrap (Debian) is needed: scripts/test installs it", pytrace=False)
    CACHE.mkdir(parents=True, exist_ok=True)
    work = CACHE / f"rootfs-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    subprocess.run([debootstrap, "--variant=minbase", f"--include={PACKAGES}", "bookworm",
                    str(work), "http://deb.debian.org/debian"], check=True, timeout=600,
                   capture_output=True)
    partial = ROOTFS_TAR.with_suffix(".partial")
    subprocess.run(["tar", "-C", str(work), "-cf", str(partial), "."], check=True, timeout=300)
    partial.rename(ROOTFS_TAR)  # whole or absent: an interrupted build leaves no bad cache
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def systemd_image(docker_client: docker.DockerClient) -> str:
    try:
        docker_client.images.get(IMAGE)
        return IMAGE
    except docker.errors.ImageNotFound:
        pass
    if not ROOTFS_TAR.exists():
        build_rootfs()
    repository, tag = IMAGE.split(":")
    docker_client.api.import_image_from_file(str(ROOTFS_TAR), repository=repository, tag=tag,
                                             changes=['CMD ["/sbin/init"]'])
    return IMAGE


@pytest.fixture(scope="session")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """berth and every dependency as wheels, so the rootfs installs offline."""
    out = tmp_path_factory.mktemp("wheels")
    shutil.rmtree(ROOT / "build", ignore_errors=True)  # setuptools would ship stale modules
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                    str(ROOT), "-w", str(out)], check=True, timeout=600, capture_output=True)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Box:
    """The systemd container; `sh` runs a command in it and keeps the transcript."""

    def __init__(self, container: docker.models.containers.Container) -> None:
        self.container = container
        self.transcript: list[str] = []

    def sh(self, command: str, check: bool = True, quiet: bool = False) -> tuple[int, str]:
        """Run `command`; the transcript keeps it unless `quiet` (polls, secrets)."""
        code, out = self.container.exec_run(["sh", "-c", command])
        text = out.decode(errors="replace").rstrip()
        if not quiet:
            self.transcript.append(f"# {command}\n{text}\n(exit {code})\n")
        assert code == 0 or not check, f"{command!r} exited {code}: {text}"
        return code, text

    def show(self, prop: str, quiet: bool = False) -> str:
        return self.sh(f"systemctl show -p {prop} --value berthd", quiet=quiet)[1]


@pytest.fixture
def box(docker_client, docker_host, systemd_image, wheels, tmp_path) -> Iterator[Box]:
    engine_socket = docker_host.removeprefix("unix://")
    container = docker_client.containers.run(
        systemd_image, detach=True, name=f"berth-systemd-{SESSION}-{tmp_path.name[-8:]}",
        labels={TEST_LABEL: SESSION}, cap_add=["SYS_ADMIN"],
        security_opt=["seccomp=unconfined"], cgroupns="host", network_mode="host",
        tmpfs={"/run": "", "/run/lock": ""},
        volumes={"/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"},
                 engine_socket: {"bind": "/run/docker.sock", "mode": "rw"},
                 str(wheels): {"bind": "/wheels", "mode": "ro"},
                 str(ROOT): {"bind": "/src", "mode": "ro"}})
    b = Box(container)
    try:
        for _ in range(100):
            _, state = container.exec_run(["systemctl", "is-system-running"])
            if state.strip() in (b"running", b"degraded"):
                break
            time.sleep(0.1)
        yield b
    finally:
        (tmp_path / "transcript.txt").write_text("\n".join(b.transcript))
        if os.environ.get("BERTH_SYSTEMD_TRANSCRIPT"):
            shutil.copy(tmp_path / "transcript.txt", os.environ["BERTH_SYSTEMD_TRANSCRIPT"])
        container.remove(force=True)


def config(port: int, network: str, image: str, extra: str = "") -> str:
    return f"""
[daemon]
listen = "127.0.0.1:{port}"
admin_token_file = "/etc/berth/admin-token"
reconcile_interval_s = 0.5
[docker]
network = "{network}"
stop_timeout_s = 1.0
[gpu]
source = "static"
[[gpu.devices]]
name = "Test GPU"
memory_mib = 1024
[endpoints.echo]
image = "{image}"
min_replicas = 1
readiness = {{ path = "/health", period_s = 0.2 }}
labels = {{ "{TEST_LABEL}" = "{SESSION}" }}
{extra}"""


def api(port: int, token: str, path: str) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def ready_container(port: int, token: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            view = api(port, token, "/v1/endpoints/echo")
        except OSError:
            view = {"replicas": []}
        ready = [r["container_id"] for r in view["replicas"] if r["state"] == "ready"]
        if ready:
            return str(ready[0])
        time.sleep(0.1)
    raise AssertionError(f"no ready replica of echo; last view {view}")


def eventually(check, what: str, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """A reload is a signal: its effect follows the signal, not the systemctl call."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.1)


def names(port: int, token: str) -> list[str]:
    return [e["name"] for e in api(port, token, "/v1/endpoints")["endpoints"]]


def write(box: Box, path: str, text: str) -> None:
    code, out = box.container.exec_run(["python3", "-c", "import os, sys; os.makedirs("
                                        "os.path.dirname(sys.argv[1]), exist_ok=True); "
                                        "open(sys.argv[1], 'w').write(sys.argv[2])", path, text])
    assert code == 0, out


def test_the_unit_under_a_real_systemd(box, network, model_image):
    port = free_port()
    good = config(port, network, model_image)
    write(box, "/etc/systemd/system/docker.service", ENGINE_STANDIN)
    write(box, "/etc/berth/config.toml", good)
    # The README's install steps, offline from wheels. `enable --now` of a Type=notify unit
    # returns once berthd sent READY=1, so the API answers at once, without retrying.
    box.sh("sh /src/systemd/install.sh --no-index --find-links /wheels berth")
    assert box.sh("systemctl is-active berthd")[1] == "active"
    assert box.show("StatusText") == f"serving on port {port}"
    token = box.sh("cat /etc/berth/admin-token", quiet=True)[1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
        assert resp.status == 200
    first = ready_container(port, token)

    # Reload: a good file applies, a bad one is refused and berthd goes on serving.
    write(box, "/etc/berth/config.toml", good + '[endpoints.two]\nimage = "x"\nmin_replicas = 0\n')
    box.sh("systemctl reload berthd")
    eventually(lambda: "two" in names(port, token), "endpoint two after a good reload")
    write(box, "/etc/berth/config.toml", good + "[endpoints.Bad]\nimage = 1\n")
    box.sh("systemctl reload berthd")
    eventually(lambda: api(port, token, "/v1/events")["events"][-1]["kind"] ==
               "reload_refused", "the bad reload refused")
    assert box.sh("systemctl is-active berthd")[1] == "active"
    assert "endpoints.Bad" in api(port, token, "/v1/events")["events"][-1]["message"]
    assert names(port, token) == ["echo", "two"]
    write(box, "/etc/berth/config.toml", good)
    box.sh("systemctl reload berthd")
    eventually(lambda: names(port, token) == ["echo"], "endpoint two gone")

    # Restart keeps the replicas: the same container is adopted.
    pid = box.show("MainPID")
    box.sh("systemctl restart berthd")
    assert box.show("MainPID") != pid
    assert ready_container(port, token) == first

    # The watchdog: a berthd that stops answering is killed and restarted (a drop-in makes
    # WatchdogSec=30s short for the test; the mechanism is the unit's own).
    write(box, "/etc/systemd/system/berthd.service.d/test-watchdog.conf",
          "[Service]\nWatchdogSec=2s\nTimeoutAbortSec=2s\n")
    box.sh("systemctl daemon-reload && systemctl restart berthd")
    pid, restarts = box.show("MainPID"), int(box.show("NRestarts"))
    box.sh(f"kill -STOP {pid}")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if box.show("MainPID", quiet=True) not in (pid, "0") and \
                box.sh("systemctl is-active berthd", check=False, quiet=True)[1] == "active":
            break
        time.sleep(0.2)
    assert int(box.show("NRestarts")) == restarts + 1
    journal = box.sh("journalctl -u berthd --no-pager -o cat", quiet=True)[1]
    box.sh("journalctl -u berthd --no-pager | grep -E 'Watchdog|ABRT|watchdog|Scheduled'")
    assert "Watchdog timeout" in journal and "Failed with result 'watchdog'" in journal
    assert ready_container(port, token) == first  # the model never stopped

    # Exit code 2 (bad config) is not restarted: the unit ends failed, status 2.
    write(box, "/etc/berth/config.toml", good + "[endpoints.Bad]\nimage = 1\n")
    code, _ = box.sh("systemctl restart berthd", check=False)  # resets NRestarts to 0
    assert code != 0
    time.sleep(2.5)  # longer than RestartSec=2s: a restart, if any, would have begun
    assert box.sh("systemctl is-active berthd", check=False)[1] == "failed"
    assert box.show("ExecMainStatus") == "2" and box.show("NRestarts") == "0"
    assert "endpoints.Bad.name" in box.sh("journalctl -u berthd --no-pager -o cat -n 20")[1]

    # Logs in the journal, as JSON lines; and what systemd thinks of the hardening.
    lines = box.sh("journalctl -u berthd --no-pager -o cat | grep '^{' | tail -200",
                   quiet=True)[1]
    box.sh("journalctl -u berthd --no-pager -o cat | grep '^{' | grep berthd.ready | tail -2")
    assert any(json.loads(line).get("event") == "berthd.ready" for line in lines.splitlines())
    box.sh("systemctl status berthd --no-pager -n 4", check=False)
    box.sh("systemd-analyze security berthd --no-pager | tail -1", check=False)
