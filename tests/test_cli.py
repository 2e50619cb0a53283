"""The berth CLI against a real berthd: every command group, exit codes, persistence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from helpers import ROOT, SESSION, TEST_LABEL, Berthd, config_text

ADMIN = "cli-admin-token"


def berth(d: Berthd, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "berth.daemon.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, input=stdin,
                          env={**os.environ, "BERTH_URL": f"http://127.0.0.1:{d.port}",
                               "BERTH_TOKEN": ADMIN})


def invoke(d: Berthd, name: str, token: str) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{d.port}/invoke/{name}/echo",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def test_cli_session(tmp_path, network, model_image, docker_host):
    config = tmp_path / "config.toml"
    config.write_text(config_text(tmp_path / "state", network, model_image, {}))
    d = Berthd(tmp_path, config, env={"BERTH_ADMIN_TOKEN": ADMIN})
    d.token = ADMIN
    try:
        d.wait_message("READY=1")
        spec = tmp_path / "endpoints.toml"
        spec.write_text(f"""
[endpoints.alpha]
image = "{model_image}"
readiness = {{ path = "/health", period_s = 0.1 }}
labels = {{ "{TEST_LABEL}" = "{SESSION}" }}
[endpoints.beta]
image = "{model_image}"
max_replicas = 2
labels = {{ "{TEST_LABEL}" = "{SESSION}" }}
""")
        out = berth(d, "endpoints", "apply", "-f", str(spec))
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == ["applied alpha (generation 1, idle)",
                                           "applied beta (generation 1, idle)"]
        out = berth(d, "endpoints", "ls")
        rows = [line.split()[:3] for line in out.stdout.splitlines()]
        assert rows == [["NAME", "STATUS", "READY"], ["alpha", "idle", "0"],
                        ["beta", "idle", "0"]]
        assert [e["name"] for e in json.loads(berth(d, "--json", "endpoints", "ls")
                                              .stdout)["endpoints"]] == ["alpha", "beta"]
        out = berth(d, "endpoints", "scale", "alpha", "--min", "1", "--max", "2")
        assert out.returncode == 0 and out.stdout.startswith("alpha  ")
        body = d.wait_endpoint("alpha", lambda b: b["status"] == "ready")
        replica = body["replicas"][0]["id"]
        assert replica in berth(d, "endpoints", "get", "alpha").stdout

        token = berth(d, "tokens", "create", "alpha").stdout.strip()
        assert len(token) > 30
        listed = json.loads(berth(d, "--json", "tokens", "ls", "alpha").stdout)["tokens"]
        assert invoke(d, "alpha", token) == 200
        out = berth(d, "tokens", "revoke", "alpha", listed[0]["id"])
        assert out.stdout.strip() == f"revoked {listed[0]['id']}"
        assert invoke(d, "alpha", token) == 401

        out = berth(d, "secrets", "set", "HF_TOKEN", stdin="hf_cli_value\n")
        assert out.returncode == 0 and out.stdout.strip() == "stored HF_TOKEN"
        out = berth(d, "secrets", "ls")
        assert "HF_TOKEN" in out.stdout and "hf_cli_value" not in out.stdout

        out = berth(d, "logs", "alpha", "--tail", "all")
        assert out.returncode == 0
        assert out.stdout.splitlines()[0].startswith(f"[{replica}] model server listening")
        assert replica in berth(d, "gpus").stdout or "GPU" in berth(d, "gpus").stdout
        events = berth(d, "events", "--endpoint", "alpha").stdout
        assert "endpoint_created" in events and "ready" in events

        request = urllib.request.Request(f"http://127.0.0.1:{d.port}/async/alpha/echo",
                                         data=b"x", method="POST",
                                         headers={"Authorization": f"Bearer {ADMIN}"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            task = json.loads(resp.read())["id"]
        for _ in range(100):
            got = json.loads(berth(d, "--json", "tasks", "get", task).stdout)
            if got["status"] == "succeeded":
                break
            time.sleep(0.05)
        assert task in berth(d, "tasks", "ls", "--endpoint", "alpha").stdout
        out = berth(d, "tasks", "cancel", task)
        assert out.returncode == 1
        assert out.stderr.strip() == f"error: task_finished: task {task} already succeeded"

        out = berth(d, "endpoints", "delete", "beta")
        assert out.returncode == 0 and out.stdout.startswith("deleted beta; ")
        out = berth(d, "endpoints", "get", "beta")
        assert out.returncode == 1
        assert out.stderr.strip() == "error: endpoint_not_found: no endpoint named 'beta'"
        out = berth(d, "endpoints", "scale", "alpha")
        assert out.returncode == 2 and "scale needs --min and/or --max" in out.stderr
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps([{"name": "gamma", "image": "x", "gpus": -1}]))
        out = berth(d, "endpoints", "apply", "-f", str(bad))
        assert out.returncode == 1 and "gamma: error: invalid: gpus:" in out.stderr
        d.signal(signal.SIGTERM)
        assert d.wait_exit() == 0
    finally:
        d.close()

    # API-created endpoints come back after a restart; the tokens never reached the log.
    d2 = Berthd(tmp_path, config, ("--stop-replicas-on-exit",),
                env={"BERTH_ADMIN_TOKEN": ADMIN})
    d2.token = ADMIN
    try:
        d2.wait_message("READY=1")
        body = d2.endpoint("alpha")
        assert body["source"] == "api" and body["spec"]["max_replicas"] == 2
        assert d2.get("/v1/endpoints/beta")[0] == 404
        unreachable = subprocess.run([sys.executable, "-m", "berth.daemon.cli", "--url",
                                      "http://127.0.0.1:9", "gpus"], cwd=ROOT,
                                     capture_output=True, text=True, timeout=30)
        assert unreachable.returncode == 3
    finally:
        d2.signal(signal.SIGTERM)
        d2.wait_exit()
        d2.close()
    log = (tmp_path / "berthd.log").read_text()
    assert token not in log and ADMIN not in log and "hf_cli_value" not in log
