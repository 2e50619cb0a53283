"""Model names on endpoints (the OpenAI front door's routing key): `models` defaults to the
endpoint's name, names are unique across endpoints in the file, over the API and on reload,
and `upstream_model` is kept as given."""

from __future__ import annotations

import asyncio
import signal

import pytest

from berth.daemon.config import ConfigError, EndpointSpec, model_clashes, parse_config
from helpers import Berthd, body, endpoint, ready_count, wait_for

ADMIN = {"Authorization": "Bearer admin-secret"}


def spec(name: str, **fields) -> EndpointSpec:
    return EndpointSpec.model_validate({"name": name, "image": "x", **fields})


@pytest.mark.parametrize(("specs", "clashes"), [
    ([spec("a"), spec("b")], {}),
    ([spec("a", models=["llama"]), spec("b", models=["qwen"])], {}),
    ([spec("a", models=["llama"]), spec("b", models=["llama"])], {"llama": ("a", "b")}),
    ([spec("a", models=["b"]), spec("b")], {"b": ("a", "b")}),  # the default [name] counts
    ([spec("a", models=["x", "y"]), spec("b", models=["y"]), spec("c", models=["x"])],
     {"x": ("a", "c"), "y": ("a", "b")}),
])
def test_model_clashes(specs, clashes):
    assert model_clashes(specs) == clashes


def test_model_fields_in_the_file():
    config = parse_config({"endpoints": {
        "llm": {"image": "x", "models": ["meta-llama/Llama-3.1-8B-Instruct", "llama"],
                "upstream_model": "/models/llama-3.1-8b"},
        "embed": {"image": "x"}}})
    assert config.endpoints["llm"].model_names == ["meta-llama/Llama-3.1-8B-Instruct", "llama"]
    assert config.endpoints["embed"].model_names == ["embed"]
    llm, embed = config.endpoints["llm"], config.endpoints["embed"]
    assert [llm.serves(m) for m in ("llama", "llm", "embed")] == [True, False, False]
    assert [embed.serves(m) for m in ("embed", "llama")] == [True, False]
    assert (llm.first_model, embed.first_model) == ("meta-llama/Llama-3.1-8B-Instruct", "embed")
    assert config.endpoints["llm"].upstream_model == "/models/llama-3.1-8b"
    with pytest.raises(ConfigError) as caught:
        parse_config({"endpoints": {"a": {"image": "x", "models": ["m", "bad name"]},
                                    "b": {"image": "x", "models": []},
                                    "c": {"image": "x", "models": ["m2", "m2"]},
                                    "d": {"image": "x", "models": ["shared"]},
                                    "e": {"image": "x", "models": ["shared"]}}})
    paths = [i.path for i in caught.value.issues]
    assert paths == ["endpoints.a.models", "endpoints.b.models", "endpoints.c.models",
                     "endpoints.e.models"]
    assert "'shared' is also served by endpoint d" in str(caught.value.issues[-1])


async def test_the_api_refuses_a_model_another_endpoint_serves(api):
    _, client = await api({"filed": endpoint("filed", models=["llama"])})
    resp = await client.post("/v1/endpoints", json=body("mine", models=["llama"]),
                             headers=ADMIN)
    error = (await resp.json())["error"]
    assert resp.status == 409 and error["code"] == "model_conflict"
    assert "served by endpoint filed" in error["message"]
    resp = await client.post("/v1/endpoints", json=body("llama"), headers=ADMIN)
    assert resp.status == 409  # its default model name is taken too
    resp = await client.post("/v1/endpoints", json=body("mine", models=["qwen"]), headers=ADMIN)
    assert resp.status == 201 and (await resp.json())["spec"]["models"] == ["qwen"]
    resp = await client.patch("/v1/endpoints/mine", json={"models": ["qwen", "llama"]},
                              headers=ADMIN)
    assert resp.status == 409
    resp = await client.patch("/v1/endpoints/mine", json={"upstream_model": "Qwen/Qwen2.5"},
                              headers=ADMIN)
    assert resp.status == 200 and (await resp.json())["spec"]["upstream_model"] == "Qwen/Qwen2.5"


def test_a_reload_that_would_share_a_model_is_refused(tmp_path, network, model_image,
                                                      docker_host):
    config = tmp_path / "config.toml"
    head = (f'[daemon]\nlisten = "127.0.0.1:0"\nstate_dir = "{tmp_path / "state"}"\n'
            f'log_format = "json"\n[docker]\nnetwork = "{network}"\n[gpu]\nsource = "none"\n')
    config.write_text(head + f'[endpoints.filed]\nimage = "{model_image}"\n')
    d = Berthd(tmp_path, config)
    try:
        d.wait_message("READY=1")
        status, _ = d.request("POST", "/v1/endpoints",
                              {"name": "made", "image": model_image, "models": ["llama"]})
        assert status == 201
        config.write_text(head + f'[endpoints.filed]\nimage = "{model_image}"\n'
                                 'models = ["llama"]\n')
        d.signal(signal.SIGHUP)
        d.wait_message("READY=1")
        assert d.endpoint("filed")["spec"]["models"] is None  # the old config keeps serving
        _, events = d.get("/v1/events")
        refused = [e for e in events["events"] if e["kind"] == "reload_refused"]
        assert refused and "'llama' is also served by endpoint" in refused[-1]["message"]
    finally:
        d.close()


async def test_v1_models_lists_what_the_key_may_call_without_starting_anything(api):
    h, client = await api({
        "pub": endpoint("pub", public=True, models=["m-pub"]),
        "priv": endpoint("priv", min_replicas=1, models=["m1", "org/m2"]),
        "cold": endpoint("cold")})
    pool = h.reconciler.pool("priv")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="priv ready")
    resp = await client.get("/v1/models", headers=ADMIN)
    listing = await resp.json()
    assert resp.status == 200 and listing["object"] == "list"
    by_id = {m["id"]: m for m in listing["data"]}
    assert sorted(by_id) == ["cold", "m-pub", "m1", "org/m2"]
    assert by_id["m1"]["berth"] == {"endpoint": "priv", "state": "ready", "ready_replicas": 1}
    assert by_id["cold"]["berth"]["state"] == "cold"
    assert by_id["m1"]["object"] == "model" and by_id["m1"]["owned_by"] == "berth"
    assert isinstance(by_id["m1"]["created"], int) and by_id["m1"]["created"] > 0
    assert not h.reconciler.pool("cold").replicas  # listing started nothing
    token = (await (await client.post("/v1/endpoints/priv/tokens", headers=ADMIN)).json())
    as_priv = {"x-api-key": token["token"]}  # the header Anthropic-style clients send
    ids = [m["id"] for m in (await (await client.get("/v1/models", headers=as_priv)).json())
           ["data"]]
    assert sorted(ids) == ["m-pub", "m1", "org/m2"]
    ids = [m["id"] for m in (await (await client.get("/v1/models")).json())["data"]]
    assert ids == ["m-pub"]  # no key: public models only
    resp = await client.get("/v1/models/org/m2", headers=ADMIN)
    assert resp.status == 200 and (await resp.json())["id"] == "org/m2"
    resp = await client.get("/v1/models/cold", headers=as_priv)
    assert resp.status == 404 and (await resp.json())["error"] == {
        "message": "The model 'cold' does not exist or you do not have access to it.",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    resp = await client.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "unauthorized"


async def test_chat_completions_route_by_model_through_the_invoke_path(api):
    h, client = await api({
        "llm": endpoint("llm", min_replicas=1, models=["llama", "llama-big"],
                        upstream_model="/models/llama-3.1"),
        "emb": endpoint("emb", public=True, models=["bge"]),
        "other": endpoint("other", models=["qwen"])})
    pool = h.reconciler.pool("llm")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="llm ready")
    [replica] = pool.replicas.values()
    chat = {"model": "llama-big", "messages": [{"role": "user", "content": "hello there"}]}
    resp = await client.post("/v1/chat/completions", json=chat, headers=ADMIN)
    answer = await resp.json()
    assert resp.status == 200 and resp.headers["X-Berth-Replica"] == replica.id
    # The replica saw its own name for the model; the client gets back the one it asked for.
    assert answer["received_model"] == "/models/llama-3.1"
    assert answer["model"] == "llama-big" and answer["usage"]["prompt_tokens"] == 2
    assert answer["choices"][0]["message"]["content"] == "echo: hello there"
    resp = await client.post("/v1/embeddings", json={"model": "bge", "input": "x"})
    assert resp.status == 200 and (await resp.json())["model"] == "bge"  # public, scaled up
    token = (await (await client.post("/v1/endpoints/other/tokens", headers=ADMIN)).json())
    cases = [
        ({"messages": []}, ADMIN, 400, "missing_model", "model"),
        ({"model": 7}, ADMIN, 400, "missing_model", "model"),
        ({"model": "gpt-5"}, ADMIN, 404, "model_not_found", "model"),
        (chat, {}, 401, "unauthorized", None),
        (chat, {"x-api-key": token["token"]}, 403, "forbidden", None),
    ]
    for body_, headers, status, code, param in cases:
        resp = await client.post("/v1/chat/completions", json=body_, headers=headers)
        error = (await resp.json())["error"]
        assert (resp.status, error["code"], error["param"]) == (status, code, param), body_
        assert set(error) == {"message", "type", "param", "code"}
    resp = await client.post("/v1/chat/completions", data=b"{nope", headers=ADMIN)
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "bad_json"


def test_no_openai_path_shadows_a_control_path(tmp_path):
    from berth.daemon.control import ROUTES
    from berth.daemon.openai_api import FORM_ROUTES, JSON_ROUTES

    control = {(m, p) for m, p, _ in ROUTES}
    openai = {("POST", f"/v1/{p}") for p in (*JSON_ROUTES, *FORM_ROUTES)} | {
        ("GET", "/v1/models"), ("GET", "/v1/models/{model}")}
    assert len(openai) == 12 and not control & openai
    # endpoints, secrets, events, gpus, usage
    prefixes = {p.split("/")[2] for _, p in control}
    assert not prefixes & {p.split("/")[2] for _, p in openai}


async def test_the_openai_sdk_talks_to_berth_and_raises_its_own_errors(api):
    import openai

    h, client = await api({
        "llm": endpoint("llm", min_replicas=1, max_replicas=1, queue_limit=0,
                        models=["llama"]),
        "emb": endpoint("emb", public=True, models=["bge"])})
    pool = h.reconciler.pool("llm")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="llm ready")
    sdk = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{client.port}/v1",
                             api_key="admin-secret", max_retries=0)
    try:
        assert sorted(m.id for m in (await sdk.models.list()).data) == ["bge", "llama"]
        chat = await sdk.chat.completions.create(
            model="llama", messages=[{"role": "user", "content": "hi berth"}])
        assert chat.model == "llama" and chat.choices[0].message.content == "echo: hi berth"
        assert chat.usage is not None and chat.usage.prompt_tokens == 2
        embedded = await sdk.embeddings.create(model="bge", input="x")
        assert embedded.data[0].embedding == [0.1, 0.2, 0.3]
        with pytest.raises(openai.NotFoundError) as missing:
            await sdk.chat.completions.create(model="gpt-5", messages=[])
        assert missing.value.code == "model_not_found"
        busy = asyncio.ensure_future(client.get("/invoke/llm/sleep?s=1.5", headers=ADMIN))
        await wait_for(pool, lambda: pool.demand() == 1, what="the one slot taken")
        with pytest.raises(openai.RateLimitError) as limited:  # queue_limit 0: no waiting
            await sdk.chat.completions.create(model="llama", messages=[])
        assert limited.value.code == "queue_full"
        assert limited.value.response.headers["Retry-After"] == "1"
        assert (await busy).status == 200
        wrong = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{client.port}/v1",
                                   api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await wrong.chat.completions.create(model="llama", messages=[])
        await wrong.close()
    finally:
        await sdk.close()


async def test_a_streamed_chat_carries_the_clients_model_name_in_every_chunk(api):
    import openai

    h, client = await api({"llm": endpoint("llm", min_replicas=1, models=["llama"],
                                           upstream_model="/models/llama-3.1")})
    pool = h.reconciler.pool("llm")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="llm ready")
    sdk = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{client.port}/v1",
                             api_key="admin-secret", max_retries=0)
    try:
        stream = await sdk.chat.completions.create(
            model="llama", messages=[{"role": "user", "content": "one two three"}],
            stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
    finally:
        await sdk.close()
    assert {c.model for c in chunks} == {"llama"}  # the upstream name never reaches the client
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: one two three "
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 3


def test_sse_rewriter_keeps_the_stream_as_it_comes():
    from berth.daemon.openai_api import renamer
    from berth.daemon.sse import SseRewriter

    sse = SseRewriter(renamer("llama", "/m"))
    out = sse.feed(b'data: {"model": "/m", "i": 1}\n\nda')
    assert out == b'data: {"model": "llama", "i": 1}\n\n'  # the unfinished line waits
    assert sse.feed(b'ta: {"model": "/m"}\n') == b'data: {"model": "llama"}\n'
    passing = b": keep-alive\n\ndata: [DONE]\n\n"
    assert sse.feed(passing) == passing
    assert sse.feed(b'data: {"model": "other"}') == b""
    assert sse.flush() == b'data: {"model": "other"}'


def test_sse_rewriter_holds_at_most_a_bounded_line():
    from berth.daemon.openai_api import renamer
    from berth.daemon.sse import MAX_HELD, SseRewriter

    sse = SseRewriter(renamer("llama", "/m"))
    long = b'data: {"model": "/m", "x": "' + b"a" * MAX_HELD
    assert sse.feed(long) == long  # passed on as it came, not held
    assert len(sse.tail) == 0
    assert sse.feed(b"aaa") == b"aaa"
    assert sse.feed(b'"}\n\ndata: {"model": "/m"}\n') == b'"}\n\ndata: {"model": "llama"}\n'


async def test_the_sdk_raises_its_typed_errors_for_berths_answers(api):
    import openai

    h, client = await api({
        "llm": endpoint("llm", min_replicas=1, models=["llama"], request_timeout_s=0.3),
        "sick": endpoint("sick", models=["sick"], startup_timeout_s=0.5,
                         env={"MODEL_FAIL_HEALTH": "1"}),
        "other": endpoint("other", models=["qwen"])}, max_body_bytes=2048)
    pool = h.reconciler.pool("llm")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="llm ready")
    token = (await (await client.post("/v1/endpoints/other/tokens", headers=ADMIN)).json())
    base = f"http://127.0.0.1:{client.port}/v1"
    sdk = openai.AsyncOpenAI(base_url=base, api_key="admin-secret", max_retries=0)
    other = openai.AsyncOpenAI(base_url=base, api_key=token["token"], max_retries=0)
    hi = [{"role": "user", "content": "hi"}]
    cases = [
        (sdk.chat.completions.create(model=None, messages=hi),  # type: ignore[arg-type]
         openai.BadRequestError, 400, "missing_model"),
        (other.chat.completions.create(model="llama", messages=hi),
         openai.PermissionDeniedError, 403, "forbidden"),
        (sdk.chat.completions.create(model="llama", messages=[
            {"role": "user", "content": "x" * 4096}]), openai.APIStatusError, 413,
         "payload_too_large"),
        (sdk.chat.completions.create(model="sick", messages=hi),
         openai.InternalServerError, 503, "no_capacity"),
        (sdk.chat.completions.create(model="llama", messages=hi, extra_body={"sleep_s": 2}),
         openai.InternalServerError, 504, "timeout"),
    ]
    try:
        for coro, kind, status, code in cases:
            with pytest.raises(kind) as caught:
                await coro
            assert (caught.value.status_code, caught.value.code) == (status, code)
    finally:
        await sdk.close()
        await other.close()


async def test_open_mode_takes_any_key(harness, aiohttp_client):
    from berth.daemon.app import build_app

    h = await harness()
    await h.reconciler.apply_specs({"llm": endpoint("llm", min_replicas=1, models=["llama"])},
                                   "config")
    pool = h.reconciler.pool("llm")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="llm ready")
    client = await aiohttp_client(build_app(h.reconciler, h.reconciler.allocator))
    for headers in ({}, {"Authorization": "Bearer anything"}, {"x-api-key": "sk-whatever"}):
        resp = await client.post("/v1/chat/completions", headers=headers, json={
            "model": "llama", "messages": [{"role": "user", "content": "hi"}]})
        assert resp.status == 200, headers


async def test_a_huge_json_body_is_refused_before_it_is_read(api):
    _, client = await api({"llm": endpoint("llm", models=["llama"])}, max_body_bytes=4096)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Authorization: Bearer admin-secret\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1073741824\r\n\r\n" + b'{"model": "llama", "x": "')
    await writer.drain()
    # Answered while 1 GiB is still to come: berth read none of it.
    status = await asyncio.wait_for(reader.readline(), 5)
    assert status.startswith(b"HTTP/1.1 413")
    writer.close()

    async def endless():  # chunked, no length: cut off once past the limit
        yield b'{"model": "llama", "x": "'
        for _ in range(10_000):
            yield b"x" * 1024
    resp = await client.post("/v1/chat/completions", data=endless(), headers={
        **ADMIN, "Content-Type": "application/json"})
    assert resp.status == 413 and (await resp.json())["error"]["code"] == "payload_too_large"


async def test_berths_key_never_reaches_the_model_and_anonymous_bodies_are_not_read(api):
    _, client = await api({"llm": endpoint("llm", min_replicas=1, models=["llama"])})
    chat = {"model": "llama", "messages": [{"role": "user", "content": "hi"}]}
    for headers in (ADMIN, {"x-api-key": "admin-secret"}):
        resp = await client.post("/v1/chat/completions", json=chat, headers=headers)
        assert resp.status == 200 and (await resp.json())["received_keys"] == [], headers
    # No key and no public endpoint: refused before the (declared 1 GiB) body is read.
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n{")
    await writer.drain()
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 401")
    writer.close()
    # A key that is not UTF-8 is a wrong key, not a crash.
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Authorization: Bearer \xff\xfe\r\n\r\n")
    await writer.drain()
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 401")
    writer.close()
