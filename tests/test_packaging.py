"""`pip install .` gives working `berthd` and `berth` commands, outside the source tree, and
berth installs beside python-daemon without breaking it (berth's modules are berth.*)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from helpers import ROOT


def test_pip_install_gives_working_commands_beside_python_daemon(tmp_path):
    target = tmp_path / "site"
    shutil.rmtree(ROOT / "build", ignore_errors=True)  # setuptools would ship stale modules
    # python-daemon first, then berth into the same place: before, berth's top-level `daemon`
    # package overwrote python-daemon's files (daemon.DaemonContext -> AttributeError).
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target),
                    "python-daemon"], check=True, timeout=300, capture_output=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade",
                    "--target", str(target), str(ROOT)], check=True, timeout=300,
                   capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    config = tmp_path / "c.toml"
    config.write_text('[gpu]\nsource = "none"\n[endpoints.a]\nimage = "x"\n')
    out = subprocess.run([str(target / "bin" / "berthd"), "check-config", str(config)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "ok (1 endpoint(s))" in out.stdout
    out = subprocess.run([str(target / "bin" / "berth"), "--url", "http://127.0.0.1:9",
                          "gpus"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 3 and "cannot reach berthd" in out.stderr
    # Both packages work in one process, and the installed modules are the ones that ran.
    check = ("import daemon, berth.daemon.config as c; "
             "assert daemon.DaemonContext and c.EndpointSpec; "
             "print(daemon.__file__); print(c.__file__)")
    out = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    python_daemon, berth_config = out.stdout.split()
    assert python_daemon == str(target / "daemon" / "__init__.py")
    assert berth_config == str(target / "berth" / "daemon" / "config.py")
    assert not (target / "daemon" / "config.py").exists()  # nothing of berth's in there
