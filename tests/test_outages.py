"""Outages under a real berthd process: the Docker engine stopped and started again, and the
state disk filling up and freed, while a replica holds the box's only GPU."""

from __future__ import annotations

import errno
import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

from helpers import SESSION, TEST_LABEL, Berthd, containers

CONFIG = """
[daemon]
listen = "127.0.0.1:0"
state_dir = "{state}"
log_format = "json"
shutdown_grace_s = 1.0
reconcile_interval_s = 0.2
min_free_disk = 0
[docker]
host = "{host}"
network = "{network}"
stop_timeout_s = 1.0
subnet_pool = "10.214.0.0/16"
[gpu]
source = "static"
[[gpu.devices]]
name = "Test GPU"
memory_mib = 1024
[endpoints.one]
image = "{image}"
gpus = 1
min_replicas = 1
startup_timeout_s = 20.0
readiness = {{ path = "/health", period_s = 0.1, timeout_s = 0.5 }}
liveness = {{ period_s = 0.2, timeout_s = 0.5, failure_threshold = 2 }}
labels = {{ "{label}" = "{session}" }}
"""


def call(d: Berthd, path: str, timeout: float = 10.0) -> tuple[int, dict, float]:
    """(status, JSON body, seconds taken) of a GET."""
    started = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{d.port}{path}", timeout=timeout) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as err:
        status, body = err.code, err.read()
    return status, json.loads(body), time.monotonic() - started


class Timeline:
    """What the endpoint looked like, second by second, for the record (printed with -s)."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.rows: list[str] = []

    def note(self, what: str) -> None:
        self.rows.append(f"{time.monotonic() - self.start:6.2f}s  {what}")
        print(self.rows[-1])


def replicas_of(d: Berthd) -> list[tuple[str, str, list[str]]]:
    _, body, _ = call(d, "/v1/endpoints/one")
    return [(r["id"], r["state"], [g["uuid"] for g in r["gpus"]]) for r in body["replicas"]]


def wait_until(d: Berthd, check, what: str, timeline: Timeline, timeout: float = 60.0):
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        seen = replicas_of(d)
        if seen != last:
            timeline.note(f"replicas {seen}")
            last = seen
        if check(seen):
            return seen
        time.sleep(0.05)
    raise AssertionError(f"never {what}; last replicas {last}; timeline:\n"
                         + "\n".join(timeline.rows))


def start_berthd(tmp_path: Path, host: str, network: str, image: str) -> Berthd:
    config = tmp_path / "config.toml"
    config.write_text(CONFIG.format(state=tmp_path / "state", host=host, network=network,
                                    image=image, label=TEST_LABEL, session=SESSION))
    d = Berthd(tmp_path, config)
    d.wait_message("READY=1")
    return d


def test_docker_stopped_and_started_under_a_running_berthd(tmp_path, private_engine, network,
                                                           model_image):
    d = start_berthd(tmp_path, private_engine.host, network, model_image)
    timeline = Timeline()
    try:
        [(first, _, gpus)] = wait_until(d, lambda rs: [s for _, s, _ in rs] == ["ready"],
                                        "ready", timeline)
        assert gpus == ["static-0"]
        assert call(d, "/invoke/one/echo")[0] == 200
        timeline.note("dockerd stopping (SIGTERM)")
        private_engine.stop()
        timeline.note("dockerd stopped")
        wait_until(d, lambda rs: rs and rs[0][1] == "failed", "failed", timeline)
        status, health, _ = call(d, "/healthz")
        assert status == 503 and "unreachable" in health["docker"]
        timeline.note(f"/healthz {status} {health}")
        status, body, took = call(d, "/invoke/one/echo")
        timeline.note(f"/invoke {status} in {took:.2f}s: {body['error']['message']}")
        assert status == 503 and took < 2.0  # before: calls hung until the client gave up
        assert body["error"]["code"] == "docker_unavailable"
        # The failed replica keeps its GPU while its container may still exist.
        _, listing, _ = call(d, "/v1/gpus")
        assert listing["gpus"][0]["replica"] == first
        time.sleep(1.0)  # several passes while the engine is down
        timeline.note("dockerd starting")
        private_engine.start()
        timeline.note("dockerd answers")
        [(second, _, gpus)] = wait_until(
            d, lambda rs: [s for _, s, _ in rs] == ["ready"] and rs[0][0] != first,
            "a new replica ready", timeline)
        assert gpus == ["static-0"]
        assert call(d, "/healthz")[0] == 200
        assert call(d, "/invoke/one/echo")[0] == 200
        _, listing, _ = call(d, "/v1/gpus")
        assert listing["gpus"][0]["replica"] == second
        timeline.note(f"/invoke 200 on {second}; GPU held by it")
        log = (tmp_path / "berthd.log").read_text()
        said = [e["message"] for e in map(json.loads, log.splitlines())
                if e["event"] == "docker.unreachable"]
        assert len(said) == 1, said  # once per outage, not every second
        client = private_engine.client()
        left = containers(client, label=f"berth.replica={first}")
        client.close()
        assert left == []  # the dead container was removed once the engine came back
    finally:
        if private_engine.proc is None:
            private_engine.start()
        d.close()


def test_full_disk_during_a_state_change_is_retried(tmp_path, private_engine, network,
                                                    model_image, small_disk):
    state = small_disk("4m")
    (tmp_path / "state").symlink_to(state)
    d = start_berthd(tmp_path, private_engine.host, network, model_image)
    timeline = Timeline()
    try:
        [(first, _, _)] = wait_until(d, lambda rs: [s for _, s, _ in rs] == ["ready"],
                                     "ready", timeline)
        filler = fill(state / "filler")
        timeline.note(f"disk full: {shutil.disk_usage(state).free} bytes free")
        client = private_engine.client()
        client.containers.get(f"berth-{first}").kill()  # a crash needs state changes
        client.close()
        time.sleep(1.5)  # the failure and the replacement cannot be stored meanwhile
        timeline.note(f"while full: replicas {replicas_of(d)}")
        filler.unlink()
        timeline.note("disk freed")
        # Before: the replica stayed `starting` (or failed holding the GPU) forever.
        [(second, _, gpus)] = wait_until(
            d, lambda rs: [s for _, s, _ in rs] == ["ready"] and rs[0][0] != first,
            "replaced after the disk was freed", timeline)
        assert gpus == ["static-0"]
        assert call(d, "/invoke/one/echo")[0] == 200
        d.signal(15)
        assert d.wait_exit() == 0
        d2 = Berthd(tmp_path, tmp_path / "config.toml")
        d2.wait_message("READY=1")
        try:  # SQLite agrees with what memory said: the restart adopts that same replica
            assert [r for r, s, _ in wait_until(d2, lambda rs: bool(rs), "listed",
                                                timeline)] == [second]
        finally:
            d2.close()
    finally:
        d.close()


def fill(path: Path) -> Path:
    """Write to `path` until the disk has not one byte left (big writes, then smaller)."""
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 20, 65536, 4096, 512, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return path
