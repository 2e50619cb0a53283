"""The data plane's hot modules compiled by mypyc, used only while they match the sources.

    .venv/bin/python -m berth.daemon.native_build          # needs gcc, python3-dev and mypy
    .venv/bin/python -m berth.daemon.native_build status   # which modules run compiled

Why: every model call runs the same few modules (MODULES); compiled to C by mypyc (mypy's
compiler, from the same type annotations mypy checks), berth's own Python per call takes
about 40% less time (bench/front_cpu.py), which is most of what berth adds to a call
(bench/RESULTS.md).

How: daemon/native_build.py compiles MODULES into `berth/_native/` (beside the package: the
source tree or site-packages) and records a digest of every berth source file and of the
interpreter. `berth.daemon` (its __init__) calls `enable` first thing: when the digest still
matches, that folder goes first on the package's module path, so `berth.daemon.front` and the
others load compiled. Any edit to any berth source, or another Python, leaves the build unused
(never a stale one) until it is built again; BERTH_NATIVE=0 leaves it unused too. Everything
else, and these modules whenever the build is not used, runs as the Python it is.

Compiled code differs from Python in ways the type checker does not catch; in these modules:
- a value assigned in a class body and read through an instance must be annotated ClassVar;
- an exception pending in a `finally` (or a bare `raise` in an `except`) that awaits first
  is lost (mypyc issue 1114): catch it by name and `raise exc` after the await;
- `raise ... from exc` sets no __cause__ (only a logged traceback shows the difference);
- a function defined here and replaced at run time (a test's monkeypatch) is still called
  directly by compiled callers in these modules.
- mypyc before 2.2 leaked the left operand of every `bytes + bytes` (mypyc issue 1192): one
  or two blocks per call, a berthd under load growing ~6 MB a second; hence mypy >= 2.2, and
  tests/test_fast_call.py counts the blocks 3,000 calls leave.
The suite runs compiled (scripts/test builds first); tests/test_native.py checks that it does.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

MODULES = ("flow", "front", "front_messages", "fast_call", "upstream", "metering",
           "json_values")
DIGEST = "SOURCES"  # the digest file in the build folder
OFF = "BERTH_NATIVE"  # "0": never use the build


def berth_root() -> Path:
    """The `berth` package folder (not resolved: in the source tree its parts are links)."""
    return Path(__file__).parent.parent


def source_digest(root: Path) -> str:
    """One digest of every berth source file under `root` (links followed) and of this
    interpreter: what a build was made from."""
    digest = hashlib.sha256(sys.version.encode())
    files = sorted(Path(folder, name) for folder, dirs, names in os.walk(root, followlinks=True)
                   if "_native" not in Path(folder).relative_to(root).parts
                   for name in names if name.endswith(".py"))
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def usable_build(root: Path) -> Path | None:
    """The build folder of the `berth` package at `root`, if it is to be used: built from
    exactly these sources by this interpreter, and not turned off (BERTH_NATIVE=0)."""
    if os.environ.get(OFF) == "0":
        return None
    built = root / "_native"
    try:
        recorded = (built / DIGEST).read_text().strip()
    except OSError:
        return None  # never built: the modules run as Python
    return built if recorded == source_digest(root) else None


def enable(package_path: list[str]) -> bool:
    """Put the build first on `berth.daemon`'s module path if it is usable; True when it
    did. Called by berth/daemon/__init__.py, before any of MODULES is imported."""
    built = usable_build(berth_root())
    if built is None:
        return False
    package_path.insert(0, str(built / "berth" / "daemon"))
    sys.path.append(str(built))  # mypyc's shared library is a top-level module
    return True


def compiled() -> list[str]:
    """Which of MODULES run compiled in this process."""
    import importlib

    return [name for name in MODULES if not importlib.import_module(
        f"berth.daemon.{name}").__file__.endswith(".py")]  # type: ignore[union-attr]
