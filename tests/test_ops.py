"""The Grafana dashboard and the Prometheus alert rules under ops/: promtool accepts the rules
and their unit tests pass, the dashboard is Grafana JSON with a data source variable, and every
metric name either of them uses is one a live berthd exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import ROOT, Berthd, config_text

OPS = ROOT / "ops"
NAME = re.compile(r"\b(berth_[a-z_]+|up)\b")
PROMETHEUS_MADE = {"up"}  # written by Prometheus itself for each scrape target


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool (Debian's prometheus package) is needed: scripts/test installs it",
                    pytrace=False)
    return subprocess.run([tool, *args], cwd=OPS, capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_rules_and_their_unit_tests_pass():
    checked = promtool("check", "rules", "prometheus-rules.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 7 rules found" in checked.stdout
    tested = promtool("test", "rules", "prometheus-rules.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def dashboard_exprs() -> list[str]:
    board = json.loads((OPS / "grafana-dashboard.json").read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    exprs = [variables["endpoint"]["definition"]]
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        exprs += [t["expr"] for t in panel["targets"]]
    return exprs


def rule_exprs() -> list[str]:
    text = (OPS / "prometheus-rules.yml").read_text()
    return re.findall(r"^\s+expr: (.+)$", text, flags=re.M)


def exported_names(text: str) -> set[str]:
    """Every series name /metrics declares, with a histogram's and a counter's suffixes."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        suffixes = {"histogram": ("_bucket", "_count", "_sum"), "counter": ("_total",)}
        names |= {family.name + s for s in suffixes.get(family.type, ())}
    return names


def test_every_metric_the_dashboard_and_rules_use_is_exported(tmp_path, network, model_image,
                                                              docker_host):
    used = {n for e in dashboard_exprs() + rule_exprs() for n in NAME.findall(e)}
    assert len(used) >= 18  # calls, latency, queue, replicas, starts, GPUs, tasks, disk...
    config = tmp_path / "config.toml"
    config.write_text(config_text(tmp_path / "state", network, model_image, {"m": {}}))
    d = Berthd(tmp_path, config)
    try:
        d.wait_message("READY=1")
        with urllib.request.urlopen(f"http://127.0.0.1:{d.port}/metrics") as resp:
            exported = exported_names(resp.read().decode())
    finally:
        d.close()
    assert used - PROMETHEUS_MADE <= exported, sorted(used - PROMETHEUS_MADE - exported)
    # and the check can fail: a name berthd does not export is caught
    assert "berth_made_up_total" not in exported
