"""The berth CLI: argv to API calls and option spellings as tables (no server), then against
a real berthd: every command group, exit codes, persistence."""

from __future__ import annotations

import argparse
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from berth.daemon import cli
from helpers import ROOT, SESSION, TEST_LABEL, Berthd, config_text

ADMIN = "cli-admin-token"

# --- argv -> (method, path, body), no server ---------------------------------------------------

ROUTES = [
    (["gpus"], ("GET", "/v1/gpus", None)),
    (["gpus", "cordon", "0", "--reason", "fan noise"],
     ("POST", "/v1/gpus/0/cordon", {"reason": "fan noise"})),
    (["gpus", "cordon", "GPU-1"], ("POST", "/v1/gpus/GPU-1/cordon", None)),
    (["gpus", "uncordon", "GPU-1"], ("POST", "/v1/gpus/GPU-1/uncordon", None)),
    (["gpus", "healthy", "2"], ("POST", "/v1/gpus/2/healthy", None)),
    (["events"], ("GET", "/v1/events", None)),
    (["events", "--endpoint", "m", "--since", "5"],
     ("GET", "/v1/events?endpoint=m&since=5.0", None)),
    (["endpoints", "ls"], ("GET", "/v1/endpoints", None)),
    (["endpoints", "get", "m"], ("GET", "/v1/endpoints/m", None)),
    (["endpoints", "get", "a b/../c?"], ("GET", "/v1/endpoints/a%20b%2F..%2Fc%3F", None)),
    (["endpoints", "delete", "m"], ("DELETE", "/v1/endpoints/m", None)),
    (["endpoints", "restart", "m"], ("POST", "/v1/endpoints/m/restart", None)),
    (["endpoints", "delete", "m", "--purge-cache"],
     ("DELETE", "/v1/endpoints/m?purge_cache=true", None)),
    (["endpoints", "scale", "m", "--min", "0"],
     ("PATCH", "/v1/endpoints/m", {"min_replicas": 0})),
    (["endpoints", "scale", "m", "--max", "3"],
     ("PATCH", "/v1/endpoints/m", {"max_replicas": 3})),
    (["endpoints", "scale", "m", "--min", "1", "--max", "2"],
     ("PATCH", "/v1/endpoints/m", {"min_replicas": 1, "max_replicas": 2})),
    (["tasks", "ls"], ("GET", "/v1/tasks", None)),
    (["tasks", "ls", "--endpoint", "m", "--status", "queued"],
     ("GET", "/v1/tasks?endpoint=m&status=queued", None)),
    (["tasks", "get", "t1"], ("GET", "/tasks/t1", None)),
    (["tasks", "counts"], ("GET", "/v1/tasks/counts", None)),
    (["tasks", "cancel", "t1"], ("DELETE", "/tasks/t1", None)),
    (["tokens", "create", "m"], ("POST", "/v1/endpoints/m/tokens", None)),
    (["tokens", "create", "m", "--rpm", "60", "--tpd", "100000"],
     ("POST", "/v1/endpoints/m/tokens", {"requests_per_minute": 60, "tokens_per_day": 100000})),
    (["tokens", "limit", "m", "k1", "--rpm", "0"],
     ("PATCH", "/v1/endpoints/m/tokens/k1", {"requests_per_minute": None})),
    (["usage"], ("GET", "/v1/usage?group_by=day", None)),
    (["audit"], ("GET", "/v1/audit", None)),
    (["audit", "--since", "5", "--actor", "admin", "--target", "llm"],
     ("GET", "/v1/audit?since=5.0&actor=admin&target=llm", None)),
    (["usage", "--since", "2026-12-01", "--endpoint", "m", "--token-id", "admin", "--group-by",
      "model"], ("GET", "/v1/usage?since=2026-12-01&endpoint=m&token=admin&group_by=model",
                 None)),
    (["tokens", "ls", "m"], ("GET", "/v1/endpoints/m/tokens", None)),
    (["tokens", "revoke", "m", "k1"], ("DELETE", "/v1/endpoints/m/tokens/k1", None)),
    (["secrets", "ls"], ("GET", "/v1/secrets", None)),
    (["secrets", "rm", "HF_TOKEN"], ("DELETE", "/v1/secrets/HF_TOKEN", None)),
    (["secrets", "set", "HF_TOKEN", "v"], ("PUT", "/v1/secrets/HF_TOKEN", {"value": "v"})),
    (["secrets", "set", "HF_TOKEN"], ("PUT", "/v1/secrets/HF_TOKEN", {"value": "from stdin"})),
]


@pytest.mark.parametrize(("argv", "expected"), ROUTES, ids=[" ".join(a) for a, _ in ROUTES])
def test_route_table(argv: list[str], expected: tuple[str, str, Any],
                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("from stdin\n"))
    method, path, body, render = cli.route(cli.parser().parse_args(argv))
    assert (method, path, body) == expected
    assert callable(render)


@pytest.mark.parametrize("argv", [["endpoints", "scale", "m"], ["tokens", "limit", "m", "k1"]])
def test_a_change_without_values_is_a_usage_error(argv: list[str]) -> None:
    with pytest.raises(cli.CliError) as err:
        cli.route(cli.parser().parse_args(argv))
    assert err.value.code == cli.EXIT_USAGE


class FakeClient:
    """Records the calls run() makes instead of reaching a berthd."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    def call(self, method: str, path: str, body: Any = None) -> Any:
        self.calls.append((method, path, body))
        return {"generation": 1, "status": "idle", "gpus": []}

    def lines(self, path: str) -> list[str]:
        self.calls.append(("GET", path, None))
        return ["[r1] hello"]

    def download(self, path: str, dest: Any) -> int:
        self.calls.append(("GET", path, None))
        return 0


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    client = FakeClient()
    monkeypatch.setattr(cli, "make_client", lambda args: client)
    return client


SPECS = """
[endpoints.a]
image = "img:1"
[endpoints."b/c"]
image = "img:2"
gpus = 1
"""

STREAMED = [  # the commands route() leaves to run(): logs streams, apply PUTs each spec, backup
    (["backup", "b.db"], [("GET", "/v1/backup", None)]),  # saves (the real one: test_backup)
    (["logs", "m"], [("GET", "/v1/endpoints/m/logs?follow=false&tail=100", None)]),
    (["logs", "m", "-f", "--tail", "all", "--replica", "r1"],
     [("GET", "/v1/endpoints/m/logs?follow=true&tail=all&replica=r1", None)]),
    (["endpoints", "apply", "-f", "{specs}"],
     [("PUT", "/v1/endpoints/a", {"name": "a", "image": "img:1"}),
      ("PUT", "/v1/endpoints/b%2Fc", {"name": "b/c", "image": "img:2", "gpus": 1})]),
]


@pytest.mark.parametrize(("argv", "calls"), STREAMED, ids=[" ".join(a) for a, _ in STREAMED])
def test_logs_and_apply_table(argv: list[str], calls: list[tuple[str, str, Any]],
                              fake: FakeClient, tmp_path, capsys) -> None:
    specs = tmp_path / "specs.toml"
    specs.write_text(SPECS)
    assert cli.main([a.format(specs=specs) for a in argv]) == 0
    assert fake.calls == calls


def subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
                ) -> list[tuple[str, ...]]:
    """Every command the parser knows, as words: ("gpus",), ("endpoints", "ls"), ..."""
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not actions:
        return [prefix]
    return [found for name, sub in actions[0].choices.items()
            for found in subcommands(sub, (*prefix, name))]


def test_every_subcommand_is_in_a_table() -> None:
    commands = set(subcommands(cli.parser()))
    assert len(commands) == 25
    tabled = {c for c in commands for argv, _ in [*ROUTES, *STREAMED]
              if tuple(argv[:len(c)]) == c}
    assert tabled == commands


# --- global options before or after the subcommand --------------------------------------------

SPELLINGS = [
    (["--json", "endpoints", "ls"], ["endpoints", "ls", "--json"]),
    (["--json", "endpoints", "ls"], ["endpoints", "--json", "ls"]),
    (["--url", "http://h:8080", "gpus"], ["gpus", "--url", "http://h:8080"]),
    (["--url=http://h:8080", "gpus"], ["gpus", "--url=http://h:8080"]),
    (["--token", "T", "--config", "/c.toml", "tokens", "revoke", "m", "k1"],
     ["tokens", "revoke", "m", "k1", "--token", "T", "--config", "/c.toml"]),
    (["--token", "T", "tokens", "create", "m"], ["tokens", "create", "--token", "T", "m"]),
    (["--json", "--url", "http://h", "logs", "m", "-f"],
     ["logs", "m", "-f", "--json", "--url", "http://h"]),
    (["--url", "http://h", "events", "--since", "3"],
     ["events", "--since", "3", "--url", "http://h"]),
    (["--json", "tasks", "ls", "--status", "queued"],
     ["tasks", "ls", "--json", "--status", "queued"]),
    (["--json", "secrets", "set", "S", "v"], ["secrets", "set", "S", "v", "--json"]),
    (["--config", "/c.toml", "endpoints", "apply", "-f", "x.toml"],
     ["endpoints", "apply", "-f", "x.toml", "--config", "/c.toml"]),
    (["--json", "--token", "T", "endpoints", "scale", "m", "--min", "1"],
     ["endpoints", "--token", "T", "scale", "m", "--json", "--min", "1"]),
    (["gpus"], ["gpus"]),  # none given: the top-level defaults
]


@pytest.mark.parametrize(("before", "after"), SPELLINGS,
                         ids=[" ".join(a) for _, a in SPELLINGS])
def test_global_options_may_follow_the_subcommand(before: list[str], after: list[str]) -> None:
    assert cli.parser().parse_args(after) == cli.parser().parse_args(before)


def test_defaults_and_the_later_option_wins() -> None:
    args = vars(cli.parser().parse_args(["gpus"]))
    assert args == {"url": None, "token": None, "config": cli.DEFAULT_CONFIG, "json": False,
                    "command": "gpus", "action": None}
    args = cli.parser().parse_args(["--url", "http://a", "--token", "A", "endpoints",
                                    "--token", "B", "ls", "--url", "http://b"])
    assert (args.url, args.token, args.json) == ("http://b", "B", False)
    args = cli.parser().parse_args(["--token", "A", "endpoints", "--token", "B", "get", "m",
                                    "--token", "C"])
    assert args.token == "C"


def test_json_after_the_subcommand_prints_json(fake: FakeClient, capsys) -> None:
    assert cli.main(["gpus", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"generation": 1, "status": "idle",
                                                   "gpus": []}
    assert cli.main(["gpus"]) == 0
    assert capsys.readouterr().out.startswith("GPU  NAME")


def test_url_token_and_config_after_the_subcommand_reach_the_client(
        monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("BERTH_URL", "http://env:1")
    monkeypatch.setenv("BERTH_TOKEN", "env-token")
    client = cli.make_client(cli.parser().parse_args(
        ["gpus", "--url", "http://h:8080/", "--token", "T", "--config", str(tmp_path / "no")]))
    assert (client.url, client.token) == ("http://h:8080", "T")
    monkeypatch.delenv("BERTH_URL")
    monkeypatch.delenv("BERTH_TOKEN")
    (tmp_path / "admin-token").write_text("from-config\n")
    config = tmp_path / "config.toml"
    config.write_text(f'[daemon]\nlisten = "0.0.0.0:9090"\n'
                      f'admin_token_file = "{tmp_path / "admin-token"}"\n')
    client = cli.make_client(cli.parser().parse_args(["endpoints", "ls", "--config",
                                                      str(config)]))
    assert (client.url, client.token) == ("http://127.0.0.1:9090", "from-config")


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


def test_usage_table_has_a_row_per_group_and_a_total() -> None:
    data = {"group_by": "model", "total": {"calls": 5, "errors": 1, "prompt_tokens": 30,
                                           "completion_tokens": 40},
            "usage": [{"endpoint": "llm", "model": "llama", "calls": 4, "errors": 1,
                       "prompt_tokens": 20, "completion_tokens": 40},
                      {"endpoint": "emb", "model": "bge", "calls": 1, "errors": 0,
                       "prompt_tokens": 10, "completion_tokens": 0}]}
    lines = cli.show_usage(data).splitlines()
    assert lines[0].split() == ["ENDPOINT", "MODEL", "CALLS", "ERRORS", "PROMPT", "COMPLETION"]
    assert lines[1].split() == ["llm", "llama", "4", "1", "20", "40"]
    assert lines[-1].split() == ["total", "5", "1", "30", "40"]


class OddServer(http.server.BaseHTTPRequestHandler):
    """Answers 200 with what berthd never sends: a login page, nulls, an empty object."""

    ANSWERS = {"/v1/gpus": b"<html>please log in</html>", "/v1/endpoints": b'{"endpoints": null}',
               "/v1/endpoints/m": b"{}"}

    def do_GET(self) -> None:
        body = self.ANSWERS.get(self.path, b"{}")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("argv", [["gpus"], ["endpoints", "ls"], ["endpoints", "get", "m"]])
def test_an_answer_that_is_not_berthds_is_an_error_not_a_traceback(argv, capsys) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OddServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        code = cli.main([*argv, "--url", f"http://127.0.0.1:{server.server_port}"])
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert code == cli.EXIT_API and err.startswith("error: ") and "--url" in err, err
