"""berth's data plane against a tuned nginx reverse proxy, on the same fast upstream, one run.

    .venv/bin/python bench/proxy_vs_nginx.py        # about 4 min; Debian's nginx-light and wrk
    .venv/bin/python bench/proxy_vs_nginx.py --profile   # also: where berthd's time goes (py-spy)
    .venv/bin/python bench/proxy_vs_nginx.py --floor     # also: bench/floor_proxy.py alongside

The upstream is Debian's nginx itself, in an image built offline from the host's binary and the
libraries `ldd` names (no registry): it answers a small JSON at /echo and serves a 1 GiB sparse
file at /big (from a host tmpfs file mounted into the container). It runs as a berth endpoint.
A host nginx (1 worker, HTTP/1.1 with upstream keepalive, buffering off both ways) proxies to
the same replica. Measured with wrk (a separate process) at 1 and 64 connections: direct, nginx
and berth, each five times in turn (medians; the box is shared and drifts), with the CPU time
the proxy process spent per call at 64 connections (from /proc); SSE time to first event
against the demo model's replica (python: nginx cannot stream events by itself); and bytes/s
of the 1 GiB body through each, read by curl.
Prints a Markdown table; bench/RESULTS.md keeps the numbers of a run with this command.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import docker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "demo"))
sys.path.insert(0, str(ROOT / "bench"))
import cpu_profile  # noqa: E402

import build_image  # noqa: E402
from data_plane import (  # noqa: E402
    WRK_SECONDS,
    engine_with_image,
    free_port,
    print_table,
    sse_times,
    wait_ready,
    wrk,
)

NGINX = "/usr/sbin/nginx"
IMAGE = "berth-bench/nginx-upstream:1"
BIG = 1024 ** 3
ROUNDS = 5  # alternations per side: this shared box drifts by tens of % within minutes
UPSTREAM_CONF = """daemon off;
worker_processes 1;
pid /tmp/nginx.pid;
error_log stderr warn;
events { worker_connections 4096; }
http {
    access_log off;
    sendfile on;
    keepalive_requests 10000000;
    client_body_temp_path /tmp/cb;
    proxy_temp_path /tmp/p;
    fastcgi_temp_path /tmp/f;
    uwsgi_temp_path /tmp/u;
    scgi_temp_path /tmp/s;
    server {
        listen 8080;
        location = /health { return 200 "ok\\n"; }
        location = /echo {
            default_type application/json;
            return 200 '{"ok": true, "from": "nginx"}';
        }
        location = /big { default_type application/octet-stream; alias /srv/big; }
    }
}
"""
PROXY_CONF = """daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/cb;
    proxy_temp_path {tmp}/p;
    fastcgi_temp_path {tmp}/f;
    uwsgi_temp_path {tmp}/u;
    scgi_temp_path {tmp}/s;
    upstream fast {{ server {fast}; keepalive 256; }}
    upstream sse {{ server {sse}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{port};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_buffering off;
        proxy_request_buffering off;
        location /fast/ {{ proxy_pass http://fast/; }}
        location /sse/ {{ proxy_pass http://sse/; }}
    }}
}}
"""
BERTH_CONF = """
[daemon]
listen = "127.0.0.1:{port}"
state_dir = "{state}"
log_format = "json"
log_level = "warning"
usage_accounting = false
max_connections_per_client = 4096
[docker]
network = "berth-nginx-bench"
stop_timeout_s = 1.0
[gpu]
source = "none"
[endpoints.fast]
image = "{image}"
min_replicas = 1
concurrency = 1024
queue_limit = 4096
volumes = ["{srv}:/srv:ro"]
readiness = {{ path = "/health", period_s = 0.05, timeout_s = 1.0 }}
liveness = {{ period_s = 5.0 }}
[endpoints.sse]
image = "{model}"
min_replicas = 1
concurrency = 16
readiness = {{ path = "/health", period_s = 0.05, timeout_s = 1.0 }}
liveness = {{ period_s = 5.0 }}
"""


def nginx_image(client: docker.DockerClient) -> None:
    """The upstream image: the host's nginx binary, its libraries and UPSTREAM_CONF."""
    with tempfile.TemporaryDirectory() as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        with tarfile.open(rootfs, "w") as tar:
            for directory, mode in (("tmp", 0o1777), ("srv", 0o755), ("etc", 0o755),
                                    ("etc/nginx", 0o755), ("var/log/nginx", 0o1777),
                                    ("var/lib/nginx", 0o1777)):
                info = tarfile.TarInfo(directory)
                info.type, info.mode = tarfile.DIRTYPE, mode
                tar.addfile(info)
            for path in [NGINX, *build_image.shared_libraries(NGINX)]:
                build_image.add_path(tar, path)
            for name, text in (("etc/nginx/nginx.conf", UPSTREAM_CONF),
                               ("etc/passwd", "nobody:x:65534:65534:nobody:/:/bin/false\n"),
                               ("etc/group", "nogroup:x:65534:\n")):
                data = text.encode()
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
        repo, _, tag = IMAGE.partition(":")
        client.api.import_image_from_file(str(rootfs), repository=repo, tag=tag, changes=[
            f'CMD ["{NGINX}", "-c", "/etc/nginx/nginx.conf"]', "USER 65534:65534",
            "EXPOSE 8080"])


def curl_rate(url: str) -> float:
    """Bytes/s of one GET of the whole body, read and dropped by curl."""
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w",
                          "%{speed_download} %{size_download}", url],
                         check=True, capture_output=True, text=True).stdout.split()
    rate, size = float(out[0]), int(float(out[1]))
    if size != BIG:
        raise SystemExit(f"{url}: {size} bytes, not {BIG}")
    return rate


def row(name: str, values: dict[str, float], unit: str, note: str) -> str:
    cells = " | ".join(f"{values[k]:.2f} {unit}" for k in ("direct", "nginx", "berth"))
    return f"| {name} | {cells} | {note} |"


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def timed_wrk(url: str, clients: int, pid: int | None) -> dict[str, float]:
    """wrk, plus the CPU microseconds `pid` spent per request meanwhile: in all, and its
    user part apart (the proxy's own work; the system part is mostly the same four system
    calls per call for every proxy, and swings with the box)."""
    before = cpu_seconds(pid) if pid else (0.0, 0.0)
    result = wrk(url, clients)
    if pid:
        after, calls = cpu_seconds(pid), result["rps"] * WRK_SECONDS
        result["user_us"] = (after[0] - before[0]) * 1e6 / calls
        result["cpu_us"] = result["user_us"] + (after[1] - before[1]) * 1e6 / calls
    return result


def alternated(urls: dict[str, str], clients: int, pids: dict[str, int]) -> dict[str, dict]:
    """Each of `urls` ROUNDS times, in turn (the box is shared and drifts: alternating
    spreads the drift over all); the run with the median req/s of each is kept."""
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in urls}
    for _ in range(ROUNDS):
        for k, u in urls.items():
            runs[k].append(timed_wrk(f"{u}/echo", clients, pids.get(k)))
    return {k: sorted(r, key=lambda x: x["rps"])[len(r) // 2] | {"all": [x["rps"] for x in r]}
            for k, r in runs.items()}


async def measure(base: str, proxy: str, pids: dict[str, int],
                  floor: str | None = None) -> list[str]:
    fast = await wait_ready(base, "fast")
    sse = await wait_ready(base, "sse")
    urls = {"direct": f"http://{fast}", "nginx": f"{proxy}/fast", "berth": f"{base}/invoke/fast"}
    rows = []
    for clients in (1, 64):
        runs = alternated(urls | ({"floor": floor} if floor and clients == 64 else {}),
                          clients, pids)
        if "floor" in runs:
            f = runs["floor"]
            rows.append(f"| floor proxy (bench/floor_proxy.py), 64 connections | | "
                        f"{f['rps']:.0f} /s, {f['cpu_us']:.1f} us/call | | floor / nginx = "
                        f"{f['rps'] / runs['nginx']['rps']:.2f}x; user {f['user_us']:.1f} "
                        "us/call; runs: "
                        f"{', '.join(f'{x:.0f}' for x in f['all'])} |")
        rps = {k: r["rps"] for k, r in runs.items()}
        pairs = list(zip(runs["nginx"]["all"], runs["berth"]["all"], strict=True))
        each = ", ".join(f"{n:.0f}/{b:.0f}" for n, b in pairs)
        # each round's berth against the nginx run just before it: the box drifts between
        # rounds, so the ratio within a round is the steadier figure
        by_round = statistics.median(b / n for n, b in pairs)
        rows.append(row(f"requests/s, {clients} connection(s)", rps, "/s",
                        f"berth / nginx = {rps['berth'] / rps['nginx']:.2f}x"
                        + (" (target >= 0.5x)" if clients == 64 else "")
                        + f"; medians of {ROUNDS} alternated runs, nginx/berth: {each}; "
                        f"median of the rounds' own ratios {by_round:.2f}x"))
        if clients == 64:
            rows.append(f"| CPU per call, 64 connection(s) | | {runs['nginx']['cpu_us']:.1f} us "
                        f"| {runs['berth']['cpu_us']:.1f} us | the proxy process's user + "
                        "system time over its calls (nginx: its worker); user alone: nginx "
                        f"{runs['nginx']['user_us']:.1f} us, berth {runs['berth']['user_us']:.1f}"
                        " us |")
        for p in ("p50", "p99"):
            lat = {k: r[p] for k, r in runs.items()}
            target = " (target <= 0.15 ms)" if clients == 1 and p == "p50" else ""
            rows.append(row(f"{p} latency, {clients} connection(s)", lat, "ms",
                            f"added by berth {lat['berth'] - lat['direct']:.2f} ms{target}, "
                            f"by nginx {lat['nginx'] - lat['direct']:.2f} ms"))
    query = "stream?n=10&interval=0.02"
    firsts = {}
    for k, u in {"direct": f"http://{sse}", "nginx": f"{proxy}/sse",
                 "berth": f"{base}/invoke/sse"}.items():
        firsts[k] = (await sse_times(f"{u}/{query}"))[0]
    rows.append(row("SSE time to first event (python model)", firsts, "ms",
                    f"added by berth {firsts['berth'] - firsts['direct']:.2f} ms, by nginx "
                    f"{firsts['nginx'] - firsts['direct']:.2f} ms"))
    rates = {k: statistics.median(curl_rate(f"{u}/big") for _ in range(3)) / 1e6
             for k, u in urls.items()}
    rows.append(row("1 GiB body, MB/s (median of 3)", rates, "MB/s",
                    f"berth / nginx = {rates['berth'] / rates['nginx']:.2f}x (target >= 0.5x)"))
    return rows


def main() -> int:
    if shutil.which("nginx") is None and not Path(NGINX).exists():
        raise SystemExit("nginx is needed: apt-get install nginx-light")
    client, proc_engine = engine_with_image()
    nginx_image(client)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        srv = tmp / "srv"
        srv.mkdir(mode=0o755)
        with open(srv / "big", "wb") as f:
            f.truncate(BIG)  # sparse: nginx sends it from the page cache of zeros
        (srv / "big").chmod(0o644)
        tmp.chmod(0o755)
        port, proxy_port = free_port(), free_port()
        config = tmp / "berth.toml"
        config.write_text(BERTH_CONF.format(port=port, state=tmp / "state", image=IMAGE,
                                            srv=srv, model=build_image.DEFAULT_TAG))
        berthd = subprocess.Popen([sys.executable, "-m", "berth.daemon.main", "--config",
                                   str(config), "--stop-replicas-on-exit"], cwd=ROOT,
                                  stdout=subprocess.DEVNULL)
        nginx = floor = None
        try:
            base = f"http://127.0.0.1:{port}"
            fast, sse = asyncio.run(both_ready(base))
            conf = tmp / "proxy.conf"
            conf.write_text(PROXY_CONF.format(tmp=tmp, fast=fast, sse=sse, port=proxy_port))
            nginx = subprocess.Popen([NGINX, "-c", str(conf), "-e", "stderr"])
            pids = {"berth": berthd.pid, "nginx": nginx_worker(nginx.pid)}
            floor_url = None
            if "--floor" in sys.argv:
                floor_port = free_port()
                host, _, port_text = fast.rpartition(":")
                floor = subprocess.Popen([sys.executable, str(ROOT / "bench" / "floor_proxy.py"),
                                          host, port_text, str(floor_port)])
                pids["floor"] = floor.pid
                floor_url = f"http://127.0.0.1:{floor_port}/invoke/fast"
                time.sleep(0.5)
            rows = asyncio.run(measure(base, f"http://127.0.0.1:{proxy_port}", pids,
                                       floor_url))
            if "--profile" in sys.argv:
                print(cpu_profile.record(berthd.pid, f"{base}/invoke/fast/echo"))
        finally:
            if floor is not None:
                floor.terminate()
                floor.wait(timeout=30)
            if nginx is not None:
                nginx.terminate()
                nginx.wait(timeout=30)
            berthd.send_signal(signal.SIGTERM)
            berthd.wait(timeout=60)
            if proc_engine is not None:
                proc_engine.terminate()
    print_table("berth against a tuned nginx reverse proxy, same upstream replica",
                ("direct", "nginx", "berth"), rows)
    return 0


def nginx_worker(master: int) -> int:
    """The pid of nginx's one worker (the master only forks it)."""
    for _ in range(100):
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise SystemExit("nginx started no worker")


async def both_ready(base: str) -> tuple[str, str]:
    return await wait_ready(base, "fast"), await wait_ready(base, "sse")


if __name__ == "__main__":
    sys.exit(main())
