"""`pip install .` gives working `berthd` and `berth` commands, outside the source tree."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT


def test_pip_install_gives_working_commands(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
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
    # The installed modules are the ones that ran, not the checkout's.
    out = subprocess.run([sys.executable, "-c", "import daemon; print(daemon.__file__)"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith(str(target))
