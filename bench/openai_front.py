"""OpenAI front door benchmark: /v1/chat/completions against /invoke to the same replica, usage
accounting on against off, and 500 concurrent streamed chats, in one run.

    .venv/bin/python bench/openai_front.py          # about 2 min on a 2-core machine
    .venv/bin/python bench/openai_front.py --streams 5   # only the 500 streams, 5 rounds

Starts (or reuses) a Docker engine, builds the demo image, runs two real berthds on free
loopback ports (the second with daemon.usage_accounting = false; each with one replica of
the demo model, which answers chat completions with a usage object) and measures:
  - wrk (a separate process) POSTing one small chat body at 1 and 64 connections to
    /v1/chat/completions and to /invoke/llm/v1/chat/completions on the first berthd (same
    replica): added p50 at 1 client, throughput ratio at 64;
  - /v1/chat/completions at 64 connections on both berthds: accounting on vs off;
  - 500 concurrent streamed chats (aiohttp), each answered in 12 chunks 50 ms apart, through
    berth and straight to the replica: every chunk must arrive; per-chunk latency is its
    arrival time minus the model's `sent_at` stamp (container and host share the clock).
Prints a Markdown table; bench/RESULTS.md keeps the numbers of a run with this command.
"""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "demo"))
sys.path.insert(0, str(ROOT / "bench"))
import build_image  # noqa: E402
from data_plane import (  # noqa: E402
    engine_with_image,
    free_port,
    print_table,
    wait_ready,
    wrk,
)

STREAMS = 500
ROUNDS = 3
WORDS = 10  # + "echo:" and the usage chunk: 12 chunks a stream
CHAT = {"model": "llama", "messages": [{"role": "user", "content": "hello berth"}]}
CONFIG = """
[daemon]
listen = "127.0.0.1:{port}"
state_dir = "{state}"
log_format = "json"
log_level = "warning"
usage_accounting = {accounting}
max_connections_per_client = 2048
[docker]
network = "{network}"
stop_timeout_s = 1.0
[gpu]
source = "none"
[endpoints.llm]
image = "{image}"
models = ["llama"]
min_replicas = 1
concurrency = 1024
queue_limit = 4096
readiness = {{ path = "/health", period_s = 0.05, timeout_s = 1.0 }}
liveness = {{ period_s = 5.0 }}
"""
LUA = """wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
"""


def start_berthd(tmp: Path, name: str, accounting: bool) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    config = tmp / f"{name}.toml"
    config.write_text(CONFIG.format(port=port, state=tmp / name, network=f"berth-bench-{name}",
                                    image=build_image.DEFAULT_TAG,
                                    accounting=str(accounting).lower()))
    proc = subprocess.Popen([sys.executable, "-m", "berth.daemon.main", "--config", str(config),
                             "--stop-replicas-on-exit"], cwd=ROOT, stdout=subprocess.DEVNULL)
    return f"http://127.0.0.1:{port}", proc


async def one_stream(session: aiohttp.ClientSession, url: str) -> list[float]:
    """Per-chunk latencies (ms) of one streamed chat; all chunks must come."""
    body = {**CHAT, "messages": [{"role": "user", "content": " ".join(["w"] * WORDS)}],
            "stream": True, "stream_options": {"include_usage": True}, "interval_s": 0.05}
    latencies, done, buffer = [], False, b""
    async with session.post(url, json=body) as resp:
        assert resp.status == 200, resp.status
        async for chunk in resp.content.iter_any():
            now = time.time()
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if event == b"data: [DONE]":
                    done = True
                elif event.startswith(b"data: "):
                    latencies.append((now - json.loads(event[6:])["sent_at"]) * 1000)
    assert done and len(latencies) == WORDS + 2, (done, len(latencies))
    return latencies


async def streams(url: str) -> tuple[list[float], list[float]]:
    """Per-chunk latencies of all chunks, and of all but each stream's first."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        results = await asyncio.gather(*(one_stream(session, url) for _ in range(STREAMS)))
    return [lat for one in results for lat in one], [lat for one in results for lat in one[1:]]


@dataclass
class Side:
    rps: float
    p50: float
    runs: str  # every round's requests/s of both sides, "a/b, a/b, ..."


def alternated(a: str, b: str, clients: int, lua: str) -> tuple[Side, Side]:
    """wrk on `a` and `b` in turn, ROUNDS times each (the box's noise falls on both alike):
    the median requests/s and p50 of each."""
    runs = [(wrk(a, clients, lua), wrk(b, clients, lua)) for _ in range(ROUNDS)]
    text = ", ".join(f"{x['rps']:.0f}/{y['rps']:.0f}" for x, y in runs)
    first, second = ([r[i] for r in runs] for i in (0, 1))
    return (Side(statistics.median(r["rps"] for r in first),
                 statistics.median(r["p50"] for r in first), text),
            Side(statistics.median(r["rps"] for r in second),
                 statistics.median(r["p50"] for r in second), text))


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def row(name: str, a: float, b: float, unit: str, note: str) -> str:
    return f"| {name} | {a:.2f} {unit} | {b:.2f} {unit} | {note} |"


async def measure(on: str, off: str, lua: str) -> list[str]:
    replica = await wait_ready(on, "llm")
    await wait_ready(off, "llm")
    rows = []
    for clients in (1, 64):
        front, invoke = alternated(f"{on}/v1/chat/completions",
                                   f"{on}/invoke/llm/v1/chat/completions", clients, lua)
        rows.append(row(f"requests/s, {clients} client(s)", front.rps, invoke.rps, "/s",
                        f"/v1 / invoke = {front.rps / invoke.rps:.2f}x"
                        + (" (target >= 0.9x)" if clients == 64 else "")
                        + f"; runs: {front.runs}"))
        rows.append(row(f"p50 latency, {clients} client(s)", front.p50, invoke.p50, "ms",
                        f"added {front.p50 - invoke.p50:.2f} ms"
                        + (" (target <= 0.3 ms)" if clients == 1 else "")))
    counted, uncounted = alternated(f"{on}/v1/chat/completions", f"{off}/v1/chat/completions",
                                    64, lua)
    rows.append(row("requests/s, 64 clients, usage accounting on vs off", counted.rps,
                    uncounted.rps, "/s", f"on / off = {counted.rps / uncounted.rps:.2f}x"
                    f" (target >= 0.95x; runs on/off: {counted.runs})"))
    via, via_later = await streams(f"{on}/v1/chat/completions")
    direct, direct_later = await streams(f"http://{replica}/v1/chat/completions")
    rows.append(row(f"{STREAMS} concurrent streams: per-chunk latency p50", statistics.median(via),
                    statistics.median(direct), "ms",
                    f"{len(via)} of {STREAMS * (WORDS + 2)} chunks arrived"))
    rows.append(row(f"{STREAMS} concurrent streams: per-chunk latency p99", p99(via),
                    p99(direct), "ms", f"added {p99(via) - p99(direct):.2f} ms (target <= 5 ms)"))
    rows.append(row(f"{STREAMS} concurrent streams: p99 without each first chunk",
                    p99(via_later), p99(direct_later), "ms",
                    f"added {p99(via_later) - p99(direct_later):.2f} ms"))
    return rows


async def stream_rounds(on: str, rounds: int) -> None:
    """The 500 streams alone, through berth then direct, `rounds` times (one berthd, one
    engine: the rounds show how much of the spread is the box's)."""
    replica = await wait_ready(on, "llm")
    for _ in range(rounds):
        via = (await streams(f"{on}/v1/chat/completions"))[0]
        direct = (await streams(f"http://{replica}/v1/chat/completions"))[0]
        cuts = [statistics.quantiles(v, n=100) for v in (via, direct)]
        print(" | ".join(f"p{q} {cuts[0][q - 1]:.1f}/{cuts[1][q - 1]:.1f}" for q in (50, 90, 99))
              + f" ms (via/direct) | p99 added {cuts[0][98] - cuts[1][98]:.2f} ms", flush=True)


def main() -> int:
    _, proc_engine = engine_with_image()
    if "--streams" in sys.argv:
        with tempfile.TemporaryDirectory() as tmp_name:
            on, berthd = start_berthd(Path(tmp_name), "on", True)
            try:
                asyncio.run(stream_rounds(on, int(sys.argv[sys.argv.index("--streams") + 1])))
            finally:
                berthd.send_signal(signal.SIGTERM)
                berthd.wait(timeout=60)
        return 0
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        lua = tmp / "chat.lua"
        lua.write_text(LUA.format(body=json.dumps(CHAT)))
        on, berth_on = start_berthd(tmp, "on", True)
        off, berth_off = start_berthd(tmp, "off", False)
        try:
            rows = asyncio.run(measure(on, off, str(lua)))
        finally:
            for proc in (berth_on, berth_off):
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
            if proc_engine is not None:
                proc_engine.terminate()
    print_table("berth OpenAI front door (first column) against the comparison (second column)",
                ("/v1 (usage on)", "/invoke, usage off, or direct"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
