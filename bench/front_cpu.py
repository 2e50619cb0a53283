"""berth's own Python per fast-path call, in one process, without the network or the box's noise.

    .venv/bin/python bench/front_cpu.py            # about 20 s
    .venv/bin/python bench/front_cpu.py --calls 20000 --request sdk

Why: bench/proxy_vs_nginx.py measures what a user sees, but on this shared 2-core box its
figures swing by a third between runs, far more than one change to the per-call code moves
them. This drives the real objects of one call (front.Front, fast_call.FastCall,
upstream.UpstreamConnection, the router, slots, deadlines, metrics) on stand-in transports: a
request's bytes are fed to the front as a client connection would, and a canned answer to the
replica connection as the replica would, in a loop. What is timed is berth's Python alone (the
system calls, the loop and the other processes are what proxy_vs_nginx adds). Not a test of
the data plane: the Docker path and the real sockets are tested in tests/, and
bench/proxy_vs_nginx.py is the measure of record. Prints microseconds per call: the least of
seven runs (the steadiest figure on a shared box) and their median; with the compiled build
(daemon/native.py) when it matches the sources, plain Python with BERTH_NATIVE=0.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from typing import Any

import uvloop
from aiohttp import web

from berth.daemon.auth import Auth
from berth.daemon.browser import BrowserGuard
from berth.daemon.config import EndpointSpec
from berth.daemon.deadlines import Deadlines
from berth.daemon.front import Front
from berth.daemon.keys import (
    AUTH,
    BROWSER,
    DATA_PLANE,
    LIMITS,
    METRICS,
    RECONCILER,
    REQUEST_IDS,
    USAGE,
    DataPlane,
    Limits,
)
from berth.daemon.metering import UsageLedger
from berth.daemon.metrics import Metrics
from berth.daemon.native import compiled
from berth.daemon.pacing import CallPacer
from berth.daemon.proxy import RequestIds
from berth.daemon.quota import Quota
from berth.daemon.upstream import UpstreamConnection, UpstreamPool
from berth.scheduler.endpoint import Endpoint
from berth.scheduler.pool import EndpointPool
from berth.scheduler.replica import Replica, ReplicaState
from berth.scheduler.router import Router

ADDRESS = "10.0.0.2:8080"
REQUESTS = {
    # what wrk sends in bench/proxy_vs_nginx.py
    "wrk": b"GET /invoke/fast/echo HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n",
    # what the openai SDK sends (its headers, a small JSON body)
    "sdk": b"POST /invoke/fast/v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
           b"Accept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\n"
           b"Accept: application/json\r\nContent-Type: application/json\r\n"
           b"User-Agent: OpenAI/Python 1.50.0\r\nX-Stainless-Lang: python\r\n"
           b"X-Stainless-Package-Version: 1.50.0\r\nAuthorization: Bearer sk-none\r\n"
           b"Content-Length: 40\r\n\r\n" b'{"model": "bge", "input": "hello world"}',
    # the OpenAI front door's: routed by the body's model, its usage read from the answer
    "chat": b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
            b"Content-Type: application/json\r\nContent-Length: 71\r\n\r\n"
            b'{"model": "fast", "messages": [{"role": "user", "content": "hello b"}]}',
}
# what the bench's nginx upstream answers to /echo
ANSWER = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 02 Dec 2026 10:00:00 GMT\r\n"
          b"Content-Type: application/json\r\nContent-Length: 29\r\nConnection: keep-alive\r\n"
          b"\r\n" b'{"ok": true, "from": "nginx"}')
# what the demo model answers to a chat (its length and shape; the usage object last)
CHAT = (b'{"id": "chatcmpl-demo", "object": "chat.completion", "created": 1796000000, '
        b'"model": "fast", "choices": [{"index": 0, "finish_reason": "stop", "message": '
        b'{"role": "assistant", "content": "echo: hello b"}}], "usage": {"prompt_tokens": '
        b'2, "completion_tokens": 3, "total_tokens": 5}, "from": "nginx"}')
CHAT_ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(CHAT), CHAT))


class Transport:
    """Stands in for a socket's transport: keeps what is written; a close is a fault here."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writelines(self, parts: Any) -> None:
        self.written.extend(parts)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        raise SystemExit("a connection was closed: the call did not take the fast path")

    abort = close


class Host:
    """The client connection's side the front calls (connections.GuardedConnection)."""

    def request_started(self) -> None:
        pass

    def request_finished(self) -> None:
        pass

    def to_aiohttp(self, raw: bytes | None) -> Any:
        raise SystemExit("the request went to aiohttp: not a model call")


class Pools:
    """What of the reconciler a call reads: its endpoint by name (/invoke) or by model (/v1)."""

    def __init__(self, pool: EndpointPool) -> None:
        self._pool = pool

    def pool(self, name: str) -> EndpointPool | None:
        return self._pool if name == self._pool.name else None

    def serving(self, model: str) -> EndpointPool | None:
        return self._pool if self._pool.spec.serves(model) else None

    def live_pools(self) -> list[EndpointPool]:
        return [self._pool]


def setup(usage: bool) -> tuple[Front, UpstreamConnection, Transport]:
    spec = EndpointSpec.model_validate({"name": "fast", "image": "x", "concurrency": 1024})
    pool = EndpointPool(Endpoint(spec, "config"))
    pool.replicas["r0"] = Replica(id="r0", endpoint="fast", generation=1, created_at=0.0,
                                  state=ReplicaState.READY, address=ADDRESS)
    upstream = UpstreamPool()
    loop = upstream.loop
    pools = Pools(pool)
    plane = DataPlane(Router(pools), Auth(admin=None), Quota(None), Limits(),  # type: ignore[arg-type]
                      upstream, Metrics(), UsageLedger(None, enabled=usage),  # type: ignore[arg-type]
                      RequestIds(), Deadlines(loop), CallPacer(loop))
    app = web.Application()
    app[DATA_PLANE] = plane
    # what else reads the app (the same objects as the plane's): the routes' task path
    app[AUTH], app[RECONCILER], app[REQUEST_IDS] = plane.auth, pools, plane.request_ids
    app[USAGE], app[LIMITS], app[METRICS] = plane.usage, plane.limits, plane.metrics
    app[BROWSER] = BrowserGuard.build("127.0.0.1", ["localhost"], [])
    client = Transport()
    front = Front(Host(), app, client)  # type: ignore[arg-type]
    conn = UpstreamConnection(ADDRESS, loop)
    conn.connection_made(Transport())  # type: ignore[arg-type]
    conn.idle_since = loop.time()
    upstream._idle[ADDRESS] = [conn]  # kept alive, as after an earlier call
    return front, conn, client


async def measure(calls: int, request: bytes, answer: bytes, usage: bool) -> list[float]:
    front, conn, client = setup(usage)

    def one() -> None:
        front.feed(request)
        conn.data_received(answer)

    for _ in range(2000):
        one()
    if not client.written[-1].endswith(b'"nginx"}'):
        raise SystemExit(f"not answered: {client.written[-3:]!r}")
    runs = []
    for _ in range(7):
        client.written.clear()
        gc.collect()
        start = time.perf_counter()
        for _ in range(calls):
            one()
        runs.append((time.perf_counter() - start) / calls * 1e6)
        if len(client.written) != calls:
            raise SystemExit(f"{len(client.written)} answers to {calls} calls")
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50000)
    parser.add_argument("--request", choices=sorted(REQUESTS), default=None)
    args = parser.parse_args()
    names = compiled()
    print(f"compiled (daemon/native.py): {', '.join(names) or 'none, plain Python'}")
    for name in [args.request] if args.request else sorted(REQUESTS, reverse=True):
        # usage accounting (daemon.usage_accounting) off and on: it reads /v1 answers only
        for usage in (False, True) if name != "wrk" else (False,):
            answer = CHAT_ANSWER if name == "chat" else ANSWER
            runs = uvloop.run(measure(args.calls, REQUESTS[name], answer, usage))
            print(f"{name}{', usage on' if usage else ''}: {min(runs):.2f} us per call (least "
                  f"of 7), median {statistics.median(runs):.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
