"""The multipart OpenAI routes (`/v1/audio/transcriptions`, `/translations`): routed by the
form's `model` field, read only that far; the audio streams to the replica."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import aiohttp
import pytest

from berth.daemon.openai_form import FormError, boundary_of, find_field
from helpers import endpoint, ready_count, wait_for

ADMIN = {"Authorization": "Bearer admin-secret"}
B = b"XyZ"


def form(*parts: tuple[bytes, bytes, bool]) -> bytes:
    out = b""
    for name, value, is_file in parts:
        filename = b'; filename="a.wav"' if is_file else b""
        out += (b"--" + B + b'\r\nContent-Disposition: form-data; name="' + name + b'"' +
                filename + b"\r\n\r\n" + value + b"\r\n")
    return out + b"--" + B + b"--\r\n"


MODEL_FIRST = form((b"model", b"whisper", False), (b"file", b"\0" * 100, True))
FILE_FIRST = form((b"file", b"\0" * 100, True), (b"model", b"whisper", False))


@pytest.mark.parametrize(("head", "complete", "value"), [
    (MODEL_FIRST, True, b"whisper"),
    (MODEL_FIRST[:70], False, b"whisper"),       # the value is whole, the file not yet
    (FILE_FIRST, True, b"whisper"),              # later in the form, still in what was read
    (MODEL_FIRST[:50], False, None),             # the value may go on: read more
    (FILE_FIRST[:120], False, None),
    (form((b"file", b"model", True), (b"model", b"m", False)), True, b"m"),  # a file's name
])
def test_find_field(head, complete, value):
    found = find_field(head, B, b"model", complete)
    assert (head[found.start:found.end] if found else None) == value


@pytest.mark.parametrize(("head", "message"), [
    (form((b"file", b"\0", True)), "no `model` field"),
    (form((b"model", b"m", True)), "no `model` field"),  # a file called model is not it
    (b"plain text", "not a multipart form"),
])
def test_a_form_without_a_model_is_refused(head, message):
    with pytest.raises(FormError, match=message):
        find_field(head, B, b"model", complete=True)


@pytest.mark.parametrize("content_type", ["application/json", "multipart/form-data",
                                          "text/plain; boundary=x"])
def test_boundary_is_required(content_type):
    with pytest.raises(FormError):
        boundary_of(content_type)


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # translations, in the SDK
async def test_transcriptions_route_by_the_form_and_stream_the_audio(api):
    import openai

    h, client = await api({"asr": endpoint("asr", min_replicas=1, models=["whisper"],
                                           upstream_model="/models/whisper-large-v3")})
    pool = h.reconciler.pool("asr")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    audio = os.urandom(3 * 1024 * 1024)
    sdk = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{client.port}/v1",
                             api_key="admin-secret", max_retries=0)
    try:
        raw = await sdk.audio.transcriptions.with_raw_response.create(
            model="whisper", file=("a.wav", audio))
        seen = raw.http_response.json()
        translated = await sdk.audio.translations.create(model="whisper", file=("b.wav", b"x"))
    finally:
        await sdk.close()
    assert seen["text"] == f"{len(audio)} bytes of audio"
    assert seen["received_model"] == "/models/whisper-large-v3"  # renamed in the form
    assert seen["audio_sha256"] == hashlib.sha256(audio).hexdigest()
    assert raw.http_response.headers["X-Berth-Replica"] in pool.replicas
    assert translated.text == "1 bytes of audio"


async def test_the_audio_reaches_the_replica_before_the_upload_ends(api):
    h, client = await api({"asr": endpoint("asr", min_replicas=1, models=["whisper"],
                                           upstream_model="big")})
    pool = h.reconciler.pool("asr")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    [replica] = pool.replicas.values()
    more = asyncio.Event()
    head = b"--" + B + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n' + \
        b"--" + B + b'\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
    tail = b"\1" * 100_000 + b"\r\n--" + B + b"--\r\n"

    async def upload():
        yield head + b"\1" * 100_000
        await more.wait()  # the rest only once the call is on the replica
        yield tail

    call = asyncio.ensure_future(client.post(
        "/v1/audio/transcriptions", data=upload(), headers={
            **ADMIN, "Content-Type": f"multipart/form-data; boundary={B.decode()}",
            "Content-Length": str(len(head) + 100_000 + len(tail))}))
    await wait_for(pool, lambda: replica.in_flight == 1, what="the call on the replica")
    assert not call.done()
    more.set()
    resp = await call
    seen = await resp.json()
    assert resp.status == 200 and seen["text"] == "200000 bytes of audio"
    assert seen["received_model"] == "big"
    # The length was corrected for the renamed model ("whisper" -> "big").
    assert int(seen["content_length"]) == len(head) + 100_000 + len(tail) - 4


async def test_bad_forms_get_openai_errors(api):
    _, client = await api({"asr": endpoint("asr", models=["whisper"])}, max_body_bytes=4096)
    multipart = {**ADMIN, "Content-Type": f"multipart/form-data; boundary={B.decode()}"}
    cases = [
        (form((b"file", b"\0", True)), multipart, 400, "missing_model"),
        (form((b"model", b"nope", False)), multipart, 404, "model_not_found"),
        (b"{}", {**ADMIN, "Content-Type": "application/json"}, 400, "bad_form"),
        (form((b"model", b"whisper", False), (b"file", b"\0" * 5000, True)), multipart, 413,
         "payload_too_large"),
    ]
    for data, headers, status, code in cases:
        resp = await client.post("/v1/audio/transcriptions", data=data, headers=headers)
        error = (await resp.json())["error"]
        assert (resp.status, error["code"]) == (status, code), data[:60]
        if status == 400:
            assert error["param"] == "model"
    # Nothing was started for any of them.
    assert not (await (await client.get("/v1/endpoints/asr", headers=ADMIN)).json())["replicas"]
    async with aiohttp.ClientSession() as s:  # and a truncated form: no model, no hang
        resp = await s.post(f"http://127.0.0.1:{client.port}/v1/audio/translations",
                            data=form((b"model", b"whisper", False))[:30], headers=multipart)
        assert resp.status == 400


def test_hostile_part_headers_cost_little():
    # A header line repeated 20,000 times took 12 s with an unanchored pattern (review): now
    # the pattern is linear, and a header block past 8 KiB is not a form's at all.
    from berth.daemon.openai_form import NAME

    evil = b"content-disposition:" * 20000
    started = time.perf_counter()
    assert NAME.search(evil) is None
    with pytest.raises(FormError, match="too long"):
        find_field(b"--" + B + b"\r\n" + evil + b"\r\n\r\nx\r\n--" + B, B, b"model",
                   complete=False)
    assert time.perf_counter() - started < 1.0
    with pytest.raises(FormError, match="too long"):
        find_field(b"--" + B + b"\r\n" + b"x" * 10_000, B, b"model", complete=False)
