"""The HTTP app in-process (aiohttp test server on a real loopback port): one error shape."""

from __future__ import annotations

import pytest

from berth.daemon.app import build_app
from berth.gpu import GpuAllocator
from berth.scheduler.probes import Prober
from berth.scheduler.reconciler import Reconciler
from berth.scheduler.runtime import DockerRuntime
from berth.store import EndpointRecord, Store
from helpers import endpoint, static_gpus


@pytest.fixture
async def client(aiohttp_client, tmp_path):
    store = await Store.open(tmp_path)
    allocator = GpuAllocator(static_gpus(1), store)
    # Handlers only read pool state; the runtime is never connected here.
    reconciler = Reconciler(store, allocator, DockerRuntime(None, "unused"), Prober(), "env")
    await store.save_endpoint(EndpointRecord(name="m", spec=endpoint("m").model_dump(mode="json"),
                                             source="api", generation=1, error="boom"))
    await reconciler.load()  # the pool as a restart would find it
    app = build_app(reconciler, allocator, admin_token="")
    yield await aiohttp_client(app)
    await store.close()


async def test_errors_are_json_with_code_and_message(client):
    resp = await client.post("/v1/gpus")
    assert resp.status == 405
    assert (await resp.json())["error"]["code"] == "method_not_allowed"
    assert "GET" in resp.headers["Allow"]
    resp = await client.get("/v1/endpoints/none")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "endpoint_not_found"


async def test_endpoint_error_state_is_visible(client):
    resp = await client.get("/v1/endpoints/m")
    body = await resp.json()
    assert (body["status"], body["error"], body["source"]) == ("error", "boom", "api")
    assert body["spec"]["image"] == endpoint("m").image
