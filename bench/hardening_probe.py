"""The hardening review's requests (issue 8) against a running berthd, printing what came back.

    .venv/bin/python bench/hardening_probe.py http://127.0.0.1:PORT            # open mode
    .venv/bin/python bench/hardening_probe.py http://127.0.0.1:PORT ADMIN_TOKEN  # token probe

Run it against an old build and a new one on the same engine (the demo image present) to see
each request's answer before and after; the closing note of 2026-12-01 shows one such pair.
"""
import json
import socket
import sys
import time
import urllib.error
import urllib.request

BASE = sys.argv[1]
HOST, PORT = BASE.split("//")[1].split(":")
IMAGE = "berth-demo/model:latest"


def req(method, path, body=None, headers=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    r = urllib.request.Request(BASE + path, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(r, timeout=20) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def short(body):
    return body[:110].decode(errors="replace").replace("\n", " ")


def wait_ready(name):
    for _ in range(100):
        s, b = req("GET", f"/v1/endpoints/{name}", headers={"Content-Type": "application/json"})
        if s == 200 and any(r["state"] == "ready" for r in json.loads(b)["replicas"]):
            return
        time.sleep(0.1)


J = {"Content-Type": "application/json"}
if len(sys.argv) > 2:  # with an admin token: the token probe alone
    A = {**J, "Authorization": f"Bearer {sys.argv[2]}"}
    req("POST", "/v1/endpoints", {"name": "tok", "image": IMAGE}, A)
    token = json.loads(req("POST", "/v1/endpoints/tok/tokens", headers=A)[1])["token"]
    req("DELETE", "/v1/endpoints/tok", headers=A)
    time.sleep(1.5)
    req("POST", "/v1/endpoints", {"name": "tok", "image": IMAGE, "min_replicas": 1}, A)
    print("4. the deleted endpoint's token on the re-created endpoint ->",
          req("GET", "/invoke/tok/echo", headers={"Authorization": f"Bearer {token}"})[0])
    sys.exit()
print("1. cross-site POST /v1/endpoints, text/plain, Origin: http://evil.example ->",
      *req("POST", "/v1/endpoints", {"name": "evil", "image": IMAGE, "volumes": ["/:/host"]},
           {"Content-Type": "text/plain", "Origin": "http://evil.example"})[:1],
      short(req("GET", "/v1/endpoints/evil")[1]))
print("1. GET /v1/endpoints with Host: rebind.evil.example ->",
      req("GET", "/v1/endpoints", headers={"Host": "rebind.evil.example"})[0])
req("POST", "/v1/endpoints", {"name": "pub", "image": IMAGE, "public": True, "min_replicas": 1},
    J)
wait_ready("pub")
status, answer = req("POST", "/async/pub/echo", raw=b"x",
                     headers={"X-Callback-Url": "http://169.254.169.254/latest/"})
print("2. POST /async/pub/echo with X-Callback-Url: http://169.254.169.254/latest/ ->",
      status, short(answer))
sink = {"name": "sink", "image": "berth-demo/nothing:here", "public": True}
if req("POST", "/v1/endpoints", {**sink, "async_queue_limit": 10}, J)[0] == 422:
    req("POST", "/v1/endpoints", sink, J)  # berth before the bound: no such field
codes = [req("POST", "/async/sink/echo", raw=b"x" * 10 * 1024 * 1024)[0] for _ in range(12)]
print("3. 12 anonymous 10 MiB async bodies to an endpoint that cannot start "
      "(async_queue_limit 10 where it exists) ->", codes)
sock = socket.create_connection((HOST, int(PORT)))
sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
time.sleep(2.5)
sock.settimeout(0.5)
try:
    state = "closed by berthd" if sock.recv(100) == b"" else "answered"
except TimeoutError:
    state = "still open"
except OSError as exc:
    state = f"closed ({exc})"
print("9. a connection with half its headers, 2.5 s later ->", state)
print("10. GET /v1/events?limit=\u00b2 ->", req("GET", "/v1/events?limit=%C2%B2")[0])
deep = b"[" * 200_000 + b"]" * 200_000
print("10. POST /v1/endpoints nested 200,000 deep ->", req("POST", "/v1/endpoints", raw=deep,
                                                         headers=J)[0])
s, b = req("GET", "/invoke/pub/echo%3Fadmin=1")
seen = json.loads(b)
print("10. /invoke/pub/echo%3Fadmin=1 -> the model saw path",
      repr(seen.get("raw_path", seen.get("path"))), "query", seen.get("query"))
s, b = req("GET", "/invoke/pub/echo", headers={"X-Forwarded-For": "6.6.6.6"})
print("10. /invoke/pub/echo with X-Forwarded-For: 6.6.6.6 -> the model saw X-Forwarded-For",
      repr(json.loads(b)["headers"].get("X-Forwarded-For")))
