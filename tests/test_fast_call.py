"""The fast path (daemon/fast_call.py): the common call served from the connections'
callbacks, and every other outcome handed on to the task's way. Each test makes its calls on a
connection to the replica that is already kept alive (what the fast path needs), on one
kept-alive client connection, and tells by the tasks the front starts which way a call went."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import re
import sys
import time
from collections.abc import Coroutine, Iterator
from typing import Any

import aiohttp

from berth.daemon import openai_api
from berth.daemon.fast_call import FastCall
from berth.daemon.front import MAX_PIPELINED
from berth.daemon.keys import AUTH
from berth.daemon.quota import TokenLimits

SERVE = "Front._serve"  # the task of a call that goes the task's way
# ... as mypyc names its coroutine when front.py runs compiled (daemon/native.py)
COMPILED = {"_serve_Front_gen": SERVE}
HTTP = " HTTP/1.1\nHost: 127.0.0.1\n"


@contextlib.contextmanager
def tasks_started() -> Iterator[list[str]]:
    """The qualified names of the coroutines of the tasks started meanwhile."""
    loop = asyncio.get_running_loop()
    names: list[str] = []
    before = loop.get_task_factory()

    def factory(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any],
                **kwargs: Any) -> asyncio.Task[Any]:
        kind = type(coro).__name__
        names.append(getattr(coro, "__qualname__", None) or COMPILED.get(kind, kind))
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(factory)  # type: ignore[arg-type]
    try:
        yield names
    finally:
        loop.set_task_factory(before)


class Client:
    """One kept-alive connection, one request at a time, answers read by Content-Length or
    chunks."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def call(self, head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        self.writer.write(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        return await self.answer(head_only=head.startswith("HEAD "))

    async def answer(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        status_line = await self.reader.readline()
        headers: dict[str, str] = {}
        while (line := await self.reader.readline()) != b"\r\n":
            if not line:  # (closed: fail, not read the end for ever)
                raise ConnectionResetError(f"closed after {status_line!r} {headers}")
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        if head_only:
            answer = b""
        elif "content-length" in headers:
            answer = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            answer = b""
            while size := int((await self.reader.readline()).strip(), 16):
                answer += (await self.reader.readexactly(size + 2))[:-2]
            await self.reader.readline()
        else:
            answer = b""
        return int(status_line.split()[1]), headers, answer


@contextlib.asynccontextmanager
async def client(address: str) -> Any:
    host, port = address.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        yield Client(reader, writer)
    finally:
        writer.close()


async def warm(c: Client) -> None:
    """One call, so that a connection to the replica is kept alive for the next."""
    status, _, _ = await c.call("GET /invoke/h/echo" + HTTP)
    assert status == 200


async def test_common_calls_take_no_task_and_the_rest_go_the_tasks_way(front):
    address, pool = await front()
    async with client(address) as c:
        await warm(c)
        with tasks_started() as started:
            for i in range(5):
                status, headers, body = await c.call(f"GET /invoke/h/echo?i={i}" + HTTP +
                                                     f"X-Request-Id: r{i}\n")
                assert status == 200 and json.loads(body)["query"] == {"i": str(i)}
                assert headers["x-berth-replica"] == next(iter(pool.replicas))
                sent = b'{"n": %d}' % i
                status, _, body = await c.call(
                    "POST /invoke/h/echo" + HTTP + f"Content-Length: {len(sent)}\n", sent)
                assert status == 200 and json.loads(body)["body"] == sent.decode()
                status, _, body = await c.call(
                    "POST /invoke/h/echo" + HTTP + "Transfer-Encoding: chunked\n",
                    b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
                seen = json.loads(body)
                assert status == 200 and seen["body"] == "abcde"
                assert seen["headers"]["Transfer-Encoding"] == "chunked"
        assert started.count(SERVE) == 0, started  # 15 calls, none in a task
        with tasks_started() as started:
            replica = next(iter(pool.replicas))
            status, headers, _ = await c.call(
                "GET /invoke/h/echo" + HTTP + f"X-Berth-Replica: {replica}\n")
            assert status == 200 and headers["x-berth-replica"] == replica
            status, _, _ = await c.call("HEAD /invoke/h/echo" + HTTP)
            assert status == 200
        assert started.count(SERVE) == 2, started  # a pin and a HEAD go the task's way


async def test_openai_json_calls_take_no_task_and_count_as_the_model_asked(front, monkeypatch):
    """/v1 JSON calls share the fast path (its `model` read from the whole body, renamed
    both ways, its usage counted under the name asked); what the fast path cannot tell or
    hold (a stream, an error to say) goes serve_openai's way and is answered as ever, with
    the body the fast path parsed (read again only when it was no JSON object)."""
    read_again: list[int] = []
    read_json = openai_api.read_json

    async def counted(request: Any) -> Any:
        read_again.append(1)
        return await read_json(request)

    monkeypatch.setattr(openai_api, "read_json", counted)
    address, pool = await front(models=["llama", "l2"], upstream_model="real-name")
    async with client(address) as c:
        await warm(c)
        with tasks_started() as started:
            for words in ("a", "b c"):
                sent = json.dumps({"model": "l2", "messages": [
                    {"role": "user", "content": words}]}).encode()
                status, headers, body = await c.call(
                    "POST /v1/chat/completions" + HTTP + f"Content-Length: {len(sent)}\n"
                    "Content-Type: application/json\n", sent)
                answer = json.loads(body)
                assert status == 200 and headers["x-berth-replica"] in pool.replicas
                assert (answer["model"], answer["received_model"]) == ("l2", "real-name")
        assert started.count(SERVE) == 0, started
        with tasks_started() as started:
            for sent, want in ((b'{"model": "l2", "stream": true, "messages": []}', 200),
                               (b'{"model": "nope"}', 404), (b'{"model": 7}', 400),
                               (b"not json", 400)):
                status, headers, body = await c.call(
                    "POST /v1/chat/completions" + HTTP + f"Content-Length: {len(sent)}\n",
                    sent)
                assert status == want, (sent, body)
                if want != 200:
                    assert set(json.loads(body)["error"]) == {"message", "type", "param",
                                                              "code"}
        assert started.count(SERVE) == 4, started
        assert len(read_again) == 1  # the body that is not JSON
    async with aiohttp.ClientSession() as s, s.get(f"http://{address}/metrics") as r:
        metrics = await r.text()
    # 1 + 2 words asked (and the stream's 0: it asked for no usage), each answered with one more
    assert 'berth_model_tokens_total{endpoint="h",kind="prompt",model="l2"} 3.0' in metrics
    assert 'berth_model_tokens_total{endpoint="h",kind="completion",model="l2"} 5.0' \
        in metrics
    assert re.search(r'berth_calls_total\{code="200",endpoint="h"\} 4\.0', metrics), metrics


async def test_a_token_without_limits_takes_the_fast_path_and_one_with_limits_does_not(front):
    """Only a call the quota must hold back goes the task's way: endpoint tokens without
    limits (most of them) are served like admin and public calls."""
    address, _ = await front()
    auth = front.apps[-1][AUTH]
    auth.remember("plain-secret", "h", "tok_plain")
    auth.remember("held-secret", "h", "tok_held", TokenLimits(requests_per_minute=1000))
    async with client(address) as c:
        await warm(c)
        with tasks_started() as started:
            for token in ("plain-secret", "held-secret", "plain-secret"):
                status, _, _ = await c.call("GET /invoke/h/echo" + HTTP +
                                            f"Authorization: Bearer {token}\n")
                assert status == 200
        assert started.count(SERVE) == 1, started
    # limits lifted (PATCH with both null) leave the token as one without any
    auth.set_limits("tok_held", TokenLimits())
    assert auth.limits == {}


async def test_calls_on_the_fast_path_leave_no_memory_behind(front):
    """Every call's objects are freed once it is answered. mypyc before 2.2 leaked the left
    operand of `bytes + bytes` (mypyc/mypyc#1192): the compiled front kept one to two
    blocks per call, and a berthd under load grew by ~6 MB a second."""
    address, _ = await front(models=["llama"])
    chat = json.dumps({"model": "llama", "messages": [{"role": "user", "content": "a"}]})
    calls = [("GET /invoke/h/echo" + HTTP, b""),
             ("POST /invoke/h/echo" + HTTP + "Content-Length: 7\n", b'{"a":1}'),
             ("POST /v1/chat/completions" + HTTP + f"Content-Length: {len(chat)}\n",
              chat.encode())]

    async def rounds(c: Client, n: int) -> None:
        for _ in range(n):
            for head, body in calls:
                status, _, _ = await c.call(head, body)
                assert status == 200

    async with client(address) as c:
        await rounds(c, 300)  # (caches, pools and free lists filled)
        gc.collect()
        before = sys.getallocatedblocks()
        await rounds(c, 1000)
        gc.collect()
        grown = sys.getallocatedblocks() - before
    assert grown < 600, f"{grown} blocks more after 3,000 calls"


async def test_answers_not_small_and_whole_are_handed_on_and_arrive_whole(front):
    address, pool = await front()
    async with client(address) as c:
        await warm(c)
        with tasks_started() as started:
            status, _, body = await c.call("GET /invoke/h/bytes?n=300000" + HTTP)
            assert status == 200 and len(body) == 300000
            status, headers, body = await c.call(
                "GET /invoke/h/stream?n=3&interval=0.01" + HTTP)
            assert status == 200 and headers["content-type"] == "text/event-stream"
            assert [json.loads(e[5:])["i"] for e in body.split(b"\n\n") if e] == [0, 1, 2]
            status, headers, body = await c.call("GET /invoke/h/status/204" + HTTP)
            assert status == 204 and body == b""
            status, _, body = await c.call("GET /invoke/h/echo" + HTTP)
            assert status == 200  # and the connection goes on
        assert started.count(SERVE) == 3, started
    assert next(iter(pool.replicas.values())).in_flight == 0


async def test_a_fast_call_past_its_deadline_gets_504_and_frees_its_slot(front):
    address, pool = await front(request_timeout_s=0.3)
    [replica] = pool.replicas.values()
    async with client(address) as c:
        await warm(c)
        began = time.monotonic()
        status, _, body = await c.call("GET /invoke/h/sleep?s=3" + HTTP)
        assert status == 504 and time.monotonic() - began < 2
        assert json.loads(body)["error"] == {
            "code": "timeout", "message": "call exceeded request_timeout_s=0.3"}
        assert replica.in_flight == 0
        status, _, _ = await c.call("GET /invoke/h/echo" + HTTP)
        assert status == 200  # on a fresh connection to the replica: the cut one was closed


async def test_a_v1_fast_call_past_its_deadline_is_told_in_openais_shape(front):
    """Handed on to a task, a /v1 call's error still comes in OpenAI's shape (SDKs read
    `type` and `param`), not berth's own."""
    address, _ = await front(request_timeout_s=0.3)
    sent = json.dumps({"model": "h", "sleep_s": 3, "messages": []}).encode()
    async with client(address) as c:
        await warm(c)
        with tasks_started() as started:
            status, _, body = await c.call(
                "POST /v1/chat/completions" + HTTP + f"Content-Length: {len(sent)}\n", sent)
        assert started.count(SERVE) == 1  # began fast, handed on at the deadline
    assert status == 504 and json.loads(body)["error"] == {
        "message": "call exceeded request_timeout_s=0.3", "type": "server_error",
        "param": None, "code": "timeout"}


async def test_a_client_leaving_a_fast_call_frees_its_slot_and_counts_499(front):
    address, pool = await front()
    [replica] = pool.replicas.values()
    async with client(address) as c:
        await warm(c)
        c.writer.write(b"GET /invoke/h/sleep?s=5 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        for _ in range(100):
            if replica.in_flight == 1:
                break
            await asyncio.sleep(0.01)
        assert replica.in_flight == 1
    began = time.monotonic()
    while replica.in_flight and time.monotonic() - began < 2:
        await asyncio.sleep(0.01)
    assert replica.in_flight == 0 and time.monotonic() - began < 1
    async with aiohttp.ClientSession() as s, s.get(f"http://{address}/metrics") as r:
        metrics = await r.text()
    assert re.search(r'berth_calls_total\{code="499",endpoint="h"\} 1\.0', metrics), metrics
    async with client(address) as c:
        status, _, _ = await c.call("GET /invoke/h/echo" + HTTP)
        assert status == 200  # the slot is free for the next one


async def test_a_replica_breaking_off_a_fast_call_gives_502_and_frees_its_slot(front):
    address, pool = await front()
    [replica] = pool.replicas.values()
    async with client(address) as c:
        await warm(c)
        with tasks_started() as started:
            status, _, body = await c.call(
                "POST /invoke/h/crash" + HTTP + "Content-Length: 2\n", b"{}")
        assert status == 502 and json.loads(body)["error"]["code"] == "replica_failed"
        assert started.count(SERVE) == 1  # began fast, handed on when the replica broke off
    assert replica.in_flight == 0


async def test_pipelined_fast_calls_to_a_client_that_reads_late_arrive_whole_in_order(front):
    address, _ = await front()
    host, port = address.split(":")
    reader, writer = await asyncio.open_connection(host, int(port), limit=2 ** 20)
    try:
        await warm(Client(reader, writer))
        count = MAX_PIPELINED  # as many as the front holds ahead; ~220 KB of answers: more
        pad = b"p" * 7000  # than the front's write buffer holds
        writer.write(b"".join(b"GET /invoke/h/echo?i=%d&pad=%s HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                              b"\r\n" % (i, pad) for i in range(count)))
        await asyncio.sleep(0.3)  # not read meanwhile: the front's writes back up
        c = Client(reader, writer)
        for i in range(count):
            status, _, body = await asyncio.wait_for(c.answer(), 5)
            assert status == 200 and json.loads(body)["query"]["i"] == str(i)
    finally:
        writer.close()


async def test_a_small_body_written_apart_from_its_head_is_waited_for_one_read(front):
    address, _ = await front()
    sent = b'{"input": "a body the client wrote after its head"}'
    head = ("POST /invoke/h/echo" + HTTP + f"Content-Length: {len(sent)}\n\n").replace(
        "\n", "\r\n").encode()
    async with client(address) as c:
        await warm(c)
        with tasks_started() as started:
            c.writer.write(head)  # as httpx (the openai SDK) writes: head, then body
            await asyncio.sleep(0.05)
            c.writer.write(sent)
            status, _, body = await c.answer()
            assert status == 200 and json.loads(body)["body"] == sent.decode()
            assert started.count(SERVE) == 0  # whole after one more read: the fast path
            for piece in (head, sent[:5], sent[5:]):  # whole only after two more reads
                c.writer.write(piece)
                await asyncio.sleep(0.05)
            status, _, body = await c.answer()
            assert status == 200 and json.loads(body)["body"] == sent.decode()
        assert started.count(SERVE) == 1  # started at the second read, the task's way


async def test_a_client_gone_in_the_pass_its_call_is_handed_on_leaves_no_slot_taken(
        front, monkeypatch):
    address, pool = await front(request_timeout_s=0.3)
    [replica] = pool.replicas.values()
    expire = FastCall.expire

    def client_leaves_first(call: FastCall) -> None:
        call.front.abort()  # its end is told in this pass, before the task's first step
        expire(call)

    monkeypatch.setattr(FastCall, "expire", client_leaves_first)
    async with client(address) as c:
        await warm(c)
        c.writer.write(b"GET /invoke/h/sleep?s=2 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert await c.reader.read() == b""  # cut at the deadline, unanswered
    assert replica.in_flight == 0
    async with aiohttp.ClientSession() as s, s.get(f"http://{address}/metrics") as r:
        assert 'berth_calls_total{code="499",endpoint="h"} 1.0' in await r.text()


async def test_a_body_still_coming_at_shutdown_is_read_and_its_call_answered(front):
    address, _ = await front()
    [site] = front.sites
    for sent in (b'{"small": "waited for"}', b"x" * 200_000):  # the fast path's, the task's
        head = ("POST /invoke/h/echo" + HTTP + f"Content-Length: {len(sent)}\n\n").replace(
            "\n", "\r\n").encode()
        async with client(address) as c:
            await warm(c)
            c.writer.write(head + sent[:10])
            await asyncio.sleep(0.05)
            for f in list(site.guard.fronts):
                f.shutdown()  # berthd stops
            c.writer.write(sent[10:])
            status, _, body = await asyncio.wait_for(c.answer(), 5)
            assert status == 200 and json.loads(body)["body"] == sent.decode()
            assert await c.reader.read() == b""  # and then the connection closes


async def test_a_fault_on_the_fast_path_answers_500_and_leaves_nothing_taken(front, monkeypatch):
    address, pool = await front()
    [replica] = pool.replicas.values()

    def broken(*_: object) -> None:
        raise RuntimeError("a fault in building the request")

    async with client(address) as c:
        await warm(c)
        monkeypatch.setattr("berth.daemon.fast_call.upstream_request", broken)
        status, _, body = await c.call("GET /invoke/h/echo" + HTTP)
        assert status == 500 and json.loads(body)["error"]["code"] == "internal"
        assert replica.in_flight == 0
    monkeypatch.undo()
    async with client(address) as c:
        status, _, _ = await c.call("GET /invoke/h/echo" + HTTP)
        assert status == 200
    async with aiohttp.ClientSession() as s, s.get(f"http://{address}/metrics") as r:
        assert 'berth_calls_total{code="500",endpoint="h"} 1.0' in await r.text()
