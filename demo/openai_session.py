"""An openai SDK session against a real berthd: what the OpenAI front door looks like to a user.

    .venv/bin/python demo/openai_session.py     # about 30 s; needs Docker (or starts a dockerd)

Starts berthd (admin token, the demo image, GPUs none) with two endpoints: `embed` (model
demo-embed, always on) and `llm` (model demo-chat, upstream name /models/demo-chat, scaled to
zero, its model loading for LOAD_S seconds, a keep-alive comment every 0.5 s). Then, with
the openai SDK: the model list, a streamed chat at the cold llm read raw (the SDK drops SSE
comments, so the keep-alive lines are shown as they came), a chat, a stream with usage,
embeddings, a model that does not exist (NotFoundError), a token over its requests per
minute (RateLimitError), and `berth usage` after it all. Prints each step; exits 1 if one
did not go as shown. The closing note of issue 10 quotes its output.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "demo"))
import build_image  # noqa: E402
import engine  # noqa: E402

ADMIN = "admin-secret"
LOAD_S = 2.0
CONFIG = """
[daemon]
listen = "127.0.0.1:{port}"
state_dir = "{state}"
log_level = "warning"
[docker]
network = "berth-openai-demo"
stop_timeout_s = 1.0
[gpu]
source = "none"
[endpoints.embed]
image = "{image}"
models = ["demo-embed"]
min_replicas = 1
readiness = {{ path = "/health", period_s = 0.2 }}
[endpoints.llm]
image = "{image}"
models = ["demo-chat"]
upstream_model = "/models/demo-chat"
min_replicas = 0
stream_keepalive_s = 0.5
env = {{ LOAD_S = "{load_s}" }}
readiness = {{ path = "/health", period_s = 0.2 }}
"""


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(base: str, deadline_s: float = 60.0) -> None:
    until = time.monotonic() + deadline_s
    while time.monotonic() < until:
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("berthd did not come up")


def cold_stream(base: str) -> list[str]:
    """A streamed chat at the cold llm, its lines as they came (keep-alive comments too)."""
    body = json.dumps({"model": "demo-chat", "stream": True,
                       "messages": [{"role": "user", "content": "hello from a cold start"}]})
    request = urllib.request.Request(f"{base}/v1/chat/completions", data=body.encode(),
                                     headers={"Authorization": f"Bearer {ADMIN}",
                                              "Content-Type": "application/json"})
    started, lines = time.monotonic(), []
    with urllib.request.urlopen(request, timeout=60) as answer:
        for raw in answer:
            line = raw.decode().rstrip("\n")
            if line:
                lines.append(f"{time.monotonic() - started:5.2f} s  {line[:100]}")
    return lines


def session(base: str) -> list[str]:
    """Every step, printed as it goes; what went other than shown, returned."""
    wrong: list[str] = []
    sdk = openai.OpenAI(base_url=f"{base}/v1", api_key=ADMIN, max_retries=0)
    until = time.monotonic() + 60
    while sdk.models.retrieve("demo-embed").model_extra["berth"]["state"] != "ready":
        if time.monotonic() > until:
            raise SystemExit("the always-on embed endpoint did not get ready")
        time.sleep(0.2)
    models = sdk.models.list()
    print("models.list():", [(m.id, m.model_extra["berth"]["state"]) for m in models.data])
    print("a streamed chat at the cold llm (raw lines, seconds since sent):")
    lines = cold_stream(base)
    print("\n".join(f"  {line}" for line in lines))
    if not any(": berth: starting" in line for line in lines):
        wrong.append("no keep-alive comment during the cold start")
    reply = sdk.chat.completions.create(model="demo-chat",
                                        messages=[{"role": "user", "content": "hi there"}])
    print("chat:", reply.model, repr(reply.choices[0].message.content), reply.usage)
    if reply.model != "demo-chat":
        wrong.append(f"chat answered as model {reply.model!r}")
    chunks = list(sdk.chat.completions.create(
        model="demo-chat", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "count these words"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    print(f"stream: {len(chunks)} chunks, {text!r}, last usage {chunks[-1].usage}")
    vectors = sdk.embeddings.create(model="demo-embed", input="one two")
    print("embeddings:", len(vectors.data), "vectors of", len(vectors.data[0].embedding),
          "usage", vectors.usage)
    try:
        sdk.chat.completions.create(model="no-such-model", messages=[])
        wrong.append("an unknown model did not raise")
    except openai.NotFoundError as exc:
        print("unknown model:", type(exc).__name__, exc.status_code, exc.code, exc.message)
    token = berth_json("tokens", "create", "llm", "--rpm", "1")
    limited = openai.OpenAI(base_url=f"{base}/v1", api_key=token["token"], max_retries=0)
    limited.chat.completions.create(model="demo-chat", messages=[{"role": "user",
                                                                  "content": "once"}])
    try:
        limited.chat.completions.create(model="demo-chat", messages=[{"role": "user",
                                                                      "content": "twice"}])
        wrong.append("a second call in a minute at --rpm 1 did not raise")
    except openai.RateLimitError as exc:
        print(f"token {token['id']} at --rpm 1, second call:", type(exc).__name__,
              exc.status_code, exc.code, "Retry-After", exc.response.headers.get("Retry-After"))
    return wrong


BASE_ARGS: list[str] = []


def berth_cli(*args: str) -> str:
    return subprocess.run([str(Path(sys.executable).parent / "berth"), *BASE_ARGS, *args],
                          check=True, capture_output=True, text=True).stdout


def berth_json(*args: str) -> dict[str, object]:
    return dict(json.loads(berth_cli(*args, "--json")))


def main() -> int:
    host = engine.existing_engine()
    dockerd = None
    if host is None:
        host, dockerd = engine.start_dockerd(Path("/tmp/berth-demo-docker"))
    os.environ["DOCKER_HOST"] = host
    import docker
    build_image.ensure_image(docker.DockerClient(base_url=host, version="auto"),
                             build_image.DEFAULT_TAG)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    BASE_ARGS[:] = ["--url", base, "--token", ADMIN]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp, "config.toml")
        config.write_text(CONFIG.format(port=port, state=f"{tmp}/state", load_s=LOAD_S,
                                        image=build_image.DEFAULT_TAG))
        berthd = subprocess.Popen([sys.executable, "-m", "berth.daemon.main", "--config",
                                   str(config), "--stop-replicas-on-exit"], cwd=ROOT,
                                  env={**os.environ, "BERTH_ADMIN_TOKEN": ADMIN})
        try:
            wait_healthy(base)
            wrong = session(base)
            time.sleep(1.5)  # (the usage ledger writes to SQLite every second)
            print("$ berth usage --group-by model")
            print(berth_cli("usage", "--group-by", "model"))
            print("$ berth usage --group-by token")
            print(berth_cli("usage", "--group-by", "token"))
        finally:
            berthd.send_signal(signal.SIGTERM)
            berthd.wait(timeout=60)
            if dockerd is not None:
                dockerd.terminate()
    for line in wrong:
        print("NOT AS SHOWN:", line)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
