"""Switching benchmark (issue 11): how long a call waits for a model that is not awake.

    .venv/bin/python bench/switching.py          # about 2 minutes on a 2-core machine

The demo model loads in LOAD_S = 5 s and wakes in WAKE_S = 0.5 s, really spending that time.
One run, one real berthd with static GPUs, measured side by side:
  - from sleeping: call to first byte against the wake time;
  - from zero: call to first byte against the container's own start-to-ready (docker SDK
    create+start with the same LOAD_S, then GET /health until 200);
  - two endpoints taking turns on one GPU through sleep and lending, called alternately 20
    times (each call finds the other one awake), against two plain scale-to-zero endpoints
    on one GPU (each switch evicts the other and loads from scratch).
Prints a Markdown table; bench/RESULTS.md keeps the numbers of a run with this command.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import docker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from data_plane import (  # noqa: E402
    engine_with_image,
    first_byte,
    free_port,
    own_start_to_ready,
    print_table,
)

LOAD_S, WAKE_S = 5.0, 0.5
SLEEP_TRIALS, ZERO_TRIALS, TURNS, PLAIN_TURNS = 5, 3, 20, 4
NETWORK = "berth-bench-switch"

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
source = "static"
[[gpu.devices]]
name = "Sleep GPU"
memory_mib = 81920
[[gpu.devices]]
name = "Swap GPU"
memory_mib = 81920
[[gpu.devices]]
name = "Plain GPU"
memory_mib = 81920
[defaults]
image = "{image}"
env = {{ LOAD_S = "{load}", WAKE_S = "{wake}" }}
readiness = {{ path = "/health", period_s = 0.05, timeout_s = 1.0 }}
liveness = {{ period_s = 5.0 }}
idle_timeout_s = 600.0
[endpoints.sleepy]
min_replicas = 1
gpus = 1
gpu_type = "Sleep"
sleep = {{ after_s = 1.0, wake_timeout_s = 10 }}
[endpoints.swap-a]
min_replicas = 1
gpus = 1
gpu_type = "Swap"
sleep = {{ after_s = 2.0, wake_timeout_s = 10 }}
[endpoints.swap-b]
gpus = 1
gpu_type = "Swap"
sleep = {{ after_s = 2.0, wake_timeout_s = 10 }}
[endpoints.plain-a]
gpus = 1
gpu_type = "Plain"
[endpoints.plain-b]
gpus = 1
gpu_type = "Plain"
{zero}
"""
ZERO = """
[endpoints.zero-{i}]
min_replicas = 0
"""


async def status(session: aiohttp.ClientSession, base: str, name: str) -> dict:
    async with session.get(f"{base}/v1/endpoints/{name}") as resp:
        return await resp.json()  # type: ignore[no-any-return]


async def wait_state(base: str, name: str, state: str, settle_s: float = 0.3) -> None:
    """Until the endpoint's replica is in `state`, plus `settle_s` (a sleep call in flight)."""
    async with aiohttp.ClientSession() as session:
        for _ in range(2400):
            try:
                view = await status(session, base, name)
            except aiohttp.ClientError:
                view = {"replicas": []}
            if any(r["state"] == state for r in view.get("replicas", [])):
                await asyncio.sleep(settle_s)
                return
            await asyncio.sleep(0.05)
    raise SystemExit(f"{name} never reached {state}")


async def call_ms(session: aiohttp.ClientSession, url: str) -> float:
    start = time.perf_counter()
    async with session.get(url) as resp:
        await resp.read()
        assert resp.status == 200, (url, resp.status)
    return (time.perf_counter() - start) * 1000


async def alternate(base: str, names: tuple[str, str], turns: int) -> list[float]:
    """Call the two endpoints in turn; each call's time in ms."""
    times = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for turn in range(turns):
            times.append(await call_ms(session, f"{base}/invoke/{names[turn % 2]}/echo"))
    return times


async def measure(base: str, client: docker.DockerClient, image: str) -> list[str]:
    rows = []
    await wait_state(base, "sleepy", "sleeping")
    woke = []
    for _ in range(SLEEP_TRIALS):
        woke.append(await first_byte(f"{base}/invoke/sleepy/echo"))
        await wait_state(base, "sleepy", "sleeping")
    m = statistics.median(woke)
    rows.append(f"| from sleeping: call to first byte | {m:.0f} ms | wake time "
                f"{WAKE_S * 1000:.0f} ms | added {m - WAKE_S * 1000:.0f} ms (target <= 100 ms) |")
    via, own = [], []
    for i in range(ZERO_TRIALS):
        own.append(await own_start_to_ready(client, image, {"LOAD_S": str(LOAD_S)}, NETWORK))
        via.append(await first_byte(f"{base}/invoke/zero-{i}/echo"))
    v, o = statistics.median(via), statistics.median(own)
    rows.append(f"| from zero: call to first byte | {v:.0f} ms | container start-to-ready "
                f"{o:.0f} ms | added {v - o:.0f} ms (target <= 100 ms) |")
    # Turns on one GPU: a loads and falls asleep; b's first call borrows a's GPU (a load).
    await wait_state(base, "swap-a", "sleeping")
    await alternate(base, ("swap-b", "swap-a"), 2)  # warm-up: b loads once, a wakes once
    turns = await alternate(base, ("swap-b", "swap-a"), TURNS)
    plain = await alternate(base, ("plain-a", "plain-b"), PLAIN_TURNS)
    t, p = statistics.median(turns), statistics.median(plain)
    rows.append(f"| two endpoints on one GPU, called alternately: p50 call | {t:.0f} ms "
                f"({TURNS} calls, sleep and lending; max {max(turns):.0f} ms) | {p:.0f} ms "
                f"({PLAIN_TURNS} calls, plain scale to zero) | {t / (WAKE_S * 1000):.2f} x wake "
                f"time (target <= 1.2 x); plain {p / (LOAD_S * 1000):.2f} x load time |")
    return rows


def main() -> int:
    client, proc_engine = engine_with_image()
    image = "berth-demo/model:latest"
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.toml"
        config.write_text(CONFIG.format(
            port=port, state=f"{tmp}/state", network=NETWORK, image=image, load=LOAD_S,
            wake=WAKE_S, zero="".join(ZERO.format(i=i) for i in range(ZERO_TRIALS))))
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
    print_table(f"berth switching, {os.cpu_count()} CPUs, demo model LOAD_S={LOAD_S:g} "
                f"WAKE_S={WAKE_S:g}", ("berth", "reference"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
