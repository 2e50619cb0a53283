"""Live events: `GET /v1/events?follow=true` as server-sent events.

A follower first gets the last `limit` stored events (default 50) that match its filter, then
every new one as the reconciler records it, each as `id: N` + `data: {event}`; a comment every
KEEPALIVE_S keeps idle proxies from cutting the stream. A follower is subscribed before the
backlog is read, so no event falls between the two (ids tell the repeats apart). A follower
that reads too slowly to keep up with MAX_BEHIND events has its stream ended (it may
reconnect with `since`); berth never buffers without bound for it, and a follower that stops
reading altogether (a write blocked for WRITE_TIMEOUT_S) is disconnected. When berthd shuts
down, every follower's stream ends at once (no open status page holds up a stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict

from aiohttp import web

from berth.daemon.keys import EVENTS, STORE
from berth.daemon.params import query_limit, query_time
from berth.store.records import EventRecord

KEEPALIVE_S = 15.0
WRITE_TIMEOUT_S = 10.0
MAX_BEHIND = 1000
END = EventRecord(ts=0.0, kind="end", message="")  # a wake-up, never sent
FOLLOW_BACKLOG = 50


class Follower:
    """One live stream's queue; `behind` is set when it overflowed (then it ends)."""

    def __init__(self, endpoint: str | None, max_behind: int) -> None:
        self.endpoint = endpoint
        self.queue: asyncio.Queue[EventRecord] = asyncio.Queue(maxsize=max_behind)
        self.behind = asyncio.Event()
        self.ended = asyncio.Event()

    def offer(self, event: EventRecord) -> None:
        if self.endpoint is not None and event.endpoint != self.endpoint:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.behind.set()

    def end(self) -> None:
        self.ended.set()
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(END)  # wakes a follower waiting for the next event


class EventFeed:
    """Fans the reconciler's events out to live followers (a listener of Reconciler.event)."""

    def __init__(self, max_behind: int = MAX_BEHIND) -> None:
        self.max_behind = max_behind
        self.followers: set[Follower] = set()

    def publish(self, event: EventRecord) -> None:
        for follower in self.followers:
            follower.offer(event)

    def end_all(self) -> None:
        """berthd is stopping: every stream ends now."""
        for follower in self.followers:
            follower.end()

    @contextlib.contextmanager
    def follow(self, endpoint: str | None) -> Iterator[Follower]:
        follower = Follower(endpoint, self.max_behind)
        self.followers.add(follower)
        try:
            yield follower
        finally:
            self.followers.discard(follower)


def sse_event(event: EventRecord) -> bytes:
    return f"id: {event.id}\ndata: {json.dumps(asdict(event))}\n\n".encode()


async def follow_events(request: web.Request) -> web.StreamResponse:
    endpoint, since = request.query.get("endpoint"), query_time(request, "since")
    limit = query_limit(request, default=FOLLOW_BACKLOG)
    with request.app[EVENTS].follow(endpoint) as follower:
        backlog = await request.app[STORE].events(endpoint, since, limit)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            await stream(response, follower, backlog)
        except TimeoutError:  # the client stopped reading: drop it, keep nothing for it
            if request.transport is not None:
                request.transport.abort()
    return response


async def stream(response: web.StreamResponse, follower: Follower,
                 backlog: list[EventRecord]) -> None:
    async def write(data: bytes) -> None:
        await asyncio.wait_for(response.write(data), WRITE_TIMEOUT_S)

    last = 0
    for event in backlog:
        await write(sse_event(event))
        last = event.id or last
    while not follower.behind.is_set() and not follower.ended.is_set():
        try:
            event = await asyncio.wait_for(follower.queue.get(), KEEPALIVE_S)
        except TimeoutError:
            await write(b": keep-alive\n\n")
            continue
        if event is not END and (event.id is None or event.id > last):
            await write(sse_event(event))
            last = event.id or last
    if follower.behind.is_set():
        await write(b"event: behind\ndata: {}\n\n")
