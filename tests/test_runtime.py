"""The Docker runtime against a real engine: labels, network, address, GPUs, images."""

from __future__ import annotations

import asyncio
import ipaddress
import threading

import aiohttp
import docker.types
import pytest
import structlog
import structlog.testing

from berth.scheduler.runtime import (
    ContainerSpec,
    ContainerStartError,
    DockerRuntime,
    DockerUnavailable,
    ImageUnavailable,
    create_kwargs,
    free_subnet,
    gpu_env,
    host_routes,
)
from helpers import SESSION, TEST_LABEL, containers


def spec(name: str, image: str, **fields) -> ContainerSpec:
    return ContainerSpec(name=f"berth-{name}-{SESSION}", image=image,
                         labels={"berth.managed": "true", "berth.endpoint": "rt",
                                 "berth.replica": name, TEST_LABEL: SESSION},
                         env={"BERTH_REPLICA": name}, port=8080, **fields)


@pytest.fixture
async def runtime(docker_host, network):
    rt = DockerRuntime(None, network, stop_timeout_s=1)
    await rt.connect()
    yield rt
    await rt.close()


def test_gpu_env_and_device_requests_are_mapped():
    assert gpu_env(["GPU-a", "GPU-b"], [2, 5], "env") == {
        "CUDA_VISIBLE_DEVICES": "2,5", "NVIDIA_VISIBLE_DEVICES": "GPU-a,GPU-b"}
    assert gpu_env(["GPU-a", "GPU-b"], [2, 5], "nvidia")["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert gpu_env([], [], "nvidia") == {"CUDA_VISIBLE_DEVICES": "",
                                         "NVIDIA_VISIBLE_DEVICES": "void"}
    kw = create_kwargs(spec("x", "img", gpu_uuids=["GPU-a"], gpu_mode="nvidia"), "net")
    [request] = kw["device_requests"]
    assert isinstance(request, docker.types.DeviceRequest)
    assert (request.driver, request.device_ids, request.capabilities) == \
        ("nvidia", ["GPU-a"], [["gpu"]])
    kw = create_kwargs(spec("x", "img", gpu_uuids=["GPU-a"], gpu_mode="cdi"), "net")
    assert kw["device_requests"][0].device_ids == ["nvidia.com/gpu=GPU-a"]
    assert "device_requests" not in create_kwargs(spec("x", "img", gpu_uuids=["GPU-a"]), "net")
    assert create_kwargs(spec("x", "img"), "net")["labels"]["berth.instance"] == "net"


async def test_container_runs_on_the_network_and_answers_at_its_address(runtime, model_image):
    info = await runtime.run(spec("addr", model_image))
    try:
        assert info.running and info.ip
        listed = {c.id: c for c in await runtime.list_managed()}
        assert listed[info.id].replica == "addr" and listed[info.id].ip == info.ip
        async with aiohttp.ClientSession() as s:
            for _ in range(50):  # the server needs a few hundred ms to bind
                try:
                    async with s.get(f"http://{info.ip}:8080/echo") as r:
                        body = await r.json()
                        break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
        assert body["replica"] == "addr"
    finally:
        await runtime.remove(info.id, timeout_s=0)
    assert info.id not in {c.id for c in await runtime.list_managed()}


async def test_device_request_without_nvidia_runtime_fails_cleanly(runtime, model_image,
                                                                  docker_client):
    if "nvidia" in runtime.runtimes:
        pytest.skip("this engine has the NVIDIA runtime: the refusal cannot happen here")
    with pytest.raises(ContainerStartError, match="could not select device driver"):
        await runtime.run(spec("nogpu", model_image, gpu_uuids=["GPU-x"], gpu_mode="nvidia"))
    leftover = containers(docker_client, name=f"berth-nogpu-{SESSION}")
    assert leftover == []  # created-but-failed containers are removed


async def test_missing_image_that_cannot_be_pulled(runtime):
    with pytest.raises(ImageUnavailable, match="berth-test/absent:1"):
        await runtime.ensure_image("berth-test/absent:1")


async def test_sdk_calls_run_off_the_event_loop(runtime, model_image):
    seen: list[str] = []
    api = runtime.client.api
    original = api.inspect_image

    def spy(*args, **kwargs):
        seen.append(threading.current_thread().name)
        return original(*args, **kwargs)

    api.inspect_image = spy
    await runtime.ensure_image(model_image)
    assert seen and all(name.startswith("docker") for name in seen)
    assert threading.current_thread().name not in seen


async def test_unreachable_engine_is_a_clear_error():
    rt = DockerRuntime("unix:///nonexistent/docker.sock", "berth")
    with pytest.raises(DockerUnavailable, match="no Docker engine answers at unix:///nonexistent"):
        await rt.connect()


async def test_missing_image_is_pulled_with_progress_in_the_log(
        runtime, docker_client, aiohttp_server):
    from registry import from_docker_save, registry_app, tiny_rootfs

    # An image the engine does not have: made here, exported, then removed from the engine.
    local = f"berth-test/pullme:{SESSION}"
    docker_client.api.import_image_from_data(tiny_rootfs(SESSION), repository=local.split(":")[0],
                                             tag=SESSION)
    saved = b"".join(docker_client.images.get(local).save(named=True))
    docker_client.images.remove(local)
    server = await aiohttp_server(registry_app(from_docker_save(saved)))
    image = f"127.0.0.1:{server.port}/berth-test/pulled:{SESSION}"
    with structlog.testing.capture_logs() as logged:
        await runtime.ensure_image(image)
    try:
        assert docker_client.images.get(image)
        assert {"event": "image.pulling", "image": image, "message": f"pulling image {image}",
                "log_level": "info"} in logged
        progress = [e["status"] for e in logged if e["event"] == "image.pull_progress"]
        assert any("Pull complete" in line for line in progress), progress
        assert len(progress) < 20  # one line per layer state, not one per progress tick
    finally:
        docker_client.images.remove(image)


def test_endpoint_networks_avoid_every_subnet_in_use(tmp_path):
    pool = ipaddress.IPv4Network("10.210.0.0/22")
    taken = [ipaddress.ip_network("10.210.0.0/24"), ipaddress.ip_network("10.210.1.128/25"),
             ipaddress.ip_network("fd00::/64")]
    assert free_subnet(pool, taken) == ipaddress.IPv4Network("10.210.2.0/24")
    assert free_subnet(pool, [ipaddress.ip_network("10.0.0.0/8")]) is None
    table = tmp_path / "route"
    table.write_text("Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\t\n"
                     "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\n"  # default: skipped
                     "br-x\t0000D20A\t00000000\t0001\t0\t0\t0\t00FFFFFF\n")  # 10.210.0.0/24
    assert host_routes(str(table)) == [ipaddress.IPv4Network("10.210.0.0/24")]
    assert host_routes(str(tmp_path / "absent")) == []


def test_the_demo_model_sleeps_and_wakes_like_vllm(docker_client, model_image):
    # The sleep tier's test model: LOAD_S before /health passes, WAKE_S to wake (issue 11).
    import json
    import time
    import urllib.error
    import urllib.request

    net = docker_client.networks.create(f"berth-test-sleep-{SESSION}",
                                        labels={TEST_LABEL: SESSION})
    container = docker_client.containers.run(model_image, detach=True, network=net.name,
                                             labels={TEST_LABEL: SESSION},
                                             environment={"LOAD_S": "0.6", "WAKE_S": "0.4"})
    try:
        container.reload()
        ip = next(iter(container.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"]

        def call(method: str, path: str) -> tuple[int, dict]:
            request = urllib.request.Request(f"http://{ip}:8080{path}", method=method,
                                             data=b"{}" if method == "POST" else None)
            try:
                with urllib.request.urlopen(request, timeout=5) as resp:
                    return resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read())
            except (urllib.error.URLError, ConnectionError):
                return 0, {}

        started = time.monotonic()
        while call("GET", "/health")[0] != 200:
            time.sleep(0.02)
        assert time.monotonic() - started >= 0.5  # it loaded for LOAD_S
        assert call("POST", "/sleep?level=1") == (200, {"is_sleeping": True})
        assert call("POST", "/v1/chat/completions")[0] == 503
        assert call("GET", "/health")[0] == 200  # asleep is not unhealthy
        woke = time.monotonic()
        assert call("POST", "/wake_up") == (200, {"is_sleeping": False})
        assert 0.4 <= time.monotonic() - woke < 2
        assert call("POST", "/v1/chat/completions")[0] == 200
        assert call("GET", "/sleep?s=0.05")[0] == 200  # the old timing call is unchanged
    finally:
        container.remove(force=True)
        net.remove()
