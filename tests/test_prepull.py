"""Pre-pull: an endpoint's image is fetched in the background before any call (from a registry
the test serves on loopback); the endpoint view says present, pulling (n of m layers) or
missing and why."""

from __future__ import annotations

import asyncio

import pytest

from berth.scheduler.images import Pull
from helpers import SESSION

ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.mark.parametrize(("lines", "text"), [
    ([], "pulling"),
    ([("a", "Pulling fs layer"), ("b", "Waiting")], "pulling (0 of 2 layers)"),
    ([("a", "Downloading"), ("a", "Pull complete"), ("b", "Already exists"),
      ("c", "Extracting")], "pulling (2 of 3 layers)"),
    ([("latest", "Pulling from x/y"), ("a", "Pull complete")], "pulling (1 of 1 layers)"),
])
def test_pull_progress(lines, text):
    pull = Pull()
    for layer, status in lines:
        pull.heard(layer, status)
    assert pull.text() == text


async def test_an_endpoints_image_is_pulled_before_any_call(api, docker_client,
                                                            aiohttp_server):
    from registry import from_docker_save, registry_app, tiny_rootfs

    local = f"berth-test/prepull:{SESSION}"
    docker_client.api.import_image_from_data(tiny_rootfs(f"prepull {SESSION}"),
                                             repository=local.split(":")[0], tag=SESSION)
    saved = b"".join(docker_client.images.get(local).save(named=True))
    docker_client.images.remove(local)
    server = await aiohttp_server(registry_app(from_docker_save(saved)))
    image = f"127.0.0.1:{server.port}/berth-test/prepulled:{SESSION}"
    h, client = await api()
    try:
        resp = await client.post("/v1/endpoints", json={"name": "pre", "image": image},
                                 headers=ADMIN)
        assert resp.status == 201
        for _ in range(100):
            view = await (await client.get("/v1/endpoints/pre", headers=ADMIN)).json()
            if view["image"] == "present":
                break
            assert view["image"].startswith("pulling"), view["image"]
            await asyncio.sleep(0.05)
        assert view["image"] == "present" and view["replicas"] == []  # no call, no replica
        assert docker_client.images.get(image)
        h.runtime.pull = False  # docker.pull = false: nothing is fetched, and it says why
        resp = await client.post("/v1/endpoints", json={"name": "off",
                                                        "image": "berth-test/not-here:1"},
                                 headers=ADMIN)
        for _ in range(100):
            view = await (await client.get("/v1/endpoints/off", headers=ADMIN)).json()
            if view["image"].startswith("missing"):
                break
            await asyncio.sleep(0.05)
        assert view["image"] == ("missing: image berth-test/not-here:1 is not on the engine "
                                 "and docker.pull is off")
    finally:
        docker_client.images.remove(image)
