"""/openapi.json describes what berthd serves, and an independent fuzzer (schemathesis) finds
no server error and no answer outside the schema against a real berthd."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

from berth.daemon.app import build_app
from berth.daemon.openapi import document
from berth.gpu import GpuAllocator
from berth.scheduler.callbacks import CallbackSender
from berth.scheduler.dispatch import Dispatcher, DispatchSettings
from berth.scheduler.egress import CallbackPolicy
from berth.scheduler.probes import Prober
from berth.scheduler.reconciler import Reconciler
from berth.scheduler.router import Router
from berth.scheduler.runtime import DockerRuntime
from berth.store import Store
from helpers import SESSION, Berthd, one_ready, static_gpus

ADMIN = "fuzz-admin-token"


async def test_document_lists_every_route_served(tmp_path):
    store = await Store.open(tmp_path)
    reconciler = Reconciler(store, GpuAllocator(static_gpus(1), store),
                            DockerRuntime(None, "unused"), Prober(), "env")
    router = Router(reconciler)
    callbacks = CallbackSender(store, b"k", 1, 1, CallbackPolicy([]))
    dispatcher = Dispatcher(store, router, tmp_path / "tasks", callbacks, DispatchSettings())
    app = build_app(reconciler, reconciler.allocator, dispatcher=dispatcher)
    served = set()
    for route in app.router.routes():
        path = re.sub(r"\{(\w+)(:[^}]*)?\}", r"{\1}", route.resource.canonical)
        if route.method in ("HEAD", "*"):
            methods = ["get", "post", "put", "patch", "delete"] if route.method == "*" else []
        else:
            methods = [route.method.lower()]
        if path == "/ui" or path.startswith("/ui/"):
            continue  # the status page: HTML for people, not part of the API
        if path in ("/invoke/{name}", "/async/{name}"):
            path += "/{path}"  # the same routes with an empty path
        served |= {(m, path) for m in methods}
    doc = document()
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert served == documented
    assert doc["components"]["schemas"]["EndpointSpec"]["required"] == ["image", "name"]
    # Public endpoints answer without a token: the data plane's token is optional, the control
    # API's is not.
    assert doc["paths"]["/tasks/{id}"]["get"]["security"] == [{"bearer": []}, {}]
    assert doc["paths"]["/v1/endpoints"]["get"]["security"] == [{"bearer": []}]
    links = doc["paths"]["/async/{name}/{path}"]["post"]["responses"]["202"]["links"]
    assert {link["operationId"] for link in links.values()} == {
        "get_/tasks/{id}", "get_/tasks/{id}/result", "delete_/tasks/{id}"}
    operation_ids = {op["operationId"] for ops in doc["paths"].values() for op in ops.values()}
    assert all(link["operationId"] in operation_ids for ops in doc["paths"].values()
               for op in ops.values() for answer in op["responses"].values()
               for link in answer.get("links", {}).values())
    await store.close()


def submit_task(port: int, endpoint: str) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/async/{endpoint}/echo",
                                     data=b"{}", method="POST")
    with urllib.request.urlopen(request, timeout=10) as answer:
        return str(json.loads(answer.read())["id"])


def test_schemathesis_finds_no_server_error_and_no_schema_violation(
        tmp_path, network, model_image, docker_host):
    st = shutil.which("st") or str(Path(sys.executable).parent / "st")
    config = tmp_path / "config.toml"
    config.write_text(f"""
[daemon]
listen = "127.0.0.1:0"
state_dir = "{tmp_path / 'state'}"
log_format = "json"
[docker]
network = "{network}"
pull = false
stop_timeout_s = 0.5
[gpu]
source = "static"
[[gpu.devices]]
name = "Test GPU"
memory_mib = 1024
[endpoints.echo]
image = "{model_image}"
min_replicas = 1
readiness = {{ path = "/health", period_s = 0.05 }}
labels = {{ "berth.test" = "{SESSION}" }}
[endpoints.open]
image = "{model_image}"
public = true
min_replicas = 1
readiness = {{ path = "/health", period_s = 0.05 }}
labels = {{ "berth.test" = "{SESSION}" }}
""")
    # The data plane fuzz calls the public endpoint and a real task: without them nearly every
    # generated call would stop at 404, and a public endpoint is where token checks must
    # read the document's optional security right.
    pinned = tmp_path / "data-plane.toml"  # not schemathesis.toml: st reads that by itself
    d = Berthd(tmp_path, config, ("--stop-replicas-on-exit",),
               env={"BERTH_ADMIN_TOKEN": ADMIN})
    try:
        d.token = ADMIN
        d.wait_message("READY=1")
        d.wait_endpoint("echo", one_ready)
        d.wait_endpoint("open", one_ready)
        task = submit_task(d.port, "open")
        pinned.write_text(f'[parameters]\n"path.name" = "open"\n"path.id" = "{task}"\n')
        url = f"http://127.0.0.1:{d.port}/openapi.json"
        common = [st, "run", url, "-H", f"Authorization: Bearer {ADMIN}", "--phases",
                  "examples,coverage,fuzzing,stateful", "--no-shrink", "--seed", "20261122",
                  # A followed log stream never ends, which a fuzzer can only read as a hang;
                  # tests/test_control.py covers logs.
                  "--exclude-path-regex", "logs$"]
        # Control API: every check but positive_data_acceptance. That check takes each
        # schema-valid body as one that must be accepted, but rules across fields
        # (min_replicas <= max_replicas, GPUs that this box has) are not JSON Schema.
        control = subprocess.run(
            [*common, "--include-tag", "control", "--include-tag", "health", "--checks",
             "all", "--exclude-checks", "positive_data_acceptance", "-n", "20",
             "--max-time", "30"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        # Data plane: 502/503/504 are answers berth gives on purpose (replica failure, no
        # capacity, timeout), so "no 5xx" does not apply there; no 500 is checked below.
        data = subprocess.run(
            [common[0], "--config-file", str(pinned), *common[1:], "--include-tag",
             "data plane", "--checks", "all", "--exclude-checks",
             "positive_data_acceptance,not_a_server_error", "-n", "10", "--max-time", "20"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    finally:
        d.signal(15)
        d.wait_exit()
        d.close()
    for run in (control, data):
        summary = run.stdout[run.stdout.find("WARNINGS"):]
        print(summary)
        assert run.returncode == 0, run.stdout[-6000:]
    log = [json.loads(line) for line in (tmp_path / "berthd.log").read_text().splitlines()
           if line.startswith("{")]
    # A 500 is logged at error level (by berth's error middleware or by aiohttp). aiohttp also
    # logs, at that level, HTTP it cannot parse (a NUL in a header): it answers those 400.
    errors = [e for e in log if e.get("level") == "error"
              and "BadHttpMessage: 400" not in e.get("exception", "")]
    assert errors == [], errors[:5]
