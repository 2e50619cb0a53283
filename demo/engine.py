"""Find a reachable Docker engine, or start a private dockerd (Debian's docker.io) for one.

Used by the test session and the demo. A private engine keeps its socket, data and exec roots
under one directory and runs with --iptables=false, which this kind of machine needs.

    python demo/engine.py start DIR     # prints the DOCKER_HOST to use; leaves dockerd running
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import docker
import docker.errors

DEFAULT_SOCKET = "unix:///var/run/docker.sock"


def reachable(host: str) -> bool:
    try:
        client = docker.DockerClient(base_url=host, version="auto", timeout=5)
    except docker.errors.DockerException:
        return False
    try:
        return bool(client.ping())
    except (docker.errors.DockerException, OSError):
        return False
    finally:
        client.close()


def existing_engine() -> str | None:
    """DOCKER_HOST if it answers, else the default socket if it answers, else None."""
    for host in (os.environ.get("DOCKER_HOST"), DEFAULT_SOCKET):
        if host and reachable(host):
            return host
    return None


def start_dockerd(base: Path, timeout_s: float = 60.0,
                  extra: tuple[str, ...] = ("--iptables=false", "--ip6tables=false")
                  ) -> tuple[str, subprocess.Popen[bytes]]:
    """Start dockerd with everything under `base`; its DOCKER_HOST and process once it answers.

    `extra` flags replace the default --iptables=false (a second engine beside the first
    runs with iptables, no default bridge and an address pool of its own)."""
    binary = shutil.which("dockerd") or shutil.which("dockerd", path="/usr/sbin:/usr/bin")
    if binary is None:
        raise RuntimeError("no Docker engine is reachable and dockerd is not installed "
                           "(apt-get install docker.io)")
    base.mkdir(parents=True, exist_ok=True)
    host = f"unix://{base}/docker.sock"
    log = open(base / "dockerd.log", "ab")  # noqa: SIM115 - lives as long as dockerd
    proc = subprocess.Popen(
        [binary, *extra, "--storage-driver=overlay2",
         f"--data-root={base}/data", f"--exec-root={base}/exec", f"--host={host}",
         f"--pidfile={base}/dockerd.pid"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dockerd exited with {proc.returncode}; see {base}/dockerd.log")
        if reachable(host):
            return host, proc
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"dockerd did not answer within {timeout_s:g}s; see {base}/dockerd.log")


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] != "start":
        print(__doc__, file=sys.stderr)
        return 2
    host = existing_engine()
    if host is None:
        host, _ = start_dockerd(Path(sys.argv[2]).resolve())
    print(host)
    return 0


if __name__ == "__main__":
    sys.exit(main())
