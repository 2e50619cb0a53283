"""Data-plane benchmark: calls through berth against the same calls straight to the replica.

    .venv/bin/python bench/data_plane.py          # about 90 s on a 2-core machine

Starts (or reuses) a Docker engine, builds the demo image, runs a real berthd on a free
loopback port, and measures side by side, in one run, on the same replicas:
  - small JSON call (GET /echo): requests/s and p50/p99 latency at 1 and 64 clients, with wrk
    (a separate process; Debian package `wrk`), through berth and direct;
  - SSE: time to first event and time between events (aiohttp client), through berth and direct;
  - scale from zero: call to first byte through berth against the container's own
    create-to-ready time (docker SDK create+start, then GET /health until 200);
  - a slow model: GET /sleep?s=0.1 (answers after 100 ms) from 16 clients at once for 3 s
    (aiohttp; wrk gives no p95), p95 latency through berth against direct.
Prints a Markdown table; bench/RESULTS.md keeps the numbers of a run with this command.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import docker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "demo"))
import build_image  # noqa: E402
import engine  # noqa: E402

WRK_SECONDS = 6
ZERO_TRIALS = 5
SSE_TRIALS = 15
SLOW_CLIENTS = 16
SLOW_SECONDS = 3.0
NETWORK = "berth-bench"

CONFIG = """
[daemon]
listen = "127.0.0.1:{port}"
state_dir = "{state}"
log_format = "json"
log_level = "warning"
reconcile_interval_s = 0.5
[docker]
network = "{network}"
stop_timeout_s = 1.0
[gpu]
source = "none"
[defaults]
image = "{image}"
readiness = {{ path = "/health", period_s = 0.05, timeout_s = 1.0 }}
liveness = {{ period_s = 5.0 }}
[endpoints.echo]
min_replicas = 1
concurrency = 128
queue_limit = 1000
[endpoints.sse]
min_replicas = 1
concurrency = 16
{zero}
"""
ZERO = """
[endpoints.zero-{i}]
min_replicas = 0
idle_timeout_s = 600.0
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wrk(url: str, clients: int, script: str | None = None) -> dict[str, float]:
    extra = ["-s", script] if script else []
    out = subprocess.run(["wrk", "-t", "1" if clients == 1 else "2", "-c", str(clients),
                          "-d", f"{WRK_SECONDS}s", "--latency", *extra, url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    calls = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    lat = {p: _ms(v) for p, v in re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise SystemExit(f"wrk saw {errors.group(1)} errors on {url}:\n{out}")
    return {"rps": rps, "p50": lat["50"], "p99": lat["99"], "calls": calls}


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


async def sse_times(url: str) -> tuple[float, float]:
    """Median time to first event and median gap between events, in ms."""
    firsts, gaps = [], []
    async with aiohttp.ClientSession() as session:
        for _ in range(SSE_TRIALS):
            start = time.perf_counter()
            arrivals = []
            async with session.get(url) as resp:
                buffer = b""
                async for chunk in resp.content.iter_any():
                    buffer += chunk
                    while b"\n\n" in buffer:
                        _, buffer = buffer.split(b"\n\n", 1)
                        arrivals.append(time.perf_counter())
            firsts.append((arrivals[0] - start) * 1000)
            gaps += [(b - a) * 1000 for a, b in itertools.pairwise(arrivals)]
    return statistics.median(firsts), statistics.median(gaps)


async def first_byte(url: str) -> float:
    async with aiohttp.ClientSession() as session:
        start = time.perf_counter()
        async with session.get(url) as resp:
            await resp.content.readany()
            assert resp.status == 200, resp.status
            return (time.perf_counter() - start) * 1000


async def own_start_to_ready(client: docker.DockerClient, image: str,
                             env: dict[str, str] | None = None, network: str = NETWORK
                             ) -> float:
    """Create and start the image's container, then poll /health: what a model itself takes."""
    start = time.perf_counter()
    container = client.containers.run(image, detach=True, network=network, environment=env,
                                      labels={"berth.bench": "direct"})
    try:
        container.reload()
        ip = container.attrs["NetworkSettings"]["Networks"][network]["IPAddress"]
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(f"http://{ip}:8080/health") as resp:
                        if resp.status == 200:
                            return (time.perf_counter() - start) * 1000
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.005)
    finally:
        container.remove(force=True)


async def wait_ready(base: str, name: str) -> str:
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            try:
                async with session.get(f"{base}/v1/endpoints/{name}") as resp:
                    body = await resp.json()
            except aiohttp.ClientError:  # berthd still starting
                await asyncio.sleep(0.05)
                continue
            ready = [r for r in body.get("replicas", []) if r["state"] == "ready"]
            if ready:
                return str(ready[0]["address"])
            await asyncio.sleep(0.05)
    raise SystemExit(f"endpoint {name} never became ready")


def row(name: str, berth: float, direct: float, unit: str, target: str) -> str:
    return f"| {name} | {berth:.2f} {unit} | {direct:.2f} {unit} | {target} |"


async def measure(base: str, client: docker.DockerClient, image: str) -> list[str]:
    echo = await wait_ready(base, "echo")
    sse = await wait_ready(base, "sse")
    rows = []
    for clients in (1, 64):
        via = wrk(f"{base}/invoke/echo/echo", clients)
        direct = wrk(f"http://{echo}/echo", clients)
        ratio = via["rps"] / direct["rps"] * 100
        rows.append(row(f"requests/s, {clients} client(s)", via["rps"], direct["rps"], "/s",
                        f"through/direct = {ratio:.0f}%" + (" (target >= 50%)"
                                                             if clients == 64 else "")))
        for p in ("p50", "p99"):
            added = via[p] - direct[p]
            target = " (target <= 1 ms)" if clients == 1 and p == "p50" else ""
            rows.append(row(f"{p} latency, {clients} client(s)", via[p], direct[p], "ms",
                            f"added {added:.2f} ms{target}"))
    query = "stream?n=10&interval=0.02"
    first_via, gap_via = await sse_times(f"{base}/invoke/sse/{query}")
    first_direct, gap_direct = await sse_times(f"http://{sse}/{query}")
    rows.append(row("SSE time to first event", first_via, first_direct, "ms",
                    f"added {first_via - first_direct:.2f} ms (target <= 2 ms)"))
    rows.append(row("SSE time between events (sent every 20 ms)", gap_via, gap_direct, "ms",
                    f"added {gap_via - gap_direct:.2f} ms"))
    slow_via = await slow_p95(f"{base}/invoke/echo/sleep?s=0.1")
    slow_direct = await slow_p95(f"http://{echo}/sleep?s=0.1")
    rows.append(row(f"p95 latency, 100 ms model, {SLOW_CLIENTS} clients", slow_via,
                    slow_direct, "ms", f"through/direct = {slow_via / slow_direct:.3f}x "
                    "(target <= 1.05x)"))
    via_zero, own = [], []
    for i in range(ZERO_TRIALS):
        own.append(await own_start_to_ready(client, image))
        via_zero.append(await first_byte(f"{base}/invoke/zero-{i}/echo"))
    via_m, own_m = statistics.median(via_zero), statistics.median(own)
    rows.append(row("scale from zero: call to first byte vs container start-to-ready",
                    via_m, own_m, "ms", f"added {via_m - own_m:.0f} ms (target <= 250 ms)"))
    return rows


async def slow_p95(url: str) -> float:
    """p95 latency (ms) of SLOW_CLIENTS clients calling `url` in a loop for SLOW_SECONDS."""
    latencies: list[float] = []
    end = time.perf_counter() + SLOW_SECONDS

    async def client(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < end:
            start = time.perf_counter()
            async with session.get(url) as resp:
                await resp.read()
                assert resp.status == 200, resp.status
            latencies.append((time.perf_counter() - start) * 1000)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(client(session) for _ in range(SLOW_CLIENTS)))
    return statistics.quantiles(latencies, n=20)[18]


def engine_with_image() -> tuple[docker.DockerClient, subprocess.Popen[bytes] | None]:
    """A reachable engine (a private dockerd if none answers) holding the demo image."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    host = engine.existing_engine()
    proc_engine = None
    if host is None:
        host, proc_engine = engine.start_dockerd(Path("/tmp/berth-bench-docker"))
    os.environ["DOCKER_HOST"] = host
    client = docker.DockerClient(base_url=host, version="auto")
    build_image.ensure_image(client, build_image.DEFAULT_TAG)
    return client, proc_engine


def main() -> int:
    client, proc_engine = engine_with_image()
    image = build_image.DEFAULT_TAG
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.toml"
        config.write_text(CONFIG.format(
            port=port, state=f"{tmp}/state", network=NETWORK, image=image,
            zero="".join(ZERO.format(i=i) for i in range(ZERO_TRIALS))))
        berthd = subprocess.Popen([sys.executable, "-m", "berth.daemon.main", "--config",
                                   str(config), "--stop-replicas-on-exit"], cwd=ROOT,
                                  stdout=subprocess.DEVNULL)
        try:
            rows = asyncio.run(measure(f"http://127.0.0.1:{port}", client, image))
        finally:
            berthd.send_signal(signal.SIGTERM)
            berthd.wait(timeout=60)
            if proc_engine is not None:
                proc_engine.terminate()
    print_table(f"berth data plane, {os.cpu_count()} CPUs, wrk {WRK_SECONDS}s per run",
                ("through berth", "direct to replica"), rows)
    return 0


def print_table(title: str, sides: tuple[str, ...], rows: list[str]) -> None:
    """The run's Markdown table, as bench/RESULTS.md keeps it."""
    print(f"{title}\n")
    print(f"| measure | {' | '.join(sides)} | comparison |")
    print("|" + " --- |" * (len(sides) + 2))
    print("\n".join(rows))


if __name__ == "__main__":
    sys.exit(main())
