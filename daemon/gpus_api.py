"""GPUs over the API: `GET /v1/gpus` (holders, samples, health) and cordon / uncordon.

A cordoned GPU gets no new replica and its replicas drain while replacements start on other
GPUs; the mark is stored, so it survives a restart of berthd, until uncordoned. `unhealthy`
marks (berth found the GPU sick) show the same way and keep a GPU out of service alike.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import Field, ValidationError

from berth.daemon.auth import add_admin_route
from berth.daemon.config import Strict, issues_from_validation
from berth.daemon.control import invalid
from berth.daemon.errors import ApiError, json_body
from berth.daemon.keys import ALLOCATOR, GPU_READINGS, GPU_SAMPLES, RECONCILER
from berth.gpu import Gpu, GpuAllocator, GpuMarkKind, GpuSample
from berth.gpu.inventory import attribute
from berth.scheduler.pool import replica_containers

C, U = GpuMarkKind.CORDONED, GpuMarkKind.UNHEALTHY


class CordonBody(Strict):
    """POST /v1/gpus/{uuid}/cordon (the body may be left out)."""

    reason: str = Field("cordoned by the admin", min_length=1, max_length=500)


def gpu_view(gpu: Gpu, allocator: GpuAllocator, holders: dict[str, str | None],
             sample: GpuSample, readings: str, unattributed_mib: int) -> dict[str, Any]:
    owner = allocator.owners().get(gpu.uuid)
    marks = allocator.marks(gpu.uuid)
    shares = allocator.shares().get(gpu.uuid, {})
    return {"index": gpu.index, "uuid": gpu.uuid, "name": gpu.name,
            "memory_mib": gpu.memory_mib, "replica": owner,
            "endpoint": holders.get(owner) if owner else None,
            "shares": [{"replica": r, "endpoint": holders.get(r), "memory_mib": mib}
                       for r, mib in sorted(shares.items())],
            "shared_mib": sum(shares.values()),
            "lent_to": allocator.loans().get(gpu.uuid),
            "utilization_pct": sample.utilization_pct,
            "memory_used_mib": sample.memory_used_mib,
            "temperature_c": sample.temperature_c,
            "readings": readings,  # "unknown" while NVML does not answer
            "unattributed_mib": unattributed_mib,  # used by processes of no replica
            "healthy": U not in marks,
            "health_reason": marks[U].reason if U in marks else None,
            "cordoned": C in marks,
            "cordon_reason": marks[C].reason if C in marks else None,
            "cordoned_at": marks[C].since if C in marks else None}


def views(request: web.Request, gpus: list[Gpu]) -> list[dict[str, Any]]:
    """The views of `gpus`; holders, readings and attribution are worked out once for all."""
    pools = request.app[RECONCILER].live_pools()
    holders: dict[str, str | None] = {r.id: p.name for p in pools for r in p.replicas.values()}
    samples = request.app[GPU_SAMPLES]
    readings = "ok" if request.app[GPU_READINGS].available else "unknown"
    _, nobody = attribute(samples, replica_containers(pools))
    return [gpu_view(g, request.app[ALLOCATOR], holders, samples.get(g.uuid, GpuSample()),
                     readings, nobody.get(g.uuid, 0)) for g in gpus]


async def list_gpus(request: web.Request) -> web.Response:
    return web.json_response({"gpus": views(request, list(request.app[ALLOCATOR].gpus))})


def named_gpu(request: web.Request) -> Gpu:
    """The GPU named in the URL by uuid or index; 404 if the box has none such, 409 for an
    index that names several MIG devices (their uuids tell them apart)."""
    key = request.match_info["uuid"]
    found = [g for g in request.app[ALLOCATOR].gpus if key in (g.uuid, str(g.index))]
    if len(found) > 1:
        raise ApiError(409, "ambiguous_gpu", f"GPU index {key} holds {len(found)} MIG "
                       f"devices; name one by its uuid ({', '.join(g.uuid for g in found)})")
    if not found:
        raise ApiError(404, "gpu_not_found", f"no GPU {key!r} on this box (a uuid or an index)")
    return found[0]


async def cordon(request: web.Request) -> web.Response:
    gpu = named_gpu(request)
    data = await json_body(request) if request.body_exists else {}
    try:
        body = CordonBody.model_validate(data)
    except ValidationError as exc:
        raise invalid(issues_from_validation(exc)) from None
    await request.app[RECONCILER].mark_gpu(gpu.uuid, C, body.reason)  # cordoned: no-op
    return web.json_response(views(request, [gpu])[0])


async def uncordon(request: web.Request) -> web.Response:
    gpu = named_gpu(request)
    await request.app[RECONCILER].unmark_gpu(gpu.uuid, C)  # not cordoned: nothing to do, 200
    return web.json_response(views(request, [gpu])[0])


async def mark_healthy(request: web.Request) -> web.Response:
    """The admin says a GPU found sick is repaired (not sick: no-op, 200)."""
    gpu = named_gpu(request)
    await request.app[RECONCILER].unmark_gpu(gpu.uuid, U)
    return web.json_response(views(request, [gpu])[0])


def add_gpus_api(app: web.Application) -> None:
    add_admin_route(app, "GET", "/v1/gpus", list_gpus)
    add_admin_route(app, "POST", "/v1/gpus/{uuid}/cordon", cordon)
    add_admin_route(app, "POST", "/v1/gpus/{uuid}/uncordon", uncordon)
    add_admin_route(app, "POST", "/v1/gpus/{uuid}/healthy", mark_healthy)
