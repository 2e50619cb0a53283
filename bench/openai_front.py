"""OpenAI front door benchmark: /v1/chat/completions against /invoke to the same replica, usage
accounting on against off, and 500 concurrent streamed chats, in one run.

    .venv/bin/python bench/openai_front.py          # about 4 min on a 2-core machine
    .venv/bin/python bench/openai_front.py --streams 5   # only the 500 streams, 5 rounds
    .venv/bin/python bench/openai_front.py --fresh 6     # only the two ratios, as medians
                                                         # over 6 fresh pairs (~6 min)

Starts (or reuses) a Docker engine, builds the demo image, runs two real berthds on free
loopback ports (the second with daemon.usage_accounting = false; each with one replica of
demo/stream_model.py, the demo image's lean model: one event loop, as real model servers
serve, answering chat completions with a usage object, streamed or not) and measures:
  - wrk (a separate process) POSTing one small chat body at 1 and 64 connections to
    /v1/chat/completions and to /invoke/llm/v1/chat/completions on the first berthd (same
    replica): added p50 at 1 client, throughput ratio at 64;
  - /v1/chat/completions at 64 connections on both berthds: accounting on vs off, in turn,
    and again with both loaded at the same moment beside a control pair (a third berthd
    with accounting on): what is left of the box's own spread;
  - beside each 64-client throughput, berthd's CPU per call (all its threads, schedstat);
  - 500 concurrent streamed chats (a lean asyncio client on uvloop: SseStream), begun over
    RAMP_S on both sides alike, each answered in 12 chunks 50 ms apart, through berth and
    straight to the replica, STREAM_ROUNDS times in turn: every chunk must arrive; per-chunk
    latency is its arrival time minus the model's `sent_at` stamp (container and host share
    the clock); the target is read on the median of the rounds' added p99 (each round's is
    printed too).
Why the lean model: the demo's threaded model_server.py was the bottleneck of every row (about
3,000 chats/s whoever called it; each berthd had its own, so on/off compared two replicas and
swung by a fifth), and with 500 streams it took twice berthd's CPU on a 2-core box.
Prints a Markdown table; bench/RESULTS.md keeps the numbers of a run with this command.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "demo"))
sys.path.insert(0, str(ROOT / "bench"))
import build_image  # noqa: E402
import data_plane  # noqa: E402
from data_plane import (  # noqa: E402
    engine_with_image,
    free_port,
    print_table,
    wait_ready,
    wrk,
)

STREAMS = 500
ROUNDS = 4  # (even: each side first as often)
# Two berthds, each with its own replica: one berthd's own rounds swing by a fifth here, and
# three rounds once put accounting on at 0.82x of off, two runs after 1.07x and 1.10x.
ONOFF_ROUNDS = 6  # (even: each side first as often)
# Usage on vs off also with both berthds loaded at the same moment, beside a control pair of
# two berthds alike: alternated rounds met the box's 2x swings one side at a time.
AT_ONCE_ROUNDS = 6
FRESH_ROUNDS = 4  # (even) per pair of fresh berthds, with --fresh N
FRESH_WRK_S = 2  # (each round's wrk, there: many short rounds over many processes)
AT_ONCE_CLIENTS = 32
AT_ONCE_S = 3
STREAM_ROUNDS = 9  # (one round is 2 x ~0.8 s; this box has hiccups of tens of ms)
SENT_AT = re.compile(rb'"sent_at": ([0-9.]+)')
WORDS = 10  # + "echo:" and the usage chunk: 12 chunks a stream
# The streams begin over this many seconds, on both sides alike: all 500 are running from
# then until the first ends (12 chunks 50 ms apart). Begun at once, the straight side's 500
# streams (the model times each from its start) sent each chunk in one burst the client
# read for 5-13 ms, while berth's pacing of new calls spread its side's: the two were not
# measured alike.
RAMP_S = 0.25
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
command = ["/usr/bin/python3.11", "-u", "/srv/stream_model.py"]
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


def start_berthd(tmp: Path, name: str, accounting: bool, network: str | None = None
                 ) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    config = tmp / f"{name}.toml"
    config.write_text(CONFIG.format(port=port, state=tmp / name,
                                    network=network or f"berth-bench-{name}",
                                    image=build_image.DEFAULT_TAG,
                                    accounting=str(accounting).lower()))
    proc = subprocess.Popen([sys.executable, "-m", "berth.daemon.main", "--config", str(config),
                             "--stop-replicas-on-exit"], cwd=ROOT, stdout=subprocess.DEVNULL)
    return f"http://127.0.0.1:{port}", proc


class SseStream(asyncio.Protocol):
    """One streamed chat on a raw connection: each `"sent_at": T` in the events read is
    stamped with its arrival (the model's clock and ours are the host's).

    Why not aiohttp: its client's own work and collections (young ones of 3-7 ms and full ones
    of 18-28 ms, measured with gc.callbacks during these 500 streams) delayed the arrival
    stamps more than berth did, so the straight-to-the-replica side had a p99 of 5-25 ms.
    This client costs a regex per read and allocates next to nothing."""

    def __init__(self, request: bytes, ended: asyncio.Future[None]) -> None:
        self.request, self.ended = request, ended
        self.latencies: list[float] = []
        self.done = False  # "data: [DONE]" came
        self.status = b""  # the answer's status code
        self._tail = b""  # an event cut between two reads

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self.status = self.status or data[9:12]  # ("HTTP/1.1 200 OK": the head's first read)
        data = self._tail + data
        cut = data.rfind(b"\n\n") + 2
        whole, self._tail = data[:cut], data[cut:]
        self.latencies += [(now - float(m)) * 1000 for m in SENT_AT.findall(whole)]
        self.done = self.done or b"data: [DONE]" in whole

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result(None)


async def one_stream(url: str, after: float) -> list[float]:
    """Per-chunk latencies (ms) of one streamed chat begun `after` seconds from now; all
    chunks must come."""
    await asyncio.sleep(after)
    where = urllib.parse.urlsplit(url)
    body = json.dumps({"model": CHAT["model"],
                       "messages": [{"role": "user", "content": " ".join(["w"] * WORDS)}],
                       "stream": True, "stream_options": {"include_usage": True},
                       "interval_s": 0.05}).encode()
    request = (f"POST {where.path} HTTP/1.1\r\nHost: {where.netloc}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
               "Connection: close\r\n\r\n").encode() + body
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()
    transport, stream = await loop.create_connection(lambda: SseStream(request, ended),
                                                     where.hostname, where.port)
    try:
        await asyncio.wait_for(ended, 120)
    finally:
        transport.close()
    assert stream.status == b"200", stream.status
    assert stream.done and len(stream.latencies) == WORDS + 2, (stream.done,
                                                               len(stream.latencies))
    return stream.latencies


async def streams(url: str) -> tuple[list[float], list[float]]:
    """Per-chunk latencies of all chunks, and of all but each stream's first. The client's
    own collector is off meanwhile: its collections (gen1 of 1-3.5 ms, gen2 of ~30 ms, seen
    with gc.callbacks in this process during the rounds) delayed the arrival stamps of
    whichever side was being measured, berth or direct."""
    gc.collect()
    gc.disable()
    try:
        results = await asyncio.gather(*(one_stream(url, i * RAMP_S / STREAMS)
                                         for i in range(STREAMS)))
    finally:
        gc.enable()
    return [lat for one in results for lat in one], [lat for one in results for lat in one[1:]]


Target = tuple[str, int]  # a URL, and the pid of the berthd that serves it


@dataclass
class Side:
    rps: float
    p50: float
    cpu_us: float  # berthd's CPU per call, microseconds
    runs: str  # every round's requests/s of both sides, "a/b, a/b, ..."


def berthd_cpu_ns(pid: int) -> int:
    """CPU time a process has run so far, all its threads, in ns (schedstat: finer than
    /proc/PID/stat's 10 ms ticks)."""
    total = 0
    for thread in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # (a thread that ended meanwhile)
            total += int((thread / "schedstat").read_text().split()[0])
    return total


def timed_wrk(url: str, pid: int, clients: int, lua: str) -> dict[str, float]:
    """wrk, plus the CPU microseconds berthd (`pid`) spent per call meanwhile."""
    before = berthd_cpu_ns(pid)
    result = wrk(url, clients, lua)
    result["cpu_us"] = (berthd_cpu_ns(pid) - before) / 1000 / result["calls"]
    return result


def alternated(a: Target, b: Target, clients: int, lua: str, rounds: int = ROUNDS
               ) -> tuple[Side, Side]:
    """wrk on `a` and `b` in turn, `rounds` times each (the box's noise falls on both alike),
    a first in even rounds and b first in odd ones (with a always first, the second side won
    13 of 15 on/off pairs in three runs). The median requests/s, p50 and berthd CPU per call
    of each."""
    runs = []
    for i in range(rounds):
        if i % 2 == 0:
            runs.append((timed_wrk(*a, clients, lua), timed_wrk(*b, clients, lua)))
        else:
            b_first = timed_wrk(*b, clients, lua)
            runs.append((timed_wrk(*a, clients, lua), b_first))
    own = statistics.median(x["rps"] / y["rps"] for x, y in runs)  # (each pair side by side)
    text = ", ".join(f"{x['rps']:.0f}/{y['rps']:.0f}" for x, y in runs) + \
        f"; rounds' own ratios: median {own:.2f}x"
    first, second = ([r[i] for r in runs] for i in (0, 1))
    return side(first, text), side(second, text)


def side(runs: list[dict[str, float]], text: str) -> Side:
    return Side(statistics.median(r["rps"] for r in runs),
                statistics.median(r["p50"] for r in runs),
                statistics.median(r["cpu_us"] for r in runs), text)


def at_once(a: Target, b: Target, lua: str) -> tuple[float, float]:
    """wrk on `a` and `b` at the same moment (AT_ONCE_CLIENTS each): `a`'s requests/s over
    `b`'s, and the throughput `a`'s CPU per call buys over `b`'s (b's us / a's us)."""
    before = [berthd_cpu_ns(pid) for _, pid in (a, b)]
    loads = [subprocess.Popen(["wrk", "-t", "1", "-c", str(AT_ONCE_CLIENTS), "-d",
                               f"{AT_ONCE_S}s", "-s", lua, url], stdout=subprocess.PIPE,
                              text=True) for url, _ in (a, b)]
    outs = [load.communicate()[0] for load in loads]
    calls = [int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
             for out in outs]
    cpu = [(berthd_cpu_ns(pid) - was) / n for (_, pid), was, n in zip((a, b), before, calls,
                                                                      strict=True)]
    return calls[0] / calls[1], cpu[1] / cpu[0]


def loaded_at_once(pairs: dict[str, tuple[Target, Target]], lua: str) -> list[str]:
    """Each pair at once, AT_ONCE_ROUNDS times in turn; a row per pair: the medians of its
    rounds' ratios. Both sides of a pair meet the box's swings at the same moment, and
    the control pair (two berthds alike) shows what is left of the box's own noise."""
    ratios: dict[str, list[tuple[float, float]]] = {name: [] for name in pairs}
    for _ in range(AT_ONCE_ROUNDS):
        for name, (a, b) in pairs.items():
            ratios[name].append(at_once(a, b, lua))
    rows = []
    for name, found in ratios.items():
        rps, cpu = (statistics.median(r[i] for r in found) for i in (0, 1))
        each = ", ".join(f"{r[0]:.2f}" for r in found)
        rows.append(f"| {name}, {AT_ONCE_CLIENTS} clients each, loaded at once | {rps:.2f}x "
                    f"req/s | {cpu:.2f}x by CPU per call | medians of {AT_ONCE_ROUNDS} "
                    f"rounds; req/s ratios: {each} |")
    return rows


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def row(name: str, a: float, b: float, unit: str, note: str) -> str:
    return f"| {name} | {a:.2f} {unit} | {b:.2f} {unit} | {note} |"


async def measure(on: Target, off: Target, on2: Target, lua: str) -> list[str]:
    for berthd in (on, off, on2):
        await wait_ready(berthd[0], "llm")
    rows = []
    for clients in (1, 64):
        front, invoke = alternated((f"{on[0]}/v1/chat/completions", on[1]),
                                   (f"{on[0]}/invoke/llm/v1/chat/completions", on[1]),
                                   clients, lua)
        rows.append(row(f"requests/s, {clients} client(s)", front.rps, invoke.rps, "/s",
                        f"/v1 / invoke = {front.rps / invoke.rps:.2f}x"
                        + (" (target >= 0.9x)" if clients == 64 else "")
                        + f"; runs: {front.runs}"))
        rows.append(row(f"p50 latency, {clients} client(s)", front.p50, invoke.p50, "ms",
                        f"added {front.p50 - invoke.p50:.2f} ms"
                        + (" (target <= 0.3 ms)" if clients == 1 else "")))
        if clients == 64:
            rows.append(cpu_row("berthd CPU per call, 64 clients", front, invoke,
                                "/v1 / invoke"))
    counted, uncounted = alternated((f"{on[0]}/v1/chat/completions", on[1]),
                                    (f"{off[0]}/v1/chat/completions", off[1]),
                                    64, lua, ONOFF_ROUNDS)
    rows.append(row("requests/s, 64 clients, usage accounting on vs off", counted.rps,
                    uncounted.rps, "/s", f"on / off = {counted.rps / uncounted.rps:.2f}x"
                    f" (target >= 0.95x; runs on/off: {counted.runs})"))
    rows.append(cpu_row("berthd CPU per call, 64 clients, usage accounting on vs off",
                        counted, uncounted, "on / off"))
    v1 = "/v1/chat/completions"
    rows += loaded_at_once({
        "usage on / off (target >= 0.95x)": ((on[0] + v1, on[1]), (off[0] + v1, off[1])),
        "control: usage on / a second berthd with usage on": ((on[0] + v1, on[1]),
                                                               (on2[0] + v1, on2[1])),
    }, lua)
    rows += await stream_rows(on[0], await wait_ready(on[0], "llm"), STREAM_ROUNDS)
    return rows


def cpu_row(name: str, a: Side, b: Side, what: str) -> str:
    """berthd's CPU per call on both sides, as the throughput the same CPU buys (b / a): at
    full load berthd is the bottleneck, so this is the ratio its throughput comes to when
    the box's swings are left out."""
    return row(name, a.cpu_us, b.cpu_us, "us",
               f"{what} by CPU per call = {b.cpu_us / a.cpu_us:.2f}x (medians of the rounds)")


def fresh_pairs(tmp: Path, lua: str, pairs: int) -> list[str]:
    """`pairs` fresh pairs of berthds (accounting on, off), one pair at a time, each pair
    measured FRESH_ROUNDS rounds in turn at 64 clients: `/v1` against `/invoke` on the first,
    `/v1` on both. Why: one berthd's ratios differ from the next one's by more than the
    effects measured (twelve berthds of one tree gave 0.84-1.03 for `/v1` / `/invoke`), so a
    single pair says little; the rows are medians over processes."""
    data_plane.WRK_SECONDS = FRESH_WRK_S
    v1_invoke: list[tuple[float, float]] = []
    on_off: list[tuple[float, float]] = []
    for k in range(pairs):
        started = [start_berthd(tmp, f"fresh-{side}{k}", side == "on", f"berth-bench-f{side}")
                   for side in ("on", "off")]
        try:
            (on, on_proc), (off, off_proc) = started
            for base, _ in started:
                uvloop.run(wait_ready(base, "llm"))
            v1, v1_off = (f"{on}/v1/chat/completions", on_proc.pid), \
                (f"{off}/v1/chat/completions", off_proc.pid)
            front, invoke = alternated(v1, (f"{on}/invoke/llm/v1/chat/completions",
                                            on_proc.pid), 64, lua, FRESH_ROUNDS)
            counted, uncounted = alternated(v1, v1_off, 64, lua, FRESH_ROUNDS)
        finally:
            for _, proc in started:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
        v1_invoke.append((front.rps / invoke.rps, invoke.cpu_us / front.cpu_us))
        on_off.append((counted.rps / uncounted.rps, uncounted.cpu_us / counted.cpu_us))
    return [fresh_row(f"/v1 / invoke (target >= 0.9x), {pairs} fresh berthds", v1_invoke),
            fresh_row(f"usage on / off (target >= 0.95x), {pairs} fresh pairs", on_off)]


def fresh_row(name: str, ratios: list[tuple[float, float]]) -> str:
    rps, cpu = (statistics.median(r[i] for r in ratios) for i in (0, 1))
    each = ", ".join(f"{r[1]:.2f}" for r in ratios)
    return (f"| {name}, 64 clients | {rps:.2f}x req/s | {cpu:.2f}x by CPU per call | medians "
            f"over processes; each one's by CPU per call: {each} |")


async def only_streams(on: str, rounds: int) -> list[str]:
    return await stream_rows(on, await wait_ready(on, "llm"), rounds)


@dataclass
class StreamRound:
    via: list[float]  # per-chunk latencies through berth, ms
    direct: list[float]  # ... straight to the replica
    via_later: list[float]  # the same without each stream's first chunk
    direct_later: list[float]

    @property
    def added_p99(self) -> float:
        return p99(self.via) - p99(self.direct)


async def stream_round(on: str, replica: str) -> StreamRound:
    """500 streams through berth, then 500 straight to its replica (one after the other: the
    box's state falls on both alike)."""
    via, via_later = await streams(f"{on}/v1/chat/completions")
    direct, direct_later = await streams(f"http://{replica}/v1/chat/completions")
    return StreamRound(via, direct, via_later, direct_later)


async def stream_rows(on: str, replica: str, rounds: int) -> list[str]:
    """The 500 streams `rounds` times: each round's added p99, their median, and the chunks
    of all rounds pooled."""
    done = []
    for _ in range(rounds):
        done.append(await stream_round(on, replica))
        print(f"streams, round {len(done)}: added p99 {done[-1].added_p99:.2f} ms "
              f"(p99 {p99(done[-1].via):.2f} via, {p99(done[-1].direct):.2f} direct)",
              file=sys.stderr, flush=True)
    via, direct = [x for r in done for x in r.via], [x for r in done for x in r.direct]
    later = [x for r in done for x in r.via_later], [x for r in done for x in r.direct_later]
    each = ", ".join(f"{r.added_p99:.1f}" for r in done)
    median = statistics.median(r.added_p99 for r in done)
    return [
        row(f"{STREAMS} concurrent streams x {rounds}: per-chunk latency p50",
            statistics.median(via), statistics.median(direct), "ms",
            f"{len(via)} of {rounds * STREAMS * (WORDS + 2)} chunks arrived"),
        row(f"{STREAMS} concurrent streams: per-chunk latency p99, rounds pooled", p99(via),
            p99(direct), "ms", f"added {p99(via) - p99(direct):.2f} ms"),
        row(f"{STREAMS} concurrent streams: added p99, median of the rounds",
            median, 0.0, "ms", f"target <= 5 ms; rounds: {each}"),
        row(f"{STREAMS} concurrent streams: p99 without each first chunk, pooled",
            p99(later[0]), p99(later[1]), "ms", f"added {p99(later[0]) - p99(later[1]):.2f} ms"),
    ]


def main() -> int:
    _, proc_engine = engine_with_image()
    if "--streams" in sys.argv:
        with tempfile.TemporaryDirectory() as tmp_name:
            on, berthd = start_berthd(Path(tmp_name), "on", True)
            try:
                rounds = int(sys.argv[sys.argv.index("--streams") + 1])
                rows = uvloop.run(only_streams(on, rounds))
            finally:
                berthd.send_signal(signal.SIGTERM)
                berthd.wait(timeout=60)
        print_table("500 streams through berth (first column) and straight to the replica",
                    ("through berth", "direct"), rows)
        return 0
    if "--fresh" in sys.argv:
        with tempfile.TemporaryDirectory() as tmp_name:
            lua = Path(tmp_name) / "chat.lua"
            lua.write_text(LUA.format(body=json.dumps(CHAT)))
            rows = fresh_pairs(Path(tmp_name), str(lua),
                               int(sys.argv[sys.argv.index("--fresh") + 1]))
        print_table("berth OpenAI front door over fresh berthds", ("req/s", "CPU"), rows)
        return 0
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        lua = tmp / "chat.lua"
        lua.write_text(LUA.format(body=json.dumps(CHAT)))
        on, berth_on = start_berthd(tmp, "on", True)
        off, berth_off = start_berthd(tmp, "off", False)
        on2, berth_on2 = start_berthd(tmp, "on2", True)
        try:
            rows = uvloop.run(measure((on, berth_on.pid), (off, berth_off.pid),
                                      (on2, berth_on2.pid), str(lua)))
        finally:
            for proc in (berth_on, berth_off, berth_on2):
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
            if proc_engine is not None:
                proc_engine.terminate()
    print_table("berth OpenAI front door (first column) against the comparison (second column)",
                ("/v1 (usage on)", "/invoke, usage off, or direct"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
