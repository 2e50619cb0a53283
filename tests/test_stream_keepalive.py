"""Streamed OpenAI calls that wait for a cold replica: keep-alive comments, then the model's
events in the same 200 stream; a start that fails ends the stream with an OpenAI error chunk;
non-streaming calls never commit early; a client that leaves releases its place at once."""

from __future__ import annotations

import json

import aiohttp

from helpers import endpoint, ready_count, wait_for

ADMIN = {"Authorization": "Bearer admin-secret"}
CHAT = {"model": "llama", "messages": [{"role": "user", "content": "a b"}], "stream": True,
        "stream_options": {"include_usage": True}}


async def read_events(resp: aiohttp.ClientResponse) -> list[str]:
    """The stream's lines (comments, data lines), blank lines dropped."""
    return [line for line in (await resp.text()).split("\n") if line]


async def test_a_cold_stream_gets_comments_then_the_models_events(api):
    _, client = await api({"llm": endpoint(
        "llm", models=["llama"], stream_keepalive_s=0.15,
        env={"MODEL_READY_DELAY_S": "0.8"})})
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=ADMIN)
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    lines = await read_events(resp)
    comments = [line for line in lines if line.startswith(":")]
    data = [line for line in lines if line.startswith("data:")]
    assert len(comments) >= 3 and comments[0].startswith(": berth: starting llm, ")
    assert lines[:len(comments)] == comments  # every comment came before the model spoke
    chunks = [json.loads(line[5:]) for line in data[:-1]]
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"]) == \
        "echo: a b "
    assert chunks[-1]["usage"]["prompt_tokens"] == 2 and data[-1] == "data: [DONE]"
    usage = await (await client.get("/v1/usage?group_by=model", headers=ADMIN)).json()
    assert usage["total"] == {"calls": 1, "errors": 0, "prompt_tokens": 2,
                              "completion_tokens": 3}


async def test_a_start_that_fails_ends_the_stream_with_an_openai_error(api):
    _, client = await api({"llm": endpoint(
        "llm", models=["llama"], stream_keepalive_s=0.15, startup_timeout_s=0.7,
        env={"MODEL_FAIL_HEALTH": "1"})})
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=ADMIN)
    assert resp.status == 200
    lines = await read_events(resp)
    assert lines[0].startswith(": berth: starting llm")
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][5:])["error"]
    assert error["code"] == "no_capacity" and set(error) == {"message", "type", "param", "code"}
    assert "startup_timeout_s=0.7" in error["message"]
    usage = await (await client.get("/v1/usage", headers=ADMIN)).json()
    assert usage["total"]["errors"] == 1  # a 200 on the wire, an error in the books


async def test_no_comments_when_the_slot_comes_in_time_or_the_call_is_not_streamed(api):
    h, client = await api({"llm": endpoint(
        "llm", models=["llama"], stream_keepalive_s=0.15, env={"MODEL_READY_DELAY_S": "0.5"})})
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": False},
                             headers=ADMIN)
    assert resp.status == 200 and resp.content_type == "application/json"
    assert (await resp.json())["choices"][0]["message"]["content"] == "echo: a b"
    pool = h.reconciler.pool("llm")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=ADMIN)
    assert not [line for line in await read_events(resp) if line.startswith(":")]
    assert "X-Berth-Replica" in resp.headers  # answered as without keep-alive


async def test_a_client_that_leaves_during_the_cold_start_releases_its_place(api):
    h, client = await api({"llm": endpoint(
        "llm", models=["llama"], stream_keepalive_s=0.1, env={"MODEL_READY_DELAY_S": "1.0"})})
    pool = h.reconciler.pool("llm")
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=ADMIN)
    assert (await resp.content.readline()).startswith(b": berth: starting llm")
    assert pool.waiting == 1
    resp.close()  # the client goes away mid-wait
    await wait_for(pool, lambda: pool.waiting == 0, what="the waiter gone")
    # Nobody wants the replica it was starting any more: stopped before ready, GPU-free.
    await wait_for(pool, lambda: not pool.replicas, what="the unneeded start stopped")
    events = [e.kind for e in await h.store.events("llm")]
    assert "scale_down" in events and "ready" not in events
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=ADMIN)
    assert (await read_events(resp))[-1] == "data: [DONE]"  # the next caller is served
