"""Hardening against hostile input, in-process over real HTTP with real replicas: browsers
(Host, Origin, Content-Type), strict query and JSON parsing, paths and forwarding headers
as sent, bounded async intake, tokens that die with their endpoint, private files."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat

import pytest
from yarl import URL

from berth.daemon.browser import SEEN_HOSTS, BrowserGuard
from berth.daemon.config import ConfigError, parse_config
from berth.daemon.errors import ApiError
from berth.daemon.replica_logs import ReplicaLogs
from berth.daemon.service import StartupError, callback_secret, read_admin_token
from helpers import body, endpoint, ready_count, wait_for

ADMIN = {"Authorization": "Bearer admin-secret"}
JSON = {"Content-Type": "application/json"}


# --- 1. browsers ------------------------------------------------------------------------------

@pytest.mark.parametrize(("listen", "host", "allowed"), [
    ("127.0.0.1", "127.0.0.1:8080", True),
    ("127.0.0.1", "localhost:8080", True),
    ("127.0.0.1", "LOCALHOST", True),
    ("127.0.0.1", "evil.example:8080", False),  # DNS rebinding: a foreign name, our address
    ("127.0.0.1", "127.0.0.2:8080", False),
    ("127.0.0.1", "berth.lan", False),
    ("0.0.0.0", "10.1.2.3:8080", True),  # listening everywhere: any literal address
    ("0.0.0.0", "rebind.example", False),
    ("::1", "[::1]:8080", True),
    ("::1", "[::2]:8080", False),
    ("localhost", "127.0.0.1:8080", True),
    ("localhost", "10.0.0.1", False),
])
def test_host_table(listen, host, allowed):
    assert BrowserGuard.build(listen, ["localhost"], []).host_allowed(host) is allowed


class Headers:
    def __init__(self, **headers: str) -> None:
        self.headers = headers


def test_remembered_host_verdicts_are_bounded_and_never_a_refusal():
    guard = BrowserGuard.build("127.0.0.1", ["localhost"], [])
    for _ in range(2):  # the second time from memory: still refused
        with pytest.raises(ApiError) as refused:
            guard.check(Headers(Host="evil.example"))
        assert refused.value.status == 421
    for port in range(1000, 1200):  # callers choose Host values: memory must not grow with them
        guard.check(Headers(Host=f"127.0.0.1:{port}"))
    assert len(guard._allowed_seen) == SEEN_HOSTS
    guard.check(Headers(Host="127.0.0.1:1100"))  # not remembered, still judged: allowed
    with pytest.raises(ApiError):
        guard.check(Headers(Host="localhost", Origin="http://evil.example"))  # Origin: always


async def test_a_web_page_cannot_create_an_endpoint(api, docker_client):
    _, client = await api()
    spec = body("pwn", volumes=["/:/host"])
    page = {"Origin": "http://evil.example", **ADMIN}
    # Before: text/plain with a foreign Origin got 201 and mounted the host's disk.
    resp = await client.post("/v1/endpoints", json=spec, headers=page)
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "origin_refused"
    resp = await client.post("/v1/endpoints", data=str(spec).encode(),
                             headers={**ADMIN, "Content-Type": "text/plain"})
    assert resp.status == 415
    assert (await resp.json())["error"]["code"] == "unsupported_media_type"
    resp = await client.post("/v1/endpoints", json=spec,
                             headers={**ADMIN, "Host": "rebind.evil.example:8080"})
    assert resp.status == 421 and (await resp.json())["error"]["code"] == "misdirected_request"
    resp = await client.post("/v1/endpoints", json=spec,
                             headers={**ADMIN, "Sec-Fetch-Site": "cross-site"})
    assert resp.status == 403
    resp = await client.put("/v1/secrets/X", data=b'{"value": "v"}', headers=ADMIN)
    assert resp.status == 415  # no Content-Type at all is not JSON either
    assert (await client.get("/v1/endpoints/pwn", headers=ADMIN)).status == 404
    # berthd's own pages (same origin) and listed origins are let in.
    own = {"Origin": f"http://127.0.0.1:{client.port}", **ADMIN}
    assert (await client.get("/v1/endpoints", headers=own)).status == 200
    assert (await client.post("/invoke/none/x", headers={"Origin": "null"})).status == 403


async def test_allowed_origins_are_let_in(api):
    guard = BrowserGuard.build("127.0.0.1", ["localhost", "berth.lan"],
                               ["https://grafana.example"])
    _, client = await api(guard=guard)
    headers = {**ADMIN, "Origin": "https://grafana.example", "Host": "berth.lan"}
    assert (await client.get("/v1/endpoints", headers=headers)).status == 200
    headers["Origin"] = "https://grafana.example.evil"
    assert (await client.get("/v1/endpoints", headers=headers)).status == 403


# --- 10. strict parsing, paths and headers as sent ------------------------------------------

async def test_bad_admin_input_never_answers_500(api):
    _, client = await api()
    for query in ("limit=²", "limit=٣", "limit=-1", "limit=1e3", "since=nan", "since=inf"):
        resp = await client.get(f"/v1/events?{query}", headers=ADMIN)
        assert resp.status == 400, query
        error = (await resp.json())["error"]
        assert error["code"] == "bad_query" and error["details"][0]["path"] in query
    for path in ("/v1/tasks?limit=²", "/v1/tasks?status=done", "/v1/usage?since=soon"):
        resp = await client.get(path, headers=ADMIN)
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "bad_query", path
    deep = b"[" * 200_000 + b"]" * 200_000
    resp = await client.post("/v1/endpoints", data=deep, headers={**ADMIN, **JSON})
    assert resp.status in (400, 413) and (await resp.json())["error"]["code"] in (
        "bad_json", "payload_too_large")
    deep = b'{"a":' * 40 + b"1" + b"}" * 40  # small, but deeper than 32 levels
    resp = await client.post("/v1/endpoints", data=deep, headers={**ADMIN, **JSON})
    assert resp.status == 400 and "deeper" in (await resp.json())["error"]["message"]
    resp = await client.post("/v1/endpoints", data=b"[" * 5000 + b"]" * 5000,
                             headers={**ADMIN, **JSON})
    assert resp.status == 400


async def test_tokens_on_the_control_api_401_and_403(api):
    _, client = await api({"e": endpoint("e")})
    token = (await (await client.post("/v1/endpoints/e/tokens", headers=ADMIN)).json())["token"]
    resp = await client.get("/v1/endpoints", headers={"Authorization": "Bearer nope"})
    assert resp.status == 401
    resp = await client.get("/v1/endpoints", headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 403


async def test_paths_keep_their_encoding_and_forwarding_is_berths(api):
    h, client = await api({"p": endpoint("p", public=True, min_replicas=1)})
    pool = h.reconciler.pool("p")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    url = URL(f"http://127.0.0.1:{client.port}/invoke/p/echo/a%3Fb%2Fc?x=%3F1", encoded=True)
    claimed = {"X-Forwarded-For": "6.6.6.6", "Forwarded": "for=6.6.6.6",
               "X-Forwarded-Host": "evil", "X-Real-IP": "6.6.6.6"}
    resp = await client.session.get(url, headers=claimed)
    seen = await resp.json()
    assert resp.status == 200 and seen["raw_path"] == "/echo/a%3Fb%2Fc?x=%3F1"
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-host"] == f"127.0.0.1:{client.port}"
    assert headers["x-forwarded-proto"] == "http"
    assert "forwarded" not in headers and "x-real-ip" not in headers


# --- 3. bounded async intake --------------------------------------------------------------------

async def test_async_intake_is_bounded_by_count_bytes_and_disk(api, tmp_path):
    # A missing secret keeps the endpoint from running, so its tasks stay queued.
    specs = {"q": endpoint("q", public=True, secrets=["ABSENT"], async_queue_limit=3,
                           async_queue_bytes="200k")}
    h, client = await api(specs)
    statuses = [(await client.post("/async/q/echo", data=b"x")).status for _ in range(4)]
    assert statuses == [202, 202, 202, 429]  # before: every one got 202
    resp = await client.post("/async/q/echo", data=b"x")
    assert resp.headers["Retry-After"] == "5"
    assert (await resp.json())["error"]["code"] == "async_queue_full"
    assert await h.store.tasks.backlog("q") == (3, 3)

    _, client2 = await api({"b": endpoint("b", public=True, secrets=["ABSENT"],
                                           async_queue_bytes="100k")})
    assert (await client2.post("/async/b/echo", data=b"z" * 60_000)).status == 202
    resp = await client2.post("/async/b/echo", data=b"z" * 60_000)
    assert resp.status == 429 and "async_queue_bytes" in (await resp.json())["error"]["message"]

    _, client3 = await api({"d": endpoint("d", public=True)}, min_free_disk=2 ** 60)
    resp = await client3.post("/async/d/echo", data=b"x")
    assert resp.status == 507 and "min_free_disk" in (await resp.json())["error"]["message"]


async def test_a_full_disk_answers_507_not_500(api, small_disk):
    files = small_disk("256k")
    _, client = await api({"f": endpoint("f", public=True, secrets=["ABSENT"])}, files=files)
    resp = await client.post("/async/f/echo", data=b"y" * 1024 * 1024)
    assert resp.status == 507, await resp.text()
    assert (await resp.json())["error"]["code"] == "insufficient_storage"
    assert os.listdir(files) == []  # the partial body file is gone
    resp = await client.post("/async/f/echo", data=b"y" * 100_000)
    assert resp.status == 202
    task = (await resp.json())["id"]
    mode = stat.S_IMODE((files / f"{task}.body").stat().st_mode)
    assert mode == 0o600  # before: 0644, readable by every user of the host


# --- 4. tokens die with their endpoint ----------------------------------------------------------

async def test_a_deleted_endpoints_tokens_never_work_again(api):
    h, client = await api()
    assert (await client.post("/v1/endpoints", json=body("t"), headers=ADMIN)).status == 201
    token = (await (await client.post("/v1/endpoints/t/tokens", headers=ADMIN)).json())["token"]
    bearer = {"Authorization": f"Bearer {token}"}
    assert (await client.get("/v1/endpoints", headers=bearer)).status == 403  # known token
    assert (await client.delete("/v1/endpoints/t", headers=ADMIN)).status == 200
    assert await h.store.tokens("t") == []
    assert (await client.post("/v1/endpoints", json=body("t"), headers=ADMIN)).status == 201
    # Before: the old token authenticated the re-created endpoint.
    assert (await client.get("/v1/endpoints", headers=bearer)).status == 401
    assert (await client.get("/v1/endpoints/t/tokens", headers=ADMIN)).status == 200
    assert (await (await client.get("/v1/endpoints/t/tokens", headers=ADMIN)).json()) == {
        "tokens": []}


# --- 10. small ones -------------------------------------------------------------------------

def test_callback_key_is_written_whole_and_never_empty(tmp_path):
    config = parse_config({"daemon": {"state_dir": str(tmp_path)}})
    key = callback_secret(config)
    kept = tmp_path / "callback-secret"
    assert len(key) == 64 and stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert callback_secret(config) == key
    assert [p.name for p in tmp_path.iterdir()] == ["callback-secret"]  # no temp file left
    kept.write_text("\n")
    with pytest.raises(StartupError, match="empty"):
        callback_secret(config)
    empty = tmp_path / "given"
    empty.write_text("")
    with pytest.raises(StartupError, match="empty"):
        callback_secret(parse_config({"daemon": {"callback_secret_file": str(empty)}}))


def test_an_empty_admin_token_file_is_refused_not_an_open_api(tmp_path, monkeypatch):
    # An empty first line read as "no token": every control route open, and nothing said.
    monkeypatch.delenv("BERTH_ADMIN_TOKEN", raising=False)
    path = tmp_path / "admin-token"
    for text in ("", "\nsecret\n"):
        path.write_text(text)
        with pytest.raises(StartupError, match=r"admin_token_file: .* is empty"):
            read_admin_token(parse_config({"daemon": {"admin_token_file": str(path)}}))
    path.write_text("secret\n")
    assert read_admin_token(parse_config({"daemon": {"admin_token_file": str(path)}})) == \
        "secret"


class EndlessLogs:
    """Stands in for the engine's log stream in this unit test of buffering alone."""

    async def stream_logs(self, container_id: str, tail: object, follow: bool):
        for i in range(100_000):
            yield f"line {i}\n".encode()
            if i % 100 == 0:
                await asyncio.sleep(0)


async def test_a_slow_log_reader_is_cut_not_buffered():
    logs = ReplicaLogs(EndlessLogs(), follow=False, max_behind=50)  # type: ignore[arg-type]
    logs.add("r1", "c1", "all")
    await asyncio.sleep(0.05)  # the client reads nothing meanwhile
    assert logs.queue.qsize() <= 50
    lines = []

    class Pool:
        replicas: dict = {}

    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2):
            async for line in logs.lines(Pool(), None):  # type: ignore[arg-type]
                lines.append(line)
    logs.close()
    assert lines[-1].startswith(b"[berth] log stream cut") and len(lines) <= 51


class UnendingLine:
    """A log stream of 2 MiB with no newline, in 4 KiB writes."""

    async def stream_logs(self, container_id: str, tail: object, follow: bool):
        for _ in range(512):
            yield b"a" * 4096
            await asyncio.sleep(0)


async def test_a_log_line_that_never_ends_is_passed_on_in_bounded_pieces():
    # It was held whole (and rescanned at each write: quadratic) until the stream's end.
    logs = ReplicaLogs(UnendingLine(), follow=False)  # type: ignore[arg-type]
    logs.add("r1", "c1", "all")

    class Pool:
        replicas: dict = {}

    lines = [line async for line in logs.lines(Pool(), None)]  # type: ignore[arg-type]
    logs.close()
    assert sum(len(line) - len(b"[r1] \n") for line in lines) == 512 * 4096
    assert len(lines) > 1 and max(map(len, lines)) <= ReplicaLogs.MAX_LINE + 4096 + 6


async def test_a_followed_log_stream_ends_when_berthd_stops(api):
    # An open status page follows logs: it once held a stop for twice aiohttp's shutdown
    # timeout, until systemd's SIGKILL cut the last usage flush and the store's close.
    h, client = await api({"lg": endpoint("lg", min_replicas=1)})
    pool = h.reconciler.pool("lg")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    resp = await client.get("/v1/endpoints/lg/logs?follow=true",
                            headers={"Authorization": "Bearer admin-secret"})
    assert resp.status == 200
    await client.app.shutdown()  # (what runner.cleanup does first)
    async with asyncio.timeout(5):
        await resp.read()  # the stream ended


# --- 8. isolation and least privilege ---------------------------------------------------------

CONNECT = ("import socket,sys\n"
           "try: socket.create_connection((sys.argv[1], 8080), timeout=1); print('open')\n"
           "except OSError as e: print('closed', e)")


async def test_endpoints_cannot_reach_each_other_and_run_unprivileged(harness, private_engine):
    # An engine with Docker's default iptables rules: the first one runs without them.
    h = await harness(host=private_engine.host)
    docker_client = private_engine.client()
    await h.reconciler.apply_specs({
        "a": endpoint("a", min_replicas=1),
        "b": endpoint("b", min_replicas=1, pids_limit=64, cap_add=["NET_BIND_SERVICE"],
                      user="65534:65534")}, "config")
    replicas = {}
    for name in ("a", "b"):
        pool = h.reconciler.pool(name)
        await wait_for(pool, lambda pool=pool: ready_count(pool) == 1, what=f"{name} ready")
        [replicas[name]] = pool.replicas.values()
    a = docker_client.containers.get(replicas["a"].container_id)
    b = docker_client.containers.get(replicas["b"].container_id)
    assert list(a.attrs["NetworkSettings"]["Networks"]) == [f"{h.network}-a"]
    assert list(b.attrs["NetworkSettings"]["Networks"]) == [f"{h.network}-b"]
    b_ip, a_ip = replicas["b"].address.split(":")[0], replicas["a"].address.split(":")[0]
    # Before: one shared network, so a's container reached b's model API without a token.
    out = a.exec_run(["/usr/bin/python3.11", "-c", CONNECT, b_ip]).output.decode()
    assert out.startswith("closed"), out
    out = a.exec_run(["/usr/bin/python3.11", "-c", CONNECT, a_ip]).output.decode()
    assert out.startswith("open"), out  # the check itself works
    host = a.attrs["HostConfig"]
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"]
    assert "no-new-privileges:true" in host["SecurityOpt"] and host["PidsLimit"] == 4096
    assert a.attrs["Config"]["User"] == ""  # the image's user
    host = b.attrs["HostConfig"]
    assert host["CapAdd"] == ["NET_BIND_SERVICE"] and host["PidsLimit"] == 64
    assert b.attrs["Config"]["User"] == "65534:65534"
    status = b.exec_run(["/usr/bin/python3.11", "-c", "print(open('/proc/self/status').read())"])
    assert "NoNewPrivs:\t1" in status.output.decode()
    assert "CapBnd:\t0000000000000400" in status.output.decode()  # NET_BIND_SERVICE alone
    docker_client.close()


async def test_volumes_outside_the_allowed_prefixes_are_refused(api):
    _, client = await api(volume_prefixes=("/srv/models",))
    for volume in ("/:/host", "/srv/models/../../etc:/etc2", "/srv/modelsX:/m"):
        resp = await client.post("/v1/endpoints", json=body("v", volumes=[volume]),
                                 headers=ADMIN)
        error = (await resp.json())["error"]
        assert resp.status == 422 and error["details"][0]["path"] == "volumes.0", volume
        assert "allowed_volume_prefixes" in error["message"]
    resp = await client.post("/v1/endpoints", json=body("v", volumes=["/srv/models/x:/m:ro"]),
                             headers=ADMIN)
    assert resp.status == 201
    with pytest.raises(ConfigError) as caught:
        parse_config({"daemon": {"allowed_volume_prefixes": ["/srv"]},
                      "endpoints": {"e": {"image": "x", "volumes": ["/etc:/e"]}}})
    assert [i.path for i in caught.value.issues] == ["endpoints.e.volumes.0"]
