"""Replica logs over HTTP: `GET /v1/endpoints/{name}/logs`, merged, prefixed, followed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from berth.daemon.errors import ApiError
from berth.daemon.keys import RECONCILER, RUNTIME
from berth.daemon.params import bad_query, is_count, query_flag
from berth.scheduler.pool import EndpointPool
from berth.scheduler.runtime import DockerRuntime


async def stream_logs(request: web.Request) -> web.StreamResponse:
    """Replica logs as text, each line prefixed with its replica, until the client leaves
    (follow=true) or the logs end."""
    name = request.match_info["name"]
    pool = request.app[RECONCILER].pool(name)
    if pool is None:
        raise ApiError(404, "endpoint_not_found", f"no endpoint named {name!r}")
    tail_text = request.query.get("tail", "100")
    if not is_count(tail_text) and tail_text != "all":
        raise bad_query("tail", "tail must be a number of lines or 'all'")
    follow = query_flag(request, "follow")
    wanted = request.query.get("replica")
    replicas = [r for r in pool.replicas.values() if r.container_id
                and (wanted is None or r.id == wanted)]
    if wanted is not None and not replicas:
        raise ApiError(404, "replica_not_found", f"endpoint {name} has no replica {wanted!r}")
    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await response.prepare(request)
    logs = ReplicaLogs(request.app[RUNTIME], follow)
    tail = int(tail_text) if is_count(tail_text) else "all"
    for replica in replicas:
        logs.add(replica.id, str(replica.container_id), tail)
    streams = request.app[LOG_STREAMS]
    streams.add(logs)
    try:
        async for line in logs.lines(pool, wanted):
            await response.write(line)
    finally:
        streams.discard(logs)
        logs.close()
    await response.write_eof()
    return response


class ReplicaLogs:
    """The log lines of an endpoint's replicas, merged and prefixed with the replica. When
    following, replicas started after the stream began join it, from their first line."""

    RESCAN_S = 1.0
    MAX_BEHIND = 10_000  # lines a slow client may fall behind before its stream is cut
    MAX_LINE = 64 * 1024  # bytes of one line held: a longer one is passed on in pieces

    def __init__(self, runtime: DockerRuntime, follow: bool,
                 max_behind: int = MAX_BEHIND) -> None:
        self.runtime = runtime
        self.follow = follow
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=max_behind)
        self.readers: dict[str, asyncio.Task[None]] = {}
        self.open = 0  # readers that have not ended
        self.cut = False  # a reader found the queue full: the client reads too slowly

    def add(self, replica_id: str, container_id: str, tail: int | str) -> None:
        self.open += 1
        self.readers[replica_id] = asyncio.get_running_loop().create_task(
            self._read(replica_id, container_id, tail))

    async def _read(self, replica_id: str, container_id: str, tail: int | str) -> None:
        prefix, held = f"[{replica_id}] ".encode(), bytearray()
        try:
            async for chunk in self.runtime.stream_logs(container_id, tail, self.follow):
                if b"\n" in chunk:  # (else only appended: no rescan of what is held)
                    *whole, rest = (bytes(held) + chunk).split(b"\n")
                    for line in whole:
                        self._put(prefix + line + b"\n")
                    held[:] = rest
                else:
                    held += chunk
                if len(held) > self.MAX_LINE:
                    self._put(prefix + bytes(held) + b"\n")
                    held.clear()
            if held:
                self._put(prefix + bytes(held) + b"\n")
        except asyncio.QueueFull:
            self.cut = True  # never buffer without bound for a client that does not read
        finally:
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(None)

    def _put(self, line: bytes) -> None:
        self.queue.put_nowait(line)

    async def lines(self, pool: EndpointPool, wanted: str | None) -> AsyncIterator[bytes]:
        while self.follow or self.open or not self.queue.empty():
            if self.cut:
                yield (f"[berth] log stream cut: the client fell {self.queue.maxsize} lines "
                       "behind\n").encode()
                return
            if self.follow:
                for r in list(pool.replicas.values()):
                    if r.container_id and r.id not in self.readers and wanted in (None, r.id):
                        self.add(r.id, r.container_id, "all")
            try:
                line = await asyncio.wait_for(self.queue.get(),
                                              self.RESCAN_S if self.follow else None)
            except TimeoutError:
                continue
            if line is None:
                self.open -= 1
            else:
                yield line

    def close(self) -> None:
        for reader in self.readers.values():
            reader.cancel()

    def end(self) -> None:
        """berthd is stopping: the stream ends with what was read (a follow would not)."""
        self.follow = False
        self.close()


LOG_STREAMS: web.AppKey[set[ReplicaLogs]] = web.AppKey("log_streams")


def track_log_streams(app: web.Application) -> None:
    """Followed log streams end when berthd stops (an open status page must not hold up
    a stop: aiohttp waits for a running handler, twice its shutdown timeout)."""
    app[LOG_STREAMS] = set()

    async def end_all(app: web.Application) -> None:
        streams: set[ReplicaLogs] = app[LOG_STREAMS]
        for logs in list(streams):
            logs.end()
    app.on_shutdown.append(end_all)
