"""Where berthd's time goes under load: py-spy samples of its main thread, summarised.

    from cpu_profile import record   # bench/ on sys.path
    print(record(pid, "http://127.0.0.1:PORT/invoke/fast/echo"))

py-spy (PyPI) samples at 250 Hz while wrk runs 64 connections; the summary is each function's
inclusive share of the event loop thread's samples (a function counts once per sample,
whatever its depth), then the innermost frames (where the time is spent itself).
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from data_plane import wrk

TOP = 30


def record(pid: int, url: str, seconds: int = 6) -> str:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stacks.txt"
        load = threading.Thread(target=wrk, args=(url, 64))
        load.start()
        subprocess.run([spy, "record", "--pid", str(pid), "--rate", "250", "--duration",
                        str(seconds), "--format", "raw", "--nonblocking", "--output", str(out)],
                       check=True, capture_output=True)
        load.join()
        return summary(out.read_text())


def summary(raw: str) -> str:
    """Inclusive share per function from py-spy's collapsed stacks ("a;b;c COUNT" lines)."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if "Runner.run" not in stack:
            continue  # the event loop's thread only: the others are berth's thread pools
        n = int(count)
        total += n
        frames = [f.split(" (")[0] + " " + _file(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    rows = [f"{100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(TOP)]
    leaves = [f"{100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(TOP)]
    return (f"{total} samples of the event loop's thread\ninclusive:\n" + "\n".join(rows)
            + "\nown (the innermost frame):\n" + "\n".join(leaves))


def _file(frame: str) -> str:
    inside = frame.partition(" (")[2].rstrip(")")
    parts = inside.split("/")
    return "/".join(parts[-2:]).split(":")[0]
