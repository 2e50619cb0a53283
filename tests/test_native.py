"""The data plane's hot modules compiled by mypyc (daemon/native.py): a build is used only
while it matches the sources, and the berthd this suite runs uses it (scripts/test builds it
before pytest, as a sysadmin's install does)."""

from __future__ import annotations

import json
import time

from berth.daemon.native import DIGEST, MODULES, OFF, compiled, source_digest, usable_build
from helpers import Berthd, config_text

BUILD = "run `.venv/bin/python -m berth.daemon.native_build` (scripts/test does) to build it"


def test_this_suite_runs_the_hot_modules_compiled():
    assert compiled() == list(MODULES), BUILD


def test_berthd_says_which_modules_run_compiled(tmp_path, network, model_image, docker_host):
    config = tmp_path / "config.toml"
    config.write_text(config_text(tmp_path / "state", network, model_image, {}))
    d = Berthd(tmp_path, config)
    try:
        d.wait_message("READY=1")
        for _ in range(100):  # (logged just after READY=1)
            lines = [json.loads(line) for line in
                     (tmp_path / "berthd.log").read_text().splitlines() if line.startswith("{")]
            if ready := [line for line in lines if line.get("event") == "berthd.ready"]:
                break
            time.sleep(0.05)
    finally:
        d.close()
    assert ready and ready[0]["compiled"] == list(MODULES), BUILD


def test_a_build_is_used_only_while_it_matches_the_sources(tmp_path, monkeypatch):
    monkeypatch.delenv(OFF, raising=False)
    root = tmp_path / "berth"
    (root / "daemon").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "daemon" / "front.py").write_text("x = 1\n")
    assert usable_build(root) is None  # never built
    build = root / "_native"
    build.mkdir()
    (build / DIGEST).write_text(source_digest(root) + "\n")
    (build / "made.py").write_text("")  # (the build's own files are not sources)
    assert usable_build(root) == build
    monkeypatch.setenv(OFF, "0")
    assert usable_build(root) is None  # turned off
    monkeypatch.delenv(OFF)
    (root / "daemon" / "front.py").write_text("x = 2\n")
    assert usable_build(root) is None  # a source edited since: never a stale build
    (root / "daemon" / "front.py").write_text("x = 1\n")
    (root / "daemon" / "new.py").write_text("")
    assert usable_build(root) is None  # a source added since
