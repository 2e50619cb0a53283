"""A real berthd process: sd_notify over a real datagram socket, signals, restarts, errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from berth.daemon.core import cdi_refusal
from helpers import ROOT, Berthd, config_text, containers, one_ready, ready_ids


@pytest.fixture
def daemon(tmp_path, network, model_image, docker_host):
    started: list[Berthd] = []

    def start(config: Path, *args: str, env: dict[str, str] | None = None) -> Berthd:
        d = Berthd(tmp_path, config, args, env)
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()


@pytest.fixture
def write_config(tmp_path, network, model_image):
    path = tmp_path / "config.toml"

    def write(endpoints: dict[str, dict], extra: str = "") -> Path:
        path.write_text(config_text(tmp_path / "state", network, model_image, endpoints, extra))
        return path

    return write


def test_ready_notify_and_the_read_only_api(daemon, write_config):
    d = daemon(write_config({"echo": {"gpus": 1}}))
    d.wait_message("READY=1")
    assert d.get("/healthz") == (200, {"status": "ok", "endpoints": 1})
    body = d.wait_endpoint("echo", one_ready)
    replica = body["replicas"][0]
    assert replica["gpus"] == [{"index": 0, "uuid": "static-0", "name": "Test GPU"}]
    assert body["status"] == "ready" and body["source"] == "config"
    status, listing = d.get("/v1/endpoints")
    assert status == 200 and [e["name"] for e in listing["endpoints"]] == ["echo"]
    status, gpus = d.get("/v1/gpus")
    held = {g["index"]: (g["replica"], g["endpoint"]) for g in gpus["gpus"]}
    assert held == {0: (replica["id"], "echo"), 1: (None, None)}
    assert d.get("/v1/endpoints/nope") == (
        404, {"error": {"code": "endpoint_not_found", "message": "no endpoint named 'nope'"}})
    status, body = d.get("/no/such/route")
    assert status == 404 and body["error"]["code"] == "not_found"
    # The CLI reads the same API.
    url = f"http://127.0.0.1:{d.port}"
    out = cli(url, "endpoints", "ls")
    assert out.returncode == 0 and out.stdout.splitlines()[1].split()[:4] == \
        ["echo", "ready", "1", "1"]
    out = cli(url, "gpus")
    assert replica["id"] in out.stdout.splitlines()[1]
    out = cli(url, "--json", "endpoints", "get", "echo")
    assert json.loads(out.stdout)["replicas"][0]["id"] == replica["id"]
    out = cli(url, "endpoints", "get", "nope")
    assert out.returncode == 1
    assert out.stderr.strip() == "error: endpoint_not_found: no endpoint named 'nope'"


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "berth.daemon.cli", "--url", url, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)


def test_sighup_reloads_only_what_changed_and_refuses_a_bad_file(
        daemon, write_config, docker_client):
    config = write_config({"same": {}, "changed": {}, "removed": {}})
    d = daemon(config)
    d.wait_message("READY=1")
    before = {n: ready_ids(d.wait_endpoint(n, one_ready))[0]
              for n in ("same", "changed", "removed")}

    write_config({"same": {}, "changed": {"version": "2"}, "added": {}})
    d.signal(signal.SIGHUP)
    d.wait_message("RELOADING=1")
    d.wait_message("READY=1")
    changed = d.wait_endpoint(
        "changed", lambda b: one_ready(b) and b["replicas"][0]["generation"] == 2)
    assert ready_ids(changed)[0] != before["changed"]
    d.wait_endpoint("added", one_ready)
    assert ready_ids(d.endpoint("same")) == [before["same"]]  # untouched
    deadline = time.monotonic() + 20
    while d.get("/v1/endpoints/removed")[0] != 404 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.get("/v1/endpoints/removed")[0] == 404
    for cid in (before["changed"], before["removed"]):
        assert not containers(docker_client, id=cid)

    # A file that does not validate: refused, logged, and everything keeps running.
    config.write_text(config.read_text().replace("min_replicas = 1", "min_replicas = -1", 1))
    d.signal(signal.SIGHUP)
    d.wait_message("READY=1")
    assert d.proc.poll() is None
    assert ready_ids(d.endpoint("same")) == [before["same"]]
    assert ready_ids(d.endpoint("changed")) == ready_ids(changed)
    log = (config.parent / "berthd.log").read_text()
    refused = [e for e in map(json.loads, log.splitlines())
               if e["event"] == "config.reload_refused"]
    assert refused and any("min_replicas" in e for e in refused[0]["errors"])
    # Every log line is JSON; replica events name their endpoint and replica.
    events = [json.loads(line) for line in log.splitlines()]
    ready = [e for e in events if e["event"] == "replica.ready"]  # stable event names
    assert {e["endpoint"] for e in ready} >= {"same", "changed", "removed", "added"}
    assert all(e["replica"].startswith(e["endpoint"] + "-") for e in ready)


def test_sigterm_leaves_replicas_running_and_restart_adopts_them(
        daemon, write_config, docker_client):
    config = write_config({"keep": {"gpus": 1}})
    d = daemon(config)
    d.wait_message("READY=1")
    cid = ready_ids(d.wait_endpoint("keep", one_ready))[0]
    d.signal(signal.SIGTERM)
    d.wait_message("STOPPING=1")
    assert d.wait_exit() == 0
    assert docker_client.containers.get(cid).status == "running"

    d2 = daemon(config)
    d2.wait_message("READY=1")
    body = d2.endpoint("keep")
    assert ready_ids(body) == [cid]  # same container: the model was not restarted
    assert body["replicas"][0]["gpus"][0]["uuid"] == "static-0"
    _, gpus = d2.get("/v1/gpus")
    assert gpus["gpus"][0]["replica"] == body["replicas"][0]["id"]


def test_stop_replicas_on_exit_stops_them(daemon, write_config, docker_client):
    d = daemon(write_config({"gone": {}}), "--stop-replicas-on-exit")
    d.wait_message("READY=1")
    cid = ready_ids(d.wait_endpoint("gone", one_ready))[0]
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert not containers(docker_client, id=cid)


def test_watchdog_pings_at_half_the_interval(daemon, write_config):
    d = daemon(write_config({}), env={"WATCHDOG_USEC": "200000"})
    d.wait_message("READY=1")
    start = time.monotonic()
    d.wait_message("WATCHDOG=1", timeout=2)
    d.wait_message("WATCHDOG=1", timeout=2)
    d.wait_message("WATCHDOG=1", timeout=2)
    assert time.monotonic() - start < 1.0  # about every 0.1 s


def test_admin_token_guards_the_control_api(daemon, write_config):
    d = daemon(write_config({}), env={"BERTH_ADMIN_TOKEN": "t0ken"})
    d.wait_message("READY=1")
    assert d.get("/healthz")[0] == 200
    status, body = d.get("/v1/endpoints")
    assert status == 401 and body["error"]["code"] == "unauthorized"
    assert d.get("/v1/endpoints", token="wrong")[0] == 401  # unknown token: 401, not 403
    assert d.get("/v1/endpoints", token="t0ken")[0] == 200
    assert d.get("/metrics")[0] == 401  # endpoint names and GPU holders are the admin's
    status, text = d.get_bytes("/metrics", token="t0ken")
    assert status == 200 and b"# TYPE berth_calls_total counter" in text


def run_berthd(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "berth.daemon.main", "--config", str(config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize(("case", "code", "message"), [
    ("state_dir_is_a_file", 3, "cannot be written"),
    ("database_is_not_sqlite", 3, "is not a usable SQLite database"),
    ("database_is_newer", 3, "newer than this berthd supports"),
    ("docker_unreachable", 4, "no Docker engine answers at unix:///nonexistent"),
    ("public_without_token", 2, "not loopback: set an admin token"),
    ("bad_config", 2, "endpoints.x.gpus: Input should be greater than or equal to 0"),
])
def test_startup_errors_are_clear_with_distinct_exit_codes(tmp_path, write_config, docker_host,
                                                          case, code, message):
    config = write_config({})
    state = tmp_path / "state"
    env: dict[str, str] = {}
    if case == "state_dir_is_a_file":
        state.write_text("x")
    elif case == "database_is_not_sqlite":
        state.mkdir()
        (state / "berth.db").write_bytes(b"garbage" * 1000)
    elif case == "database_is_newer":
        state.mkdir()
        sqlite3.connect(state / "berth.db").execute("PRAGMA user_version = 999").close()
    elif case == "docker_unreachable":
        config.write_text(config.read_text().replace(
            "[docker]", '[docker]\nhost = "unix:///nonexistent/docker.sock"'))
    elif case == "public_without_token":
        config.write_text(config.read_text().replace('"127.0.0.1:0"', '"0.0.0.0:0"'))
    else:
        config.write_text(config.read_text() + '[endpoints.x]\nimage = "i"\ngpus = -1\n')
    result = run_berthd(config, env)
    assert result.returncode == code, result.stdout + result.stderr
    assert message in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_systemd_unit_verifies(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here (apt-get install systemd)")
    text = (ROOT / "systemd" / "berthd.service").read_text()
    for key in ("Type=notify", "ExecReload=/bin/sh -c \"kill -HUP $MAINPID\"", "Restart=on-failure",
                "WatchdogSec=", "StateDirectory=berth", "Requires=docker.service",
                "--config /etc/berth/config.toml"):
        assert key in text
    assert "After=network-online.target docker.service" in text
    # Verify the unit as installed: berthd where the README installs it is this berthd.
    berthd = shutil.which("berthd") or pytest.fail("berthd is not installed (pip install .)")
    unit = tmp_path / "berthd.service"
    unit.write_text(text.replace("/opt/berth/bin/berthd", berthd))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "berthd.service" not in result.stderr, result.stderr


def test_sigterm_lets_a_call_in_flight_finish(daemon, write_config):
    d = daemon(write_config({"busy": {}}))
    d.wait_message("READY=1")
    d.wait_endpoint("busy", one_ready)
    result: dict = {}

    def call() -> None:
        url = f"http://127.0.0.1:{d.port}/invoke/busy/sleep?s=0.8"
        with urllib.request.urlopen(url, timeout=10) as resp:
            result["status"] = resp.status
            result["body"] = json.loads(resp.read())

    caller = threading.Thread(target=call)
    caller.start()
    # On the replica before the signal (a fixed sleep raced a busy machine: the call came
    # after the listener had closed, and was refused as it should be).
    d.wait_endpoint("busy", lambda e: e["in_flight"] == 1, timeout=5)
    d.signal(signal.SIGTERM)
    d.wait_message("STOPPING=1")
    caller.join(timeout=10)
    assert result == {"status": 200, "body": {"slept": 0.8, "active": 1}}
    assert d.wait_exit() == 0


def post(d: Berthd, path: str) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{d.port}{path}", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 202
        return json.loads(resp.read())


def task_states(d: Berthd) -> dict[str, dict]:
    _, body = d.get("/v1/tasks?limit=10000")
    return {t["id"]: t for t in body["tasks"]}


def test_sigkill_mid_backlog_loses_no_task(daemon, write_config):
    config = write_config({"work": {}}, extra="task_retry_backoff_s = 0.1")
    config.write_text(config.read_text().replace('min_replicas = 1',
                                                 'min_replicas = 1\nconcurrency = 2'))
    d = daemon(config)
    d.wait_message("READY=1")
    address = d.wait_endpoint("work", one_ready)["replicas"][0]["address"]
    ids = [post(d, "/async/work/sleep?s=0.2")["id"] for _ in range(30)]
    deadline = time.monotonic() + 30
    while sum(t["status"] == "succeeded" for t in task_states(d).values()) < 8:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    d.proc.send_signal(signal.SIGKILL)
    d.wait_exit()

    d2 = daemon(config)
    d2.wait_message("READY=1")
    deadline = time.monotonic() + 60
    while True:
        states = task_states(d2)
        if all(states[i]["status"] in ("succeeded", "failed", "cancelled") for i in ids):
            break
        assert time.monotonic() < deadline, states
        time.sleep(0.1)
    assert {states[i]["status"] for i in ids} == {"succeeded"}
    attempts = [states[i]["attempts"] for i in ids]
    with urllib.request.urlopen(f"http://{address}/stats", timeout=5) as resp:
        calls = json.loads(resp.read())["calls"]
    print(f"\nkill test: {len(ids)} tasks, {len(ids)} succeeded, "
          f"{sum(a > 1 for a in attempts)} ran twice (were running at the kill), "
          f"model saw {calls} calls for {len(ids)} tasks")
    assert max(attempts) <= 2
    # Same container (adopted) throughout. An attempt is counted when its task is marked
    # running, which can land just before the kill and before the call leaves berthd, so the
    # model sees at least one call per task and at most one per attempt.
    assert len(ids) <= calls <= sum(attempts)


def test_result_ttl_purge_runs_as_a_job(daemon, write_config):
    d = daemon(write_config({"p": {}}, extra="result_ttl_s = 0.3\npurge_interval_s = 0.2"))
    d.wait_message("READY=1")
    d.wait_endpoint("p", one_ready)
    task = post(d, "/async/p/echo")
    deadline = time.monotonic() + 10
    while True:
        status, body = d.get(f"/tasks/{task['id']}/result")
        if status == 410:
            break
        assert status in (200, 409) and time.monotonic() < deadline, body
        time.sleep(0.05)
    assert body["error"]["code"] == "result_purged"


async def test_a_failed_start_unwinds_what_started(tmp_path, network, model_image, docker_host):
    # Everything up to the listener starts (GPUs, store, engine, reconciler with a replica,
    # dispatch); the port is taken, so the start fails and must unwind all of it, in reverse.
    import asyncio
    import socket

    from berth.daemon.config import parse_config
    from berth.daemon.core import EXIT_CONFIG, StartupError
    from berth.daemon.service import Berth
    from berth.store import Store

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    config = parse_config({
        "daemon": {"listen": f"127.0.0.1:{blocker.getsockname()[1]}",
                   "state_dir": str(tmp_path / "state")},
        "docker": {"network": network, "stop_timeout_s": 0.5},
        "gpu": {"source": "none"},
        "endpoints": {"a": {"image": model_image, "min_replicas": 1,
                            "labels": {"berth.test": "unwind"}}}})
    threads = set(threading.enumerate())
    try:
        with pytest.raises(StartupError) as failed:
            await Berth.start(config)
    finally:
        blocker.close()
    assert failed.value.exit_code == EXIT_CONFIG and "cannot listen" in str(failed.value)
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not [t for t in others if "berth" in repr(t.get_coro())], others
    for _ in range(50):  # worker threads end on their own once told to
        left = [t for t in set(threading.enumerate()) - threads if t.is_alive()]
        if not left:
            break
        await asyncio.sleep(0.1)
    assert not left, left
    store = await Store.open(tmp_path / "state")  # released: another berthd may use it now
    assert [e.name for e in await store.endpoints()] == ["a"]
    await store.close()


@pytest.mark.parametrize(("mode", "api", "refused"), [
    ("cdi", "1.41", True), ("cdi", "1.43", True), ("cdi", "1.44", False), ("cdi", "1.47", False),
    ("nvidia", "1.41", False), ("env", "1.41", False), ("cdi", "weird", False),
])
def test_cdi_refusal_table(mode, api, refused):
    assert (cdi_refusal(mode, api, "x") is not None) == refused


def test_cdi_on_this_engine_is_refused_with_a_clear_message_or_accepted(write_config,
                                                                        docker_client):
    api = docker_client.version()["ApiVersion"]
    config = write_config({})
    config.write_text(config.read_text().replace("[docker]", '[docker]\ngpu_mode = "cdi"'))
    if cdi_refusal("cdi", api, "") is None:
        return  # Docker 25+: CDI requests are the engine's to answer
    result = run_berthd(config)
    assert result.returncode == 2, result.stdout + result.stderr
    said = result.stdout + result.stderr
    assert "needs Docker 25 or newer" in said and f"(API {api})" in said
    assert "docker.gpu_mode" in said and "Traceback" not in said


async def test_a_reload_racing_an_api_create_refuses_a_model_name_clash(tmp_path, network,
                                                                       model_image,
                                                                       docker_host):
    # The reload checked model names before waiting for the API's endpoint writes: a create
    # that held them then served "m" beside the file's endpoint serving "m" too.
    import asyncio

    from berth.daemon.config import ConfigError, parse_config
    from berth.daemon.service import Berth
    from helpers import endpoint

    def config(endpoints: dict) -> object:
        return parse_config({"daemon": {"listen": "127.0.0.1:0",
                                        "state_dir": str(tmp_path / "state")},
                             "docker": {"network": network, "stop_timeout_s": 0.5},
                             "gpu": {"source": "none"}, "endpoints": endpoints})

    berth = await Berth.start(config({}))
    try:
        reconciler = berth.reconciler
        async with reconciler.endpoint_writes:  # an API create under way holds these
            reload = asyncio.create_task(berth.reload(config(
                {"file": {"image": model_image, "models": ["m"]}})))
            for _ in range(5):
                await asyncio.sleep(0)  # the reload runs as far as it can
            await reconciler.put_endpoint(endpoint("api", models=["m"]), "api")
        with pytest.raises(ConfigError) as refused:
            await reload
        assert "'m'" in str(refused.value)
        assert [p.name for p in reconciler.live_pools()] == ["api"]
    finally:
        await berth.stop()
