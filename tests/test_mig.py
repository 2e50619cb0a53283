"""MIG: with MIG mode on, each MIG device is an allocatable unit (its MIG- uuid, its profile in
the name, its own memory); a replica of gpus = 1 may get one (gpu_type matches profiles, the
MIG uuid in both *_VISIBLE_DEVICES), a replica of gpus > 1 never does, and the config check
says why. Over the replay NVML (tests/fixtures/nvml-h100-mig.json, written from NVIDIA's
documentation)."""

from __future__ import annotations

from berth.daemon.config import EndpointSpec, gpu_shortage
from berth.gpu.allocator import choose_gpus
from berth.gpu.inventory import NvmlInventory
from berth.gpu.nvml_replay import ReplayNvml
from berth.scheduler.runtime import gpu_env
from helpers import ROOT, body, ready_count, wait_for

FIXTURE = ROOT / "tests" / "fixtures" / "nvml-h100-mig.json"
ADMIN = {"Authorization": "Bearer admin-secret"}


def inventory() -> NvmlInventory:
    return NvmlInventory(ReplayNvml.load(FIXTURE))


def test_mig_devices_are_the_units_of_a_gpu_in_mig_mode():
    units = inventory().gpus
    assert [(g.index, g.mig, g.name.rsplit(" ", 1)[-1], g.memory_mib) for g in units] == [
        (0, True, "1g.10gb", 9856), (0, True, "3g.40gb", 40192), (1, False, "HBM3", 81559)]
    assert units[0].uuid.startswith("MIG-") and units[2].uuid.startswith("GPU-")
    assert set(inventory().sample()) == {units[2].uuid}  # MIG devices have no own readings


def test_placement_and_visibility_of_mig_devices():
    units = inventory().gpus
    [small] = choose_gpus(units, {}, 1, "1g.10gb") or []
    assert small.name.endswith("MIG 1g.10gb")
    assert choose_gpus(units, {}, 2, None) is None  # only one whole GPU: never two MIG devices
    assert choose_gpus(units, {units[2].uuid: "x"}, 2, "H100") is None
    env = gpu_env([small.uuid], [small.index], "nvidia")
    assert env == {"CUDA_VISIBLE_DEVICES": small.uuid, "NVIDIA_VISIBLE_DEVICES": small.uuid}


def test_the_config_check_says_why_mig_devices_cannot_serve_two_gpus():
    units = inventory().gpus
    spec = EndpointSpec(name="x", image="i", gpus=2, gpu_type="MIG")
    shortage = gpu_shortage(spec, units)
    assert shortage is not None and "MIG devices go one per replica" in shortage
    assert gpu_shortage(EndpointSpec(name="x", image="i", gpus=1, gpu_type="3g.40gb"),
                        units) is None


async def test_a_replica_runs_on_a_mig_device_and_sees_only_it(api):
    units = list(inventory().gpus)
    h, client = await api(gpus=units)
    resp = await client.post("/v1/endpoints", headers=ADMIN,
                             json=body("small", min_replicas=1, gpus=1, gpu_type="1g.10gb"))
    assert resp.status == 201, await resp.text()
    pool = h.reconciler.pool("small")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready on the MIG device")
    env = await (await client.get("/invoke/small/env", headers=ADMIN)).json()
    assert env["NVIDIA_VISIBLE_DEVICES"] == units[0].uuid
    assert env["CUDA_VISIBLE_DEVICES"] == units[0].uuid
    resp = await client.post("/v1/endpoints", headers=ADMIN,
                             json=body("pair", gpus=2, gpu_type="MIG"))
    error = (await resp.json())["error"]
    assert resp.status == 422 and "MIG devices go one per replica" in error["message"]


async def test_an_index_that_names_several_mig_devices_is_refused(aiohttp_client, tmp_path):
    from aiohttp import web

    from berth.daemon.app import json_errors
    from berth.daemon.gpus_api import cordon
    from berth.daemon.keys import ALLOCATOR
    from berth.gpu import GpuAllocator
    from berth.store import Store

    units = list(inventory().gpus)  # MIG devices keep their GPU's index: 0, 0, then 1
    store = await Store.open(tmp_path)
    app = web.Application(middlewares=[json_errors])
    app[ALLOCATOR] = GpuAllocator(units, store)
    app.router.add_post("/v1/gpus/{uuid}/cordon", cordon)
    client = await aiohttp_client(app)
    resp = await client.post("/v1/gpus/0/cordon")
    error = (await resp.json())["error"]
    assert resp.status == 409 and error["code"] == "ambiguous_gpu"
    assert units[0].uuid in error["message"] and units[1].uuid in error["message"]
    assert (await client.post("/v1/gpus/7/cordon")).status == 404
    await store.close()
