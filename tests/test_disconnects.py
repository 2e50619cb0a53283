"""Control writes whose clients hang up at random points, against a real berthd: afterwards
the API, the SQLite file and a restarted berthd all tell the same story."""

from __future__ import annotations

import json
import os
import random
import socket
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path

from helpers import SESSION, TEST_LABEL, Berthd

ADMIN = "adm1n-t0ken"
WRITES = 200
NAMES = [f"e{i}" for i in range(6)]
SECRETS = [f"S{i}" for i in range(6)]


def config(tmp_path: Path, network: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f"""
[daemon]
listen = "127.0.0.1:0"
state_dir = "{tmp_path / 'state'}"
log_format = "json"
shutdown_grace_s = 2.0
reconcile_interval_s = 0.2
[docker]
network = "{network}"
[gpu]
source = "none"
""")
    return path


def api(d: Berthd, method: str, path: str, body: object = None,
        token: str = ADMIN) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{d.port}{path}", data=data,
                                     method=method)
    request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def raw_request(method: str, path: str, port: int, body: object = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {ADMIN}\r\nContent-Length: {len(data)}\r\n")
    if body is not None:
        head += "Content-Type: application/json\r\n"
    return (head + "\r\n").encode() + data


def send_and_hang_up(port: int, request: bytes, rng: random.Random) -> str:
    """Send all or part of the request, then close after a random pause; what was done."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        cut = len(request) if rng.random() < 0.7 else rng.randrange(1, len(request))
        sock.sendall(request[:cut])
        time.sleep(rng.choice((0, 0, 0.0005, 0.002, 0.005, 0.02)))
        if rng.random() < 0.5:  # an abortive close (RST) half of the time
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00"
                            b"\x00\x00")
    return "whole" if cut == len(request) else "partial"


def endpoint_body(name: str, rng: random.Random) -> dict:
    return {"name": name, "image": "berth-test/none:1", "min_replicas": 0,
            "max_replicas": rng.randint(1, 4), "labels": {TEST_LABEL: SESSION}}


def random_write(d: Berthd, rng: random.Random, tokens: dict[str, str]) -> tuple[str, str, object]:
    kind = rng.choices(("put_endpoint", "delete_endpoint", "new_token", "revoke_token",
                        "put_secret", "delete_secret"), weights=(4, 1, 3, 2, 3, 2))[0]
    name, secret = rng.choice(NAMES), rng.choice(SECRETS)
    if kind == "put_endpoint":
        return "PUT", f"/v1/endpoints/{name}", endpoint_body(name, rng)
    if kind == "delete_endpoint":
        return "DELETE", f"/v1/endpoints/{name}", None
    if kind == "new_token":
        return "POST", f"/v1/endpoints/{name}/tokens", None
    if kind == "put_secret":
        return "PUT", f"/v1/secrets/{secret}", {"value": f"v{rng.random()}"}
    if kind == "delete_secret":
        return "DELETE", f"/v1/secrets/{secret}", None
    if tokens:  # revoke one we know the value of, so the auth check can probe it
        token_id = rng.choice(sorted(tokens))
        owner = stored_tokens(d).get(token_id, name)
        return "DELETE", f"/v1/endpoints/{owner}/tokens/{token_id}", None
    return "POST", f"/v1/endpoints/{name}/tokens", None


def stored_tokens(d: Berthd) -> dict[str, str]:
    """token id -> endpoint, as the API lists them; an endpoint still listed but already
    being removed (its tokens 404) shows as "removing": not a state to compare yet."""
    found = {}
    for name in api_endpoints(d):
        status, body = api(d, "GET", f"/v1/endpoints/{name}/tokens")
        if status == 404:
            found[f"removing {name}"] = name
        for t in body.get("tokens", []) if status == 200 else []:
            found[t["id"]] = name
    return found


def api_endpoints(d: Berthd) -> dict[str, int]:
    return {e["name"]: e["spec"]["max_replicas"]
            for e in api(d, "GET", "/v1/endpoints")[1]["endpoints"]}


def api_state(d: Berthd, tokens: dict[str, str]) -> dict:
    """What the API says, including which tokens berthd's memory still honours."""
    known = {tid for tid, value in tokens.items()
             if api(d, "GET", "/v1/endpoints", token=value)[0] == 403}  # 401: unknown
    return {"endpoints": api_endpoints(d),
            "secrets": sorted(s["name"] for s in api(d, "GET", "/v1/secrets")[1]["secrets"]),
            "tokens": stored_tokens(d), "honoured": sorted(known)}


def sqlite_state(db: Path, tokens: dict[str, str]) -> dict:
    with sqlite3.connect(db) as conn:
        endpoints = {n: json.loads(s)["max_replicas"]
                     for n, s in conn.execute("SELECT name, spec FROM endpoints")}
        secrets = sorted(r[0] for r in conn.execute("SELECT name FROM secrets"))
        stored = dict(conn.execute("SELECT id, endpoint FROM tokens").fetchall())
    return {"endpoints": endpoints, "secrets": secrets, "tokens": stored,
            "honoured": sorted(t for t in tokens if t in stored)}


def settled(d: Berthd, tokens: dict[str, str]) -> dict:
    """The API's state once writes whose clients left have finished."""
    last = None
    for _ in range(100):
        now = api_state(d, tokens)
        # a removal that outlasts two polls (stopping containers on a loaded CI box) is
        # still under way while its endpoint is listed and its tokens are not
        if now == last and not any(k.startswith("removing ") for k in now["tokens"]):
            return now
        last = now
        time.sleep(0.2)
    raise AssertionError("the API never settled")


def test_random_disconnects_leave_api_sqlite_and_restart_agreeing(tmp_path, network,
                                                                  docker_host):
    seed = int(os.environ.get("BERTH_TEST_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    path = config(tmp_path, network)
    env = {"BERTH_ADMIN_TOKEN": ADMIN}
    d = Berthd(tmp_path, path, env=env)
    d.wait_message("READY=1")
    try:
        tokens: dict[str, str] = {}  # id -> value, for every token ever made whole
        for name in NAMES[:3]:
            assert api(d, "PUT", f"/v1/endpoints/{name}", endpoint_body(name, rng))[0] == 201
            for _ in range(8):
                made = api(d, "POST", f"/v1/endpoints/{name}/tokens")[1]
                tokens[made["id"]] = made["token"]
        done = {"whole": 0, "partial": 0}
        for _ in range(WRITES):
            method, url, body = random_write(d, rng, tokens)
            done[send_and_hang_up(d.port, raw_request(method, url, d.port, body), rng)] += 1
        print(f"seed {seed}: {WRITES} writes cut ({done['whole']} after the whole request, "
              f"{done['partial']} part way)")
        seen = settled(d, tokens)
        on_disk = sqlite_state(tmp_path / "state" / "berth.db", tokens)
        assert seen == on_disk, f"seed {seed}"
        d.signal(15)
        assert d.wait_exit() == 0
        d2 = Berthd(tmp_path, path, env=env)
        d2.wait_message("READY=1")
        try:
            assert api_state(d2, tokens) == seen, f"seed {seed}"
        finally:
            d2.close()
        print(f"agreed: {len(seen['endpoints'])} endpoints, {len(seen['secrets'])} secrets, "
              f"{len(seen['tokens'])} tokens stored, {len(seen['honoured'])} of "
              f"{len(tokens)} known tokens honoured")
        assert done["whole"] > 100 and seen["endpoints"]  # the test did exercise something
    finally:
        d.close()
