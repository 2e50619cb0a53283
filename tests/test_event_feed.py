"""Live events (`GET /v1/events?follow=true`): backlog, then each new event as it is recorded,
filtered by endpoint, and a follower that falls too far behind is cut, never buffered."""

from __future__ import annotations

import asyncio
import json

from berth.daemon.event_feed import EventFeed
from berth.store.records import EventRecord
from helpers import body, ready_count, wait_for

ADMIN = {"Authorization": "Bearer admin-secret"}


async def read_event(resp) -> dict:
    """The next `data:` event of an SSE stream (comments and ids skipped)."""
    while True:
        line = (await asyncio.wait_for(resp.content.readline(), 5)).decode()
        assert line, "stream ended"
        if line.startswith("data: "):
            return json.loads(line[6:])


async def test_a_follower_gets_the_backlog_then_live_events_of_its_endpoint(api):
    h, client = await api()
    await client.post("/v1/endpoints", headers=ADMIN, json=body("ev", min_replicas=1))
    pool = h.reconciler.pool("ev")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    resp = await client.get("/v1/events?follow=true&endpoint=ev&limit=2", headers=ADMIN)
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    backlog = [await read_event(resp), await read_event(resp)]
    assert [e["kind"] for e in backlog] == ["start", "ready"]
    # Another endpoint's event is not this follower's; this endpoint's next one arrives live.
    await h.reconciler.event("noise", "elsewhere", "other")
    await client.patch("/v1/endpoints/ev", headers=ADMIN, json={"max_replicas": 2})
    live = await read_event(resp)
    assert live["kind"] == "endpoint_updated" and live["endpoint"] == "ev"
    assert live["id"] > backlog[-1]["id"]
    resp.close()
    assert (await client.get("/v1/events?follow=true")).status == 401
    assert (await client.get("/v1/events?follow=maybe", headers=ADMIN)).status == 400


async def test_a_follower_that_falls_behind_is_cut_not_buffered():
    feed = EventFeed(max_behind=3)
    with feed.follow(None) as follower:
        for i in range(5):
            feed.publish(EventRecord(ts=i, kind="k", message="m", id=i + 1))
        assert follower.behind.is_set() and follower.queue.qsize() == 3
    assert not feed.followers  # a stream that ends leaves the feed


async def test_followers_see_only_their_endpoint():
    feed = EventFeed()
    with feed.follow("a") as only_a, feed.follow(None) as every:
        feed.publish(EventRecord(ts=1, kind="k", message="m", endpoint="a", id=1))
        feed.publish(EventRecord(ts=2, kind="k", message="m", endpoint="b", id=2))
        assert only_a.queue.qsize() == 1 and every.queue.qsize() == 2


async def test_followers_end_at_once_when_berthd_shuts_down(api):
    from berth.daemon.keys import EVENTS

    _, client = await api()
    resp = await client.get("/v1/events?follow=true", headers=ADMIN)
    assert resp.status == 200
    client.app[EVENTS].end_all()  # what the app's on_shutdown does
    rest = await asyncio.wait_for(resp.content.read(), 2)  # ends now, not at a keep-alive
    assert b"event: behind" not in rest and not client.app[EVENTS].followers
