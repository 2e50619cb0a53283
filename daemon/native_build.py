"""Builds the compiled data-plane modules (see daemon/native.py, which decides their use).

    .venv/bin/python -m berth.daemon.native_build          # build, then say what runs compiled
    .venv/bin/python -m berth.daemon.native_build status
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from berth.daemon.native import DIGEST, MODULES, OFF, berth_root, compiled, source_digest

# The copy has no pyproject.toml: what its [tool.mypy] says of untyped libraries (the type
# check itself is scripts/test's mypy run; the build needs only what the compiler needs).
MYPY_FLAGS = ("--ignore-missing-imports",)


def build() -> None:
    """Compile MODULES into berth/_native/, then record what they were built from."""
    from mypyc.build import mypycify  # (mypy's: only the build needs it)
    from setuptools import setup

    root = berth_root()
    out = root / "_native"
    digest = source_digest(root)
    shutil.rmtree(out, ignore_errors=True)
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        # Compiled from a copy (links followed): mypy run in site-packages, where an install
        # keeps berth, would take every module there for one of the project's own.
        src = Path(tmp, "src")
        shutil.copytree(root, src / "berth",
                        ignore=shutil.ignore_patterns("_native", "__pycache__"))
        os.chdir(src)  # module names come from the paths: berth/daemon/front.py
        try:
            setup(name="berth-native", script_args=[
                "-q", "build_ext", "--build-lib", str(out), "--build-temp", f"{tmp}/build"],
                ext_modules=mypycify([*MYPY_FLAGS, *(f"berth/daemon/{name}.py"
                                                     for name in MODULES)],
                                     opt_level="3", target_dir=f"{tmp}/c"))
        finally:
            os.chdir(here)
    (out / DIGEST).write_text(digest + "\n")


def main() -> int:
    command = sys.argv[1] if len(sys.argv) > 1 else "build"
    if command == "build":
        build()  # (this process may hold an earlier build's path: a fresh one reports)
        return subprocess.run([sys.executable, "-m", "berth.daemon.native_build", "status"],
                              check=False).returncode
    if command != "status":
        print(f"usage: python -m berth.daemon.native_build [build|status] (not {command!r})",
              file=sys.stderr)
        return 2
    names = compiled()
    print(f"compiled: {', '.join(names)}" if names else
          f"not compiled: no build in {berth_root() / '_native'} that matches the sources"
          f" (or {OFF}=0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
