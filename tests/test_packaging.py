"""`pip install .` gives working `berthd` and `berth` commands, outside the source tree, and
berth installs beside python-daemon in one venv without breaking it (its modules are berth.*)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from helpers import ROOT


def test_pip_install_gives_working_commands_beside_python_daemon(tmp_path):
    venv = tmp_path / "venv"
    shutil.rmtree(ROOT / "build", ignore_errors=True)  # setuptools would ship stale modules
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
           "--disable-pip-version-check"]
    # python-daemon first, then berth into the same venv: before, berth's top-level `daemon`
    # package overwrote python-daemon's files (daemon.DaemonContext -> AttributeError).
    subprocess.run([*pip, "python-daemon"], check=True, timeout=300, capture_output=True)
    subprocess.run([*pip, str(ROOT)], check=True, timeout=600, capture_output=True)
    config = tmp_path / "c.toml"
    config.write_text('[gpu]\nsource = "none"\n[endpoints.a]\nimage = "x"\n')
    out = subprocess.run([str(venv / "bin" / "berthd"), "check-config", str(config)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "ok (1 endpoint(s))" in out.stdout
    out = subprocess.run([str(venv / "bin" / "berth"), "--url", "http://127.0.0.1:9", "gpus"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 3 and "cannot reach berthd" in out.stderr
    # Both packages work in one process, and the installed modules are the ones that ran.
    check = ("import daemon, berth.daemon.config as c; "
             "assert daemon.DaemonContext and c.EndpointSpec; "
             "print(daemon.__file__); print(c.__file__)")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", check], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    python_daemon, berth_config = (Path(p) for p in out.stdout.split())
    site = python_daemon.parent.parent
    assert python_daemon == site / "daemon" / "__init__.py"
    assert berth_config == site / "berth" / "daemon" / "config.py"
    assert not (site / "daemon" / "config.py").exists()  # nothing of berth's in there
    # The status page ships in the package (no build step, nothing fetched at run time).
    assert sorted(p.name for p in (site / "berth" / "daemon" / "ui").iterdir()) == [
        "app.js", "index.html", "style.css"]
