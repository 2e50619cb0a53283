"""Callbacks cannot be pointed inside berth's network (SSRF): the egress policy's table, the
422 at submit, and refusals, redirects and failures at delivery that reveal nothing more."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from berth.daemon.app import build_app
from berth.scheduler.callbacks import CallbackSender
from berth.scheduler.dispatch import Dispatcher, DispatchSettings
from berth.scheduler.egress import (
    DOCKER,
    CallbackPolicy,
    CallbackRefused,
    PolicyUnavailable,
    refusal,
)
from berth.scheduler.router import Router
from berth.store import Store, TaskRecord
from helpers import endpoint, ready_count, wait_for

ip, net = ipaddress.ip_address, ipaddress.ip_network
PRIVATE_ALLOWED = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]


@pytest.mark.parametrize(("address", "allow", "expected"), [
    ("127.0.0.1", [], "a loopback address"),
    ("127.9.9.9", [], "a loopback address"),
    ("::1", [], "a loopback address"),
    ("::ffff:127.0.0.1", [], "a loopback address"),
    ("2002:7f00:1::", [], "a loopback address"),  # 6to4 carrying 127.0.0.1
    ("169.254.169.254", [], "a link-local address"),
    ("fe80::1", [], "a link-local address"),
    ("0.0.0.0", [], "an unspecified address"),
    ("::", [], "an unspecified address"),
    ("224.0.0.1", [], "a multicast address"),
    ("ff02::1", [], "a multicast address"),
    ("10.1.2.3", [], "a private address"),
    ("172.16.0.1", [], "a private address"),
    ("172.31.255.254", [], "a private address"),
    ("192.168.1.1", [], "a private address"),
    ("::ffff:192.168.1.1", [], "a private address"),
    ("fd00::1", [], "a private address"),
    ("fc00::1", [], "a private address"),
    ("100.64.0.1", [], "a shared (CGNAT) address"),
    ("240.0.0.1", [], "a reserved address"),
    ("255.255.255.255", [], "a reserved address"),
    ("192.0.2.1", [], "a reserved address"),  # documentation range: not globally routable
    ("64:ff9b::7f00:1", [], "a reserved address"),  # NAT64
    ("93.184.215.14", [], None),
    ("8.8.8.8", [], None),
    ("172.32.0.1", [], None),  # just outside 172.16/12
    ("2606:4700:4700::1111", [], None),
    ("10.1.2.3", ["10.1.0.0/16"], None),
    ("10.2.0.1", ["10.1.0.0/16"], "a private address"),
    ("127.0.0.1", ["127.0.0.0/8"], None),
    ("::ffff:127.0.0.1", ["127.0.0.0/8"], None),
    ("169.254.169.254", ["10.0.0.0/8"], "a link-local address"),
])
def test_refusal_table(address: str, allow: list[str], expected: str | None) -> None:
    assert refusal(ip(address), [net(a) for a in allow]) == expected


@pytest.mark.parametrize(("address", "allow", "expected"), [
    ("172.18.0.5", [], DOCKER),
    ("172.18.0.5", ["172.16.0.0/12"], DOCKER),  # private allowed, berth's bridges still not
    ("172.18.0.5", ["0.0.0.0/0"], DOCKER),
    ("172.18.0.5", ["172.18.0.0/16"], None),  # the network itself, listed
    ("172.18.0.5", ["172.18.0.0/24"], None),  # a part of it, listed
    ("172.18.1.5", ["172.18.0.0/24", "172.16.0.0/12"], DOCKER),
    ("172.19.0.5", ["172.16.0.0/12"], None),  # not a Docker network
    ("8.9.0.1", [], DOCKER),  # a network on public addresses is still the engine's
])
def test_docker_networks_need_their_own_cidr(address: str, allow: list[str],
                                             expected: str | None) -> None:
    docker = [net("172.18.0.0/16"), net("8.9.0.0/24"), net("fd99::/64")]
    assert refusal(ip(address), [net(a) for a in allow], docker) == expected


class FakeDns(AbstractResolver):
    """Answers from a table the test may change, like DNS between submit and delivery."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if host not in self.table:
            raise OSError(socket.EAI_NONAME, "Name or service not known")
        return [ResolveResult(hostname=host, host=a, port=port,
                              family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                              proto=0, flags=0) for a in self.table[host]]

    async def close(self) -> None:
        pass


async def refused(policy: CallbackPolicy, host: str) -> str:
    with pytest.raises(CallbackRefused) as info:
        await policy.check(host)
    return str(info.value)


async def test_check_resolves_names_and_honours_allowed_names() -> None:
    dns = {"public.example": ["93.184.215.14"], "inside.example": ["10.0.0.7"],
           "hooks.internal": ["127.0.0.1"], "mixed.example": ["93.184.215.14", "127.0.0.1"]}
    policy = CallbackPolicy(["hooks.internal"], resolver=lambda: FakeDns(dns))
    await policy.check("public.example")
    await policy.check("93.184.215.14")
    await policy.check("HOOKS.internal.")  # listed: allowed whatever it resolves to
    assert await refused(policy, "inside.example") == \
        "inside.example resolves to a private address"
    assert await refused(policy, "mixed.example") == \
        "mixed.example resolves to a loopback address"
    assert await refused(policy, "nohost.invalid") == "nohost.invalid does not resolve"
    assert await refused(policy, "::1") == "::1 resolves to a loopback address"
    # At delivery the resolver keeps what is allowed and refuses when nothing is left.
    resolver = policy.resolver()
    kept = await resolver.resolve("mixed.example", 80)
    assert [r["host"] for r in kept] == ["93.184.215.14"]
    with pytest.raises(CallbackRefused):
        await resolver.resolve("inside.example", 80)
    with pytest.raises(CallbackRefused):
        await resolver.resolve("169.254.169.254", 80)


async def test_docker_subnets_are_cached_and_outlive_an_engine_hiccup() -> None:
    now, calls, fail = [0.0], [0], [False]

    async def subnets() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        calls[0] += 1
        if fail[0]:
            raise OSError("engine gone")
        return [net("172.18.0.0/16")]

    policy = CallbackPolicy(PRIVATE_ALLOWED, subnets, cache_s=5, clock=lambda: now[0])
    fail[0] = True
    with pytest.raises(PolicyUnavailable):
        await policy.check("10.0.0.1")  # never read: nothing can be checked
    fail[0] = False
    assert await refused(policy, "172.18.0.2") == f"172.18.0.2 resolves to {DOCKER}"
    await policy.check("10.0.0.1")
    assert calls[0] == 2  # cached
    now[0], fail[0] = 6.0, True
    assert await refused(policy, "172.18.0.2") == f"172.18.0.2 resolves to {DOCKER}"
    assert calls[0] == 3  # read again, failed, the last answer stands


# Delivery ------------------------------------------------------------------------------------

class Receiver:
    """A callback receiver on 127.0.0.1 that counts its hits."""

    def __init__(self, answer: web.Response | None = None) -> None:
        self.hits = 0
        self.answer = answer

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        await request.read()
        return self.answer or web.Response(status=204)


async def serve(aiohttp_server, receiver: Receiver):
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    return await aiohttp_server(app)


async def deliver(tmp_path, url: str, policy: CallbackPolicy, retry_for_s: float = 0) -> dict:
    """Send one finished task's callback to `url`; its callback fields once final."""
    store = await Store.open(tmp_path / "state")
    sender = CallbackSender(store, b"k", retry_for_s, 0.05, policy)
    task = TaskRecord(id="t1", endpoint="e", method="POST", path="", created_at=time.time(),
                      status="succeeded", finished_at=time.time(), callback_url=url,
                      callback_state="pending")
    await store.tasks.add(task)
    try:
        sender.schedule(task.id)
        for _ in range(200):
            done = await store.tasks.get(task.id)
            assert done is not None
            if done.callback_state != "pending":
                return {"state": done.callback_state, "error": done.callback_error,
                        "attempts": done.callback_attempts}
            await asyncio.sleep(0.02)
        raise AssertionError("callback still pending")
    finally:
        await sender.close()
        await store.close()


async def test_delivery_to_an_allowed_receiver(tmp_path, aiohttp_server) -> None:
    receiver = Receiver()
    server = await serve(aiohttp_server, receiver)
    got = await deliver(tmp_path, f"http://127.0.0.1:{server.port}/hook",
                        CallbackPolicy(["127.0.0.0/8"]))
    assert got == {"state": "delivered", "error": None, "attempts": 1}
    assert receiver.hits == 1


async def test_refused_at_delivery_is_final_and_sends_nothing(tmp_path, aiohttp_server) -> None:
    receiver = Receiver()
    server = await serve(aiohttp_server, receiver)
    got = await deliver(tmp_path, f"http://127.0.0.1:{server.port}/hook", CallbackPolicy([]),
                        retry_for_s=60)
    assert got == {"state": "failed", "error": "refused by policy", "attempts": 1}
    assert receiver.hits == 0


async def test_a_name_that_resolves_elsewhere_by_delivery_is_refused(tmp_path,
                                                                     aiohttp_server) -> None:
    receiver = Receiver()
    server = await serve(aiohttp_server, receiver)
    dns = {"hooks.example": ["93.184.215.14"]}
    policy = CallbackPolicy([], resolver=lambda: FakeDns(dns))
    await policy.check("hooks.example")  # at submit: public
    dns["hooks.example"] = ["127.0.0.1"]  # rebinding
    got = await deliver(tmp_path, f"http://hooks.example:{server.port}/hook", policy,
                        retry_for_s=60)
    assert got == {"state": "failed", "error": "refused by policy", "attempts": 1}
    assert receiver.hits == 0
    # The connection goes to the address the policy judged: allowed, it is delivered there.
    allowed = CallbackPolicy(["hooks.example"], resolver=lambda: FakeDns(dns))
    got = await deliver(tmp_path / "2", f"http://hooks.example:{server.port}/hook", allowed)
    assert got["state"] == "delivered" and receiver.hits == 1


async def test_redirects_are_not_followed(tmp_path, aiohttp_server) -> None:
    target = Receiver()
    target_server = await serve(aiohttp_server, target)
    redirect = Receiver(web.Response(status=307, headers={
        "Location": f"http://127.0.0.1:{target_server.port}/hook"}))
    server = await serve(aiohttp_server, redirect)
    got = await deliver(tmp_path, f"http://127.0.0.1:{server.port}/hook",
                        CallbackPolicy(["127.0.0.0/8"]))
    assert got == {"state": "failed", "error": "HTTP 307", "attempts": 1}
    assert (redirect.hits, target.hits) == (1, 0)


async def test_unreachable_receiver_reveals_nothing(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: connections are refused
    got = await deliver(tmp_path, f"http://127.0.0.1:{port}/hook",
                        CallbackPolicy(["127.0.0.0/8"]), retry_for_s=0.1)
    assert got["state"] == "failed" and got["error"] == "delivery failed"
    assert got["attempts"] >= 2  # failures other than the policy's are retried


# Submit, against a real engine ----------------------------------------------------------------

@pytest.fixture
async def plane(harness, aiohttp_client, tmp_path):
    made = []

    async def make(specs: dict, allow: list[str]):
        h = await harness()
        await h.reconciler.apply_specs(specs, "config")
        policy = CallbackPolicy(allow, h.runtime.network_subnets)
        callbacks = CallbackSender(h.store, b"k", 1, 0.1, policy)
        dispatcher = Dispatcher(h.store, Router(h.reconciler), tmp_path / "tasks", callbacks,
                                DispatchSettings())
        await dispatcher.start()
        made.append((dispatcher, callbacks))
        app = build_app(h.reconciler, h.reconciler.allocator, dispatcher=dispatcher)
        return h, await aiohttp_client(app)
    yield make
    for dispatcher, callbacks in made:
        await dispatcher.stop()
        await callbacks.close()


async def test_submit_refuses_callbacks_inside(plane, aiohttp_server) -> None:
    receiver = Receiver()
    server = await serve(aiohttp_server, receiver)
    _, client = await plane({"cbrefuse": endpoint("cbrefuse")}, allow=[])
    for url, host, kind in [
            (f"http://127.0.0.1:{server.port}/hook", "127.0.0.1", "a loopback address"),
            (f"http://localhost:{server.port}/hook", "localhost", "a loopback address"),
            ("http://169.254.169.254/latest/meta-data/", "169.254.169.254",
             "a link-local address"),
            ("http://[::ffff:127.0.0.1]:80/", "::ffff:7f00:1", "a loopback address"),
            ("http://10.0.0.1/", "10.0.0.1", "a private address")]:
        resp = await client.post("/async/cbrefuse", headers={"X-Callback-Url": url})
        assert resp.status == 422, url
        assert (await resp.json())["error"] == {
            "code": "callback_refused",
            "message": f"X-Callback-Url refused by policy: {host} resolves to {kind} "
                       "(daemon.callback_allow)"}
    resp = await client.post("/async/cbrefuse", headers={"X-Callback-Url": "http://nohost.invalid/"})
    assert resp.status == 422
    assert (await resp.json())["error"]["message"] == \
        "X-Callback-Url refused by policy: nohost.invalid does not resolve (daemon.callback_allow)"
    assert await (await client.get("/v1/tasks")).json() == {"tasks": []}
    assert receiver.hits == 0


async def test_replicas_on_berths_network_stay_refused(plane, docker_client) -> None:
    h, client = await plane({"cbdocker": endpoint("cbdocker", min_replicas=1)},
                           allow=PRIVATE_ALLOWED)
    pool = h.reconciler.pool("cbdocker")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    [replica] = pool.replicas.values()
    attached = docker_client.containers.get(replica.container_id).attrs["NetworkSettings"]
    [name] = attached["Networks"]  # the bridge the engine put the replica on
    bridge = docker_client.networks.get(name).attrs["IPAM"]["Config"][0]["Subnet"]
    assert ip(replica.address.rsplit(":", 1)[0]) in net(bridge)
    assert net(bridge).subnet_of(net("172.16.0.0/12")) or net(bridge).subnet_of(
        net("192.168.0.0/16")) or net(bridge).subnet_of(net("10.0.0.0/8"))  # private allowed
    resp = await client.post("/async/cbdocker/echo",
                             headers={"X-Callback-Url": f"http://{replica.address}/echo"})
    assert resp.status == 422
    assert (await resp.json())["error"]["message"].endswith(
        f"resolves to {DOCKER} (daemon.callback_allow)")
    # Listing that very network lets it in (an operator's explicit choice).
    exact = CallbackPolicy([bridge], h.runtime.network_subnets)
    await exact.check(replica.address.rsplit(":", 1)[0])


async def test_a_receiver_that_never_answers_stalls_only_its_endpoints_callbacks(
        tmp_path, aiohttp_server) -> None:
    # 110 callbacks of one endpoint to a receiver that hangs once held every connection
    # berth had for callbacks (aiohttp's 100), so another endpoint's waited 30 s and failed.
    hung, answered = asyncio.Event(), Receiver()

    async def hang(request: web.Request) -> web.Response:
        await hung.wait()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hang", hang)
    app.router.add_post("/hook", answered.handle)
    server = await aiohttp_server(app)
    store = await Store.open(tmp_path / "state")
    sender = CallbackSender(store, b"k", 60, 0.05, CallbackPolicy(["127.0.0.0/8"]))
    base = f"http://127.0.0.1:{server.port}"
    try:
        for i, (endpoint, path) in enumerate([("slow", "/hang")] * 110 + [("fast", "/hook")]):
            task = TaskRecord(id=f"t{i}", endpoint=endpoint, method="POST", path="",
                              created_at=time.time(), status="succeeded",
                              finished_at=time.time(), callback_url=base + path,
                              callback_state="pending")
            await store.tasks.add(task)
            sender.schedule(task.id)
        async with asyncio.timeout(5):
            while (done := await store.tasks.get("t110")) is None or \
                    done.callback_state != "delivered":
                await asyncio.sleep(0.02)
        assert done.callback_attempts == 1 and answered.hits == 1
    finally:
        hung.set()
        await sender.close()
        await store.close()
