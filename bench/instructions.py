"""Instructions per call in a real berthd, counted by callgrind: /v1 against /invoke to the same
replica, and /v1 with usage accounting on against off.

    .venv/bin/python bench/instructions.py      # about 2 min; needs valgrind and wrk
    .venv/bin/python bench/instructions.py --keep DIR   # and keep the dumps, for
    callgrind_annotate --inclusive=yes DIR/cg-on/cg.PID.N   # (where a call's count goes)

Why: the throughput rows of openai_front.py swing by a fifth between rounds on this box, and
a change that costs a call 5% does not show through that. An instruction count does not move
with the box's load: the same run twice agrees within about 1%. It found what the rounds could
not: a regex that was a twelfth of every /v1 call (bench/RESULTS.md, eighth session).

How: two berthds in turn (the config of openai_front.py: one lean replica; the second with
daemon.usage_accounting = false), each under `valgrind --tool=callgrind`. After a warm-up,
each window zeroes the counters (callgrind_control), runs wrk with one connection for
WINDOW_S, and dumps them; sides alternate ABBA. Windows without calls before and after give
the instructions berthd spends on its own (timers, readiness probes, the usage flush) per
second, taken off each window by its length. One connection: each call is handled alone, so
the count is the call's, not shared with others in one pass of the loop.

What it does not count: the kernel's work (callgrind sees user space only). Each call's
socket work is alike on both sides, so a ratio in CPU time is nearer 1 than the ratio here.
Prints a Markdown table; bench/RESULTS.md keeps the numbers of a run with this command.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "demo"))
sys.path.insert(0, str(ROOT / "bench"))
from openai_front import CHAT, CONFIG, LUA  # noqa: E402

import build_image  # noqa: E402
from data_plane import engine_with_image, free_port, print_table  # noqa: E402

WINDOW_S = 8
WARM_S = 3
V1 = "v1/chat/completions"
INVOKE = "invoke/llm/v1/chat/completions"


class CountedBerthd:
    """One berthd under callgrind, its counts read a window at a time."""

    def __init__(self, tmp: Path, name: str, accounting: bool, lua: Path) -> None:
        port = free_port()
        config = tmp / f"{name}.toml"
        config.write_text(CONFIG.format(port=port, state=tmp / name,
                                        network=f"berth-bench-cg-{name}",
                                        image=build_image.DEFAULT_TAG,
                                        accounting=str(accounting).lower()))
        self.base, self.lua, self.out = f"http://127.0.0.1:{port}", lua, tmp / f"cg-{name}"
        self.out.mkdir()
        self.proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no",
             f"--callgrind-out-file={self.out}/cg.%p", sys.executable, "-m",
             "berth.daemon.main", "--config", str(config), "--stop-replicas-on-exit"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONHASHSEED": "0"})  # (each berthd hashes alike)
        self.windows = 0

    def ready(self) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.base}/v1/endpoints/llm", timeout=5) as r:
                    if any(rep["state"] == "ready" for rep in json.load(r)["replicas"]):
                        break
            except OSError:
                pass
            time.sleep(0.25)
        else:
            raise SystemExit("berthd under callgrind never had a ready replica")
        self.control("-i", "on")
        for path in (V1, INVOKE):
            self.wrk(path, WARM_S)

    def control(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(self.proc.pid)], check=True,
                       capture_output=True)

    def wrk(self, path: str, seconds: float) -> int:
        out = subprocess.run(["wrk", "-t", "1", "-c", "1", "-d", f"{seconds}s", "-s",
                              str(self.lua), f"{self.base}/{path}"],
                             capture_output=True, text=True, check=True).stdout
        found = re.search(r"(\d+) requests in", out)
        assert found is not None, out
        return int(found.group(1))

    def window(self, path: str | None) -> tuple[int, float, int]:
        """(instructions, seconds, calls) of one window: wrk on `path`, or idle."""
        self.control("-z")
        began = time.monotonic()
        calls = self.wrk(path, WINDOW_S) if path else 0
        if not path:
            time.sleep(WINDOW_S)
        seconds = time.monotonic() - began
        self.windows += 1
        self.control(f"--dump=w{self.windows}")
        return self.dumped(f"w{self.windows}"), seconds, calls

    def dumped(self, name: str) -> int:
        for _ in range(100):
            for path in self.out.glob("cg.*.*"):
                text = path.read_text(errors="replace")
                if f"desc: Trigger: dump {name}\n" in text:
                    found = re.search(r"^summary: (\d+)$", text, re.M)
                    if found:
                        return int(found.group(1))
            time.sleep(0.1)
        raise SystemExit(f"callgrind wrote no dump {name}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=180)


def per_call(berthd: CountedBerthd, order: list[str]) -> dict[str, list[float]]:
    """Instructions per call of each path in `order` (each window's own), idle taken off."""
    idle = [berthd.window(None)]
    windows = [(path, berthd.window(path)) for path in order]
    idle.append(berthd.window(None))
    rate = sum(i for i, _, _ in idle) / sum(s for _, s, _ in idle)
    counts: dict[str, list[float]] = {}
    for path, (instructions, seconds, calls) in windows:
        counts.setdefault(path, []).append((instructions - rate * seconds) / calls)
    return counts


def main() -> int:
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed: apt-get install valgrind")
    _, proc_engine = engine_with_image()
    build = subprocess.run([sys.executable, "-m", "berth.daemon.native_build", "status"],
                           cwd=ROOT, capture_output=True, text=True).stdout.strip()
    keep = Path(sys.argv[sys.argv.index("--keep") + 1]) if "--keep" in sys.argv else None
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        lua = tmp / "chat.lua"
        lua.write_text(LUA.format(body=json.dumps(CHAT)))
        counts = {}
        for name, accounting, order in (("on", True, [V1, INVOKE, INVOKE, V1]),
                                        ("off", False, [V1, V1])):
            berthd = CountedBerthd(tmp, name, accounting, lua)
            try:
                berthd.ready()
                counts[name] = per_call(berthd, order)
            finally:
                berthd.stop()
            if keep is not None:
                shutil.copytree(berthd.out, keep / berthd.out.name, dirs_exist_ok=True)
    if proc_engine is not None:
        proc_engine.terminate()
    v1, invoke = statistics.mean(counts["on"][V1]), statistics.mean(counts["on"][INVOKE])
    off = statistics.mean(counts["off"][V1])

    def each(values: list[float]) -> str:
        return ", ".join(f"{v / 1000:.1f}k" for v in values)
    print_table(f"Instructions per call in berthd, one connection, callgrind ({build})",
                ("first", "second"), [
                    f"| /v1 (usage on) vs /invoke (usage on) | {v1 / 1000:.1f}k | "
                    f"{invoke / 1000:.1f}k | /v1 / invoke in calls per instruction = "
                    f"{invoke / v1:.3f}x (windows: "
                    f"{each(counts['on'][V1])} / {each(counts['on'][INVOKE])}) |",
                    f"| /v1, usage on vs off | {v1 / 1000:.1f}k | {off / 1000:.1f}k | "
                    f"on / off in calls per instruction = {off / v1:.3f}x (windows: "
                    f"{each(counts['on'][V1])} / "
                    f"{each(counts['off'][V1])}) |"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
