"""Usage accounting and per-token limits: what is read from answers, what is counted for whom,
what survives a restart, and what a limited token is told."""

from __future__ import annotations

import asyncio
import json
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from berth.daemon.metering import (
    UNREAD,
    UsageLedger,
    UsageMeter,
    flat_usage,
    tokens_of,
    usage_in_json,
    usage_in_object,
)
from berth.daemon.quota import day_wait, minute_wait
from berth.store import Store
from berth.store.usage import ROWS_PER_STATEMENT
from helpers import endpoint, ready_count, wait_for

ADMIN = {"Authorization": "Bearer admin-secret"}
T0 = 1_764_547_200.0  # 2025-12-01 00:00:00 UTC, a day's start


@pytest.mark.parametrize(("usage", "tokens"), [
    ({"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}, (3, 5)),
    ({"prompt_tokens": 7, "total_tokens": 7}, (7, 0)),  # embeddings
    ({"input_tokens": 4, "output_tokens": 9}, (4, 9)),  # the Responses API
    ({"prompt_tokens": -1, "completion_tokens": 2}, None),
    ({"prompt_tokens": True, "completion_tokens": 2}, None),
    ({"prompt_tokens": "3"}, None),
    ({"prompt_tokens": 10 ** 13}, None),  # not a count
    (None, None),
    ([1, 2], None),
])
def test_tokens_of_a_usage_object(usage, tokens):
    assert tokens_of(usage) == tokens


USAGE = {"prompt_tokens": 3, "completion_tokens": 4}


@pytest.mark.parametrize(("answer", "tokens"), [
    (b'{"id": "c", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}',
     (3, 4)),
    (b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}, "id": "c"}', (3, 4)),
    (b'{\n  "usage" : {"prompt_tokens": 3,\n "completion_tokens": 4}\n}\n', (3, 4)),
    # a top-level usage, then one deeper: the top level's (the whole answer parsed)
    (b'{"usage": {"prompt_tokens": 3}, "meta": {"usage": {"prompt_tokens": 9}}}', (3, 0)),
    (b'{"meta": {"usage": {"prompt_tokens": 9}}}', None),  # none at the top
    (b'{"choices": [{"usage": {"prompt_tokens": 9}}]}', None),
    (b'{"type": "response.completed", "response": {"usage": {"input_tokens": 2, '
     b'"output_tokens": 5}}}', (2, 5)),  # the Responses API
    (b'{"usage": null, "response": {"usage": {"input_tokens": 2}}}', (2, 0)),
    (b'{"choices": [{"delta": {"content": "a"}}], "usage": null}', None),  # a stream's chunk
    (b'{"response": {"usage": {"input_tokens": 2}}, "usage": null}', (2, 0)),
    # "usage" inside strings, as a value, or ending a key: never a usage member
    (b'{"content": "x \\"usage\\": {\\"prompt_tokens\\": 9}}"}', None),
    (b'{"content": "say \\"usage", "n": {"prompt_tokens": 9}}', None),
    (b'{"a\\"usage": {"prompt_tokens": 9}}', None),
    (b'{"type": "usage"}', None),
    (b'{"id": "c"}', None),
    (b"not json", None),
    (b'[{"usage": {"prompt_tokens": 9}}]', None),
    # members after the usage (vLLM's prompt_logprobs, OpenAI's system_fingerprint)
    (b'{"id": "c", "usage": {"prompt_tokens": 3, "completion_tokens": 4, '
     b'"prompt_tokens_details": {"cached_tokens": 0}}, "system_fingerprint": null}', (3, 4)),
    (b'garbage{{["usage":{"input_tokens":3234}, "x": 1}', (3234, 0)),  # read as before
    # a value that is not UTF-8 JSON, or nested past the parser's depth in its object
    (b'{"usage":\xef\xbb\xbf{"prompt_tokens":3}}', None),
    (b'{"id":1,"usage":' + '{"prompt_tokens":3,"completion_tokens":4}'.encode("utf-16-le")
     + b'}', None),
    (b'{"usage":{"prompt_tokens":1,"completion_tokens":2,"x":' + b"[" * 1023 + b"]" * 1023
     + b"}}", None),
])
def test_usage_is_read_from_the_top_level_of_an_answer(answer, tokens):
    assert usage_in_json(answer) == tokens


JSON_KEYS = st.sampled_from(["usage", "response", "prompt_tokens", "completion_tokens",
                             "input_tokens", "a\"usage", "x", ""])
JSON_LEAVES = st.none() | st.booleans() | st.integers(-5, 10 ** 13) | st.sampled_from(
    ["usage", '"usage": {"prompt_tokens": 9}}', 'say "usage', "\\", "}]"])
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=3) |
                           st.dictionaries(JSON_KEYS, inner, max_size=4), max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(answer=st.dictionaries(JSON_KEYS, JSON_VALUES, max_size=5), usage_last=st.booleans(),
       indent=st.sampled_from([None, 1]))
def test_reading_only_the_last_usage_member_agrees_with_parsing_the_whole_answer(
        answer, usage_last, indent):
    if usage_last and "usage" in answer:
        answer["usage"] = answer.pop("usage")
    if usage_last:
        answer.setdefault("usage", USAGE)
    raw = json.dumps(answer, indent=indent).encode()
    assert usage_in_json(raw) == usage_in_object(answer), raw


@pytest.mark.parametrize(("text", "tokens"), [
    ('{"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}', (5, 6)),
    ('{"completion_tokens":6,"prompt_tokens":5,"total_tokens":11}', (5, 6)),  # llama.cpp
    ('{"prompt_tokens":5,"total_tokens":11,"completion_tokens":6,'
     '"prompt_tokens_details":null}', (5, 6)),  # vLLM
    (' {\n "input_tokens" : 2 ,\t"output_tokens":0 }\r\n', (2, 0)),  # the Responses API
    ('{"prompt_tokens": 3, "input_tokens": 9}', (3, 0)),  # prompt_tokens first
    ('{"prompt_tokens": 1, "prompt_tokens": 4}', (4, 0)),  # the last of a key, as a dict
    ('{}', (0, 0)),
    ('{"prompt_tokens": null}', None),
    ('{"prompt_tokens": 1000000000001}', None),  # past MAX_TOKENS: no count
    ('{"prompt_tokens": 999999999999999}', None),
    ('{"prompt_tokens": 0}', (0, 0)),
    # anything else is left to the parser
    ('{"prompt_tokens": 1.0}', UNREAD),
    ('{"prompt_tokens": 1e3}', UNREAD),
    ('{"prompt_tokens": -1}', UNREAD),
    ('{"prompt_tokens": 01}', UNREAD),
    ('{"prompt_tokens": 1234567890123456}', UNREAD),  # more than MAX_DIGITS
    ('{"prompt_tokens": "5"}', UNREAD),
    ('{"prompt_tokens": true}', UNREAD),
    ('{"details": {"cached_tokens": 1}}', UNREAD),
    ('{"prompt\\u005ftokens": 5}', UNREAD),
    ('{"pr\u00f6mpt_tokens": 5}', UNREAD),
    ('{"prompt_tokens": 5,}', UNREAD),
    ('{"prompt_tokens": 5', UNREAD),
    ('{"prompt_tokens" 5}', UNREAD),
    ('{"prompt_tokens": 5} x', UNREAD),
    ('{"prompt_tokens": nul}', UNREAD),
    ('{"prompt_tokens": 5 6}', UNREAD),
    ('', UNREAD),
    ('null', UNREAD),
])
def test_a_flat_usage_object_is_read_without_a_parser_and_anything_else_is_left_to_one(
        text, tokens):
    raw = text.encode()
    found = flat_usage(raw, 0, len(raw))
    assert found == ((UNREAD, UNREAD) if tokens == UNREAD else tokens)
    if tokens != UNREAD:  # what it reads, a parser reads alike
        assert tokens_of(json.loads(raw)) == tokens


USAGE_KEYS = st.sampled_from(["prompt_tokens", "completion_tokens", "input_tokens",
                              "output_tokens", "total_tokens", "prompt_tokens_details", "x"])
USAGE_LEAVES = st.none() | st.booleans() | st.integers(-3, 10 ** 16) | st.floats(
    allow_nan=False, allow_infinity=False) | st.sampled_from(["", "7", "\\", "\u00e9"])
SPACES = st.sampled_from(["", " ", "\n", "\t ", "\r\n  "])


@settings(max_examples=1500, deadline=None)
@given(usage=st.dictionaries(USAGE_KEYS, USAGE_LEAVES | st.dictionaries(
           USAGE_KEYS, USAGE_LEAVES, max_size=2), max_size=6),
       gaps=st.lists(SPACES, min_size=1, max_size=8), cut=st.integers(0, 200),
       byte=st.integers(0, 255))
def test_the_flat_reading_agrees_with_a_parser_on_usage_objects_and_their_corruptions(
        usage, gaps, cut, byte):
    """Whatever flat_usage reads, tokens_of of the parsed object gives too: valid objects
    with any spacing, and the same with one byte changed (most then not JSON)."""
    pieces = [json.dumps(k) + gaps[i % len(gaps)] + ":" + json.dumps(v)
              for i, (k, v) in enumerate(usage.items())]
    text = gaps[0] + "{" + gaps[-1] + ("," + gaps[1 % len(gaps)]).join(pieces) + "}" + gaps[-1]
    for raw in (text.encode(), mutated(text.encode(), cut, byte)):
        found = flat_usage(raw, 0, len(raw))
        if found is not None and found[0] == UNREAD:
            continue  # left to the parser
        assert found == tokens_of(json.loads(raw)), raw


def mutated(raw: bytes, at: int, byte: int) -> bytes:
    at = at % (len(raw) + 1)
    return raw[:at] + bytes([byte]) + raw[at + 1:]


def test_a_replicas_deeply_nested_json_is_passed_on_not_a_fault():
    from berth.daemon.openai_api import renamer
    from berth.daemon.sse import SseRewriter

    deep = b"[" * 5000 + b"]" * 5000  # past the JSON decoder's recursion limit
    assert renamer("llama", "/m")(deep) == deep
    assert SseRewriter(renamer("llama", "/m")).feed(b"data: {\"x\": " + deep + b"}\n") == \
        b"data: {\"x\": " + deep + b"}\n"
    meter = UsageMeter()
    meter.feed(b'{"usage": ' + deep)  # a large answer's tail, read when it ends
    meter.end()
    assert meter.tokens is None


@pytest.mark.parametrize(("stream", "streams"), [
    (True, True), (1, True), (1.0, True), ("true", True), ("Yes", True), (" on ", True),
    (False, False), (0, False), ("false", False), ("no", False), (None, False), (2, False),
    ([1], False), ({}, False),
])
def test_a_stream_is_told_as_model_servers_parse_it(stream, streams):
    from berth.daemon.usage import asks_to_stream

    assert asks_to_stream({"stream": stream}) is streams


def sse(*objects: object) -> bytes:
    return b"".join(b"data: " + json.dumps(o).encode() + b"\n\n" for o in objects) + \
        b"data: [DONE]\n\n"


@pytest.mark.parametrize(("chunks", "is_sse", "tokens"), [
    # The usage chunk cut in three pieces across reads.
    ([sse({"choices": [{"delta": {"content": "a"}}], "usage": None},
          {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3}})[:40],
      sse({"choices": [{"delta": {"content": "a"}}], "usage": None},
          {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3}})[40:90],
      sse({"choices": [{"delta": {"content": "a"}}], "usage": None},
          {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3}})[90:]],
     True, (2, 3)),
    # The Responses API puts it in the completed event's response.
    ([sse({"type": "response.completed", "response": {"usage": {
        "input_tokens": 5, "output_tokens": 6}}})], True, (5, 6)),
    # A word "usage" in generated text is not a usage object.
    ([sse({"choices": [{"delta": {"content": 'the "usage": {"prompt_tokens": 9}'}}]})],
     True, None),
    # A large JSON answer streamed: its usage is at the end.
    ([b'{"data": [' + b"0.1, " * 30000, b'0.2], "usage": {"prompt_tokens": 11, '
      b'"total_tokens": 11}}'], False, (11, 0)),
    ([b"not json at all"], False, None),
])
def test_the_meter_reads_usage_from_streams(chunks, is_sse, tokens):
    meter = UsageMeter()
    meter.sse = is_sse
    for chunk in chunks:
        meter.feed(chunk)
    meter.end()
    assert meter.tokens == tokens


@pytest.mark.parametrize(("admitted", "rpm", "now", "wait"), [
    ([], 1, 100.0, 0.0),
    ([50.0], 1, 100.0, 10.0),           # frees when the call of t=50 is a minute old
    ([50.0], 2, 100.0, 0.0),
    ([30.0, 50.0, 70.0], 2, 100.0, 10.0),  # t=30 has left the window; t=50 must too
    ([40.0, 50.0], 2, 100.0, 0.0),      # t=40 is exactly a minute old: gone
    ([45.0, 50.0, 70.0], 1, 100.0, 30.0),  # a lowered limit waits for the newest
])
def test_minute_window(admitted, rpm, now, wait):
    assert minute_wait(deque(admitted), rpm, now) == pytest.approx(wait)


@pytest.mark.parametrize(("used", "tpd", "now", "wait"), [
    (0, 100, T0 + 10, 0.0),
    (99, 100, T0 + 10, 0.0),
    (100, 100, T0 + 10, 86390.0),
    (500, 100, T0 + 86399, 1.0),
])
def test_day_budget(used, tpd, now, wait):
    assert day_wait(used, tpd, now) == pytest.approx(wait)


async def test_ledger_counts_survive_a_restart_and_a_new_day_starts_afresh(tmp_path):
    store = await Store.open(tmp_path)
    ledger = UsageLedger(store.usage)
    await ledger.load(T0 + 5)
    hour = int(T0)
    ledger.record((hour, "tok_a", "llm", "llama"), False, (10, 20))
    ledger.record((hour, "tok_a", "llm", "llama"), True, None)
    ledger.record((hour, "public", "emb", "bge"), False, (3, 0))
    assert ledger.tokens_today("tok_a", T0 + 6) == 30
    await ledger.flush()
    assert not ledger.pending
    await store.close()

    store = await Store.open(tmp_path)  # berthd restarted the same day
    again = UsageLedger(store.usage)
    await again.load(T0 + 3600)
    assert again.tokens_today("tok_a", T0 + 3600) == 30
    assert again.tokens_today("tok_a", T0 + 86400 + 1) == 0  # a new UTC day
    rows = await store.usage.summary("token", 0, None, None, None)
    assert {r["group"]: (r["calls"], r["errors"], r["prompt_tokens"], r["completion_tokens"])
            for r in rows} == {"tok_a": (2, 1, 10, 20), "public": (1, 0, 3, 0)}
    await store.close()


async def test_a_call_counts_into_its_hour_after_a_flush_took_its_tally_and_budgets_roll_per_day(
        tmp_path):
    """A call adds to its (principal, endpoint, model) Account's tally, kept between calls:
    after a flush took that tally, or in a new hour, it must count into a new pending cell,
    and each principal's day counter starts again on a new UTC day."""
    store = await Store.open(tmp_path)
    ledger = UsageLedger(store.usage)
    await ledger.load(T0)
    hour, next_hour, next_day = int(T0), int(T0) + 3600, int(T0) + 86400
    ledger.record((hour, "tok_a", "llm", "llama"), False, (1, 2))
    await ledger.flush()
    ledger.record((hour, "tok_a", "llm", "llama"), True, (10, 20))  # after the flush
    ledger.record((next_hour, "tok_a", "llm", "llama"), False, (100, 200))
    ledger.record((next_hour, "tok_b", "llm", "llama"), False, (5, 5))
    assert {cell: (t.calls, t.errors, t.prompt, t.completion)
            for cell, t in ledger.pending.items()} == {
        (hour, "tok_a", "llm", "llama"): (1, 1, 10, 20),
        (next_hour, "tok_a", "llm", "llama"): (1, 0, 100, 200),
        (next_hour, "tok_b", "llm", "llama"): (1, 0, 5, 5)}
    assert ledger.tokens_today("tok_a", T0 + 7200) == 333
    ledger.record((next_day, "tok_a", "llm", "llama"), False, (4, 0))
    assert ledger.tokens_today("tok_a", T0 + 86401) == 4
    ledger.record((next_hour, "tok_a", "llm", "llama"), False, (50, 0))  # yesterday's, late
    assert ledger.tokens_today("tok_a", T0 + 86401) == 4  # (as a restart would count)
    assert ledger.tokens_today("tok_b", T0 + 86401) == 0  # (nothing counted today yet)
    totals = ledger.model_tokens[("llm", "llama")]
    assert (totals.prompt, totals.completion) == (170, 227)
    await ledger.flush()
    rows = await store.usage.summary("token", 0, None, None, None)
    assert {r["group"]: (r["calls"], r["prompt_tokens"]) for r in rows} == {
        "tok_a": (5, 165), "tok_b": (1, 5)}
    await store.close()


async def test_calls_that_end_while_a_flush_writes_its_batches_are_all_written(tmp_path):
    """A flush of more cells than one statement takes writes them batch by batch; a call
    that ends meanwhile, in a cell of a batch still to come or already taken, must count in
    a tally that is written (an Account kept a tally the next batch took away)."""
    store = await Store.open(tmp_path)
    ledger = UsageLedger(store.usage)
    await ledger.load(T0)
    hour = int(T0)
    for n in range(ROWS_PER_STATEMENT + 1):
        ledger.record((hour, f"tok_{n}", "llm", "llama"), False, (1, 0))
    last = (hour, f"tok_{ROWS_PER_STATEMENT}", "llm", "llama")  # in the second batch
    write = store.usage.add

    async def add(rows):  # the last cell's call ends while each batch is written
        ledger.record(last, False, (1, 0))
        await write(rows)

    try:
        store.usage.add = add
        await ledger.flush()
        ledger.record(last, False, (1, 0))  # and once after
        store.usage.add = write
        await ledger.flush()
        rows = await store.usage.summary("token", 0, None, None, None)
    finally:
        await store.close()
    calls = {r["group"]: r["calls"] for r in rows}
    assert calls[last[1]] == 4 and sum(calls.values()) == ROWS_PER_STATEMENT + 4


async def test_a_failed_flush_keeps_its_counts(tmp_path):
    store = await Store.open(tmp_path)
    ledger = UsageLedger(store.usage)
    await ledger.load(T0)
    ledger.record((int(T0), "admin", "llm", "llama"), False, (1, 2))
    await store.close()  # the next write fails
    with pytest.raises(ValueError):
        await ledger.flush()
    assert sum(t.calls for t in ledger.pending.values()) == 1
    store = await Store.open(tmp_path)
    ledger.store = store.usage
    await ledger.flush()
    assert (await store.usage.summary("day", 0, None, None, None))[0]["calls"] == 1
    await store.close()


async def test_a_flush_writes_what_was_pending_and_leaves_later_counts_for_the_next(tmp_path):
    """Calls that end while a flush writes wait for the next flush_s: a flush that went on
    until nothing was pending wrote back to back under load, and the SQLite thread took the
    GIL from the event loop all the while (68 statements in 5 s of wrk, at flush_s 1)."""
    store = await Store.open(tmp_path)
    ledger = UsageLedger(store.usage)
    await ledger.load(T0)
    cell = (int(T0), "public", "llm", "llama")
    statements: list[int] = []
    write = store.usage.add

    async def add(rows):  # a call ends while each statement runs (at most 5: no hang)
        statements.append(sum(r.calls for r in rows))
        if len(statements) < 5:
            ledger.record(cell, False, (1, 1))
        await write(rows)

    store.usage.add = add
    ledger.record(cell, False, (1, 1))
    await ledger.flush()
    assert statements == [1] and ledger.pending[cell].calls == 1  # written at the next flush
    await ledger.flush()
    assert statements == [1, 1] and ledger.pending[cell].calls == 1
    await store.close()


async def test_usage_is_counted_per_token_and_model_and_summed_by_the_api(api):
    import openai

    h, client = await api({"llm": endpoint("llm", min_replicas=1, models=["llama", "l2"]),
                           "emb": endpoint("emb", public=True, models=["bge"])})
    pool = h.reconciler.pool("llm")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="llm ready")
    token = await (await client.post("/v1/endpoints/llm/tokens", headers=ADMIN)).json()
    base = f"http://127.0.0.1:{client.port}/v1"
    user = openai.AsyncOpenAI(base_url=base, api_key=token["token"], max_retries=0)
    try:
        await user.chat.completions.create(   # 3 words in, 4 tokens out
            model="llama", messages=[{"role": "user", "content": "one two three"}])
        stream = await user.chat.completions.create(
            model="l2", messages=[{"role": "user", "content": "a b"}], stream=True,
            stream_options={"include_usage": True})
        assert [c async for c in stream][-1].usage.prompt_tokens == 2
        with pytest.raises(openai.NotFoundError):  # the model's own 404: an error, no tokens
            await user.completions.create(model="llama", prompt="x")
    finally:
        await user.close()
    assert (await client.post("/v1/embeddings", json={"model": "bge", "input": "x"})).status \
        == 200
    resp = await client.post("/invoke/llm/v1/chat/completions", headers={
        **ADMIN, "Content-Type": "application/json"}, data=json.dumps(
        {"model": "llama", "messages": [{"role": "user", "content": "x"}]}))
    assert resp.status == 200

    by_model = await (await client.get("/v1/usage?group_by=model", headers=ADMIN)).json()
    rows = {(u["endpoint"], u["model"]): (u["calls"], u["errors"], u["prompt_tokens"],
                                          u["completion_tokens"]) for u in by_model["usage"]}
    assert rows == {("emb", "bge"): (1, 0, 3, 0), ("llm", "l2"): (1, 0, 2, 3),
                    ("llm", "llama"): (3, 1, 4, 6)}
    by_token = await (await client.get("/v1/usage?group_by=token&endpoint=llm",
                                       headers=ADMIN)).json()
    assert {u["token"]: u["calls"] for u in by_token["usage"]} == {token["id"]: 3, "admin": 1}
    one = await (await client.get(f"/v1/usage?token={token['id']}&group_by=hour",
                                  headers=ADMIN)).json()
    assert one["total"] == {"calls": 3, "errors": 1, "prompt_tokens": 5,
                            "completion_tokens": 7}
    assert one["usage"][0]["hour"].endswith(":00Z")
    later = await (await client.get("/v1/usage?since=2999-01-01", headers=ADMIN)).json()
    assert later["usage"] == [] and later["total"]["calls"] == 0
    metrics = (await (await client.get("/metrics", headers=ADMIN)).text()).splitlines()
    assert 'berth_model_tokens_total{endpoint="llm",kind="completion",model="llama"} 6.0' \
        in metrics
    for bad in ("group_by=week", "since=yesterday", "until=nan"):
        resp = await client.get(f"/v1/usage?{bad}", headers=ADMIN)
        assert resp.status == 400, bad
    resp = await client.get("/v1/usage", headers={"Authorization": f"Bearer {token['token']}"})
    assert resp.status == 403  # usage is the admin's


async def test_a_token_over_its_limits_is_told_when_to_come_back(api):
    import openai

    h, client = await api({"llm": endpoint("llm", min_replicas=1, models=["llama"])})
    pool = h.reconciler.pool("llm")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="llm ready")
    resp = await client.post("/v1/endpoints/llm/tokens", headers=ADMIN,
                             json={"requests_per_minute": 2})
    token = await resp.json()
    assert resp.status == 201 and token["requests_per_minute"] == 2
    assert token["tokens_per_day"] is None
    user = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{client.port}/v1",
                              api_key=token["token"], max_retries=0)
    chat = {"model": "llama", "messages": [{"role": "user", "content": "one two three"}]}
    try:
        await user.chat.completions.create(**chat)
        await user.chat.completions.create(**chat)
        with pytest.raises(openai.RateLimitError) as limited:
            await user.chat.completions.create(**chat)
        assert limited.value.code == "rate_limit_exceeded"
        assert 55 <= int(limited.value.response.headers["Retry-After"]) <= 60
        # /invoke is the same token's door: the same window.
        resp = await client.get("/invoke/llm/echo",
                                headers={"Authorization": f"Bearer {token['token']}"})
        assert resp.status == 429 and (await resp.json())["error"]["code"] == \
            "rate_limit_exceeded"
        resp = await client.post("/async/llm/echo",
                                 headers={"Authorization": f"Bearer {token['token']}"})
        assert resp.status == 429 and "Retry-After" in resp.headers
        # Lifted, then a daily budget of 25 model tokens: 14 are spent (two calls of 3 + 4),
        # two more calls fit (21, then 28), the next waits for UTC midnight.
        resp = await client.patch(f"/v1/endpoints/llm/tokens/{token['id']}", headers=ADMIN,
                                  json={"requests_per_minute": None, "tokens_per_day": 25})
        assert resp.status == 200 and (await resp.json())["tokens_per_day"] == 25
        await user.chat.completions.create(**chat)
        await user.chat.completions.create(**chat)
        with pytest.raises(openai.RateLimitError) as spent:
            await user.chat.completions.create(**chat)
        assert "used 28 of its 25 model tokens" in spent.value.message
        assert 1 <= int(spent.value.response.headers["Retry-After"]) <= 86400
    finally:
        await user.close()
    listed = await (await client.get("/v1/endpoints/llm/tokens", headers=ADMIN)).json()
    assert [(t["requests_per_minute"], t["tokens_per_day"]) for t in listed["tokens"]] == \
        [(None, 25)]
    for bad in ({"requests_per_minute": 0}, {"tokens_per_day": "many"}, {"rpm": 5}):
        resp = await client.post("/v1/endpoints/llm/tokens", headers=ADMIN, json=bad)
        assert resp.status == 422, bad
    resp = await client.patch("/v1/endpoints/llm/tokens/tok_nope", headers=ADMIN,
                              json={"tokens_per_day": 5})
    assert resp.status == 404


async def test_a_budgeted_tokens_streams_are_counted_even_without_include_usage(api):
    h, client = await api({"llm": endpoint("llm", min_replicas=1, models=["llama"])})
    pool = h.reconciler.pool("llm")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="llm ready")
    token = await (await client.post("/v1/endpoints/llm/tokens", headers=ADMIN,
                                     json={"tokens_per_day": 1000})).json()
    resp = await client.post("/v1/chat/completions", headers={
        "Authorization": f"Bearer {token['token']}"}, json={
        "model": "llama", "stream": True, "messages": [{"role": "user", "content": "a b c"}]})
    assert resp.status == 200
    assert b'"usage"' in await resp.read()  # berth asked the model for it
    usage = await (await client.get(f"/v1/usage?token={token['id']}", headers=ADMIN)).json()
    assert usage["total"]["prompt_tokens"] == 3 and usage["total"]["completion_tokens"] == 4
    # /invoke with the path encoded is still an OpenAI route to the model: metered.
    resp = await client.post("/invoke/llm/%76%31/chat/completions", headers={
        "Authorization": f"Bearer {token['token']}", "Content-Type": "application/json"},
        data=json.dumps({"model": "llama", "messages": [{"role": "user", "content": "x"}]}))
    assert resp.status == 200
    usage = await (await client.get(f"/v1/usage?token={token['id']}", headers=ADMIN)).json()
    assert usage["total"]["prompt_tokens"] == 4
    # ... and a streamed one there asks for its usage too (else the budget counted nothing).
    resp = await client.post("/invoke/llm/v1/chat/completions", headers={
        "Authorization": f"Bearer {token['token']}", "Content-Type": "application/json"},
        data=json.dumps({"model": "llama", "stream": 1,  # (a model server's parser: true)
                         "messages": [{"role": "user", "content": "y z"}]}))
    assert resp.status == 200 and b'"usage"' in await resp.read()
    usage = await (await client.get(f"/v1/usage?token={token['id']}", headers=ADMIN)).json()
    assert usage["total"]["prompt_tokens"] == 6


def test_the_sse_meter_and_rewriter_take_a_long_line_in_tiny_pieces_in_linear_time():
    import time

    from berth.daemon.openai_api import renamer
    from berth.daemon.sse import SseRewriter

    line = b'data: {"model": "/m", "usage": {"prompt_tokens": 1}, "x": "' + b"a" * 500_000
    meter, sse = UsageMeter(), SseRewriter(renamer("llama", "/m"))
    meter.sse = True
    started = time.perf_counter()
    out = b""
    for i in range(0, len(line), 16):  # 31,000 tiny pieces
        meter.feed(line[i:i + 16])
        out += sse.feed(line[i:i + 16])
    meter.feed(b'"}\n\n')
    out += sse.feed(b'"}\n\n')
    assert time.perf_counter() - started < 2.0
    assert meter.tokens == (1, 0) and out.startswith(b'data: {"model": "llama"')


async def budgeted_llm(api, tokens_per_day: int) -> tuple[object, dict, dict]:
    """A ready "llm" endpoint and a token of it with a daily budget: (client, token, auth)."""
    h, client = await api({"llm": endpoint("llm", min_replicas=1, models=["llama"])})
    pool = h.reconciler.pool("llm")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="llm ready")
    token = await (await client.post("/v1/endpoints/llm/tokens", headers=ADMIN,
                                     json={"tokens_per_day": tokens_per_day})).json()
    return client, token, {"Authorization": f"Bearer {token['token']}"}


async def task_ended(client, task_id: str, auth: dict) -> dict:
    for _ in range(500):
        task = await (await client.get(f"/tasks/{task_id}", headers=auth)).json()
        if task["status"] in ("succeeded", "failed", "cancelled"):
            return task
        await asyncio.sleep(0.02)
    raise AssertionError(f"task {task_id} did not end: {task}")


async def test_a_budgeted_tokens_async_calls_are_counted_and_held_to_its_budget(api):
    # A task's answer was never metered: /async let a token with a daily budget spend freely.
    client, token, auth = await budgeted_llm(api, 5)
    chat = {"model": "llama", "messages": [{"role": "user", "content": "a b c"}]}
    # Streamed, with no usage asked for, at the path as a client may encode it: still counted
    task = await (await client.post("/async/llm/%76%31/chat/completions", headers=auth,
                                    json={**chat, "stream": True})).json()
    assert (await task_ended(client, task["id"], auth))["status"] == "succeeded"
    usage = await (await client.get(f"/v1/usage?token={token['id']}", headers=ADMIN)).json()
    assert (usage["total"]["prompt_tokens"], usage["total"]["completion_tokens"]) == (3, 4)
    resp = await client.post("/async/llm/v1/chat/completions", headers=auth, json=chat)
    assert resp.status == 429  # 7 tokens of 5 spent: the next is refused


async def test_a_budgeted_tokens_streamed_task_with_a_body_kept_in_a_file_asks_for_usage(api):
    # A body over 64 KiB is kept in a file, not in SQLite: it was stored unread, so a streamed
    # task asked for no usage and the budget counted nothing.
    client, token, auth = await budgeted_llm(api, 1000)
    chat = {"model": "llama", "stream": True,
            "messages": [{"role": "user", "content": "x" * 70_000}]}  # one word, 70 KB
    task = await (await client.post("/async/llm/v1/chat/completions", headers=auth,
                                    json=chat)).json()
    assert (await task_ended(client, task["id"], auth))["status"] == "succeeded"
    usage = await (await client.get(f"/v1/usage?token={token['id']}", headers=ADMIN)).json()
    assert (usage["total"]["prompt_tokens"], usage["total"]["completion_tokens"]) == (1, 2)


async def test_a_budgeted_tokens_tasks_queued_in_a_burst_stop_when_the_budget_is_spent(api):
    # Each was admitted at submit, when nothing was counted yet: all of them ran.
    client, token, auth = await budgeted_llm(api, 5)
    # (the model takes 0.5 s: all three are submitted while the first runs, none counted)
    chat = {"model": "llama", "sleep_s": 0.5, "messages": [{"role": "user", "content": "a b c"}]}
    ids = [(await (await client.post("/async/llm/v1/chat/completions", headers=auth,
                                     json=chat)).json())["id"] for _ in range(3)]
    done = [await task_ended(client, task_id, auth) for task_id in ids]
    assert [t["status"] for t in done] == ["succeeded", "failed", "failed"]
    assert all("daily budget" in t["error"] for t in done[1:])
    usage = await (await client.get(f"/v1/usage?token={token['id']}", headers=ADMIN)).json()
    assert usage["total"]["prompt_tokens"] == 3  # one call's worth, not three
