"""Cold starts broken into phases (pull, create, start, load): recorded when a replica becomes
ready, in its ready event, the endpoint's API view (last start and medians), the CLI and the
/metrics histogram."""

from __future__ import annotations

import pytest

from berth.daemon import cli
from berth.scheduler.endpoint import StartPhases, median_phases
from helpers import endpoint, ready_count, wait_for

ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.mark.parametrize(("starts", "median"), [
    ([StartPhases(0, 1, 2, 3)], StartPhases(0, 1, 2, 3)),
    ([StartPhases(0, 1, 2, 3), StartPhases(4, 1, 0, 5), StartPhases(2, 1, 1, 100)],
     StartPhases(2, 1, 1, 5)),  # each phase on its own: one slow load does not move the rest
    ([StartPhases(0, 0, 0, 1), StartPhases(0, 0, 0, 3)], StartPhases(0, 0, 0, 2)),
])
def test_median_phases(starts, median):
    assert median_phases(starts) == median


async def test_a_start_says_where_its_time_went(api):
    h, client = await api({"llm": endpoint("llm", min_replicas=1,
                                           env={"MODEL_READY_DELAY_S": "0.6"})})
    pool = h.reconciler.pool("llm")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    [went] = pool.endpoint.starts
    assert went.load_s >= 0.6  # the model's own load time lands in `load`
    assert went.create_s > 0 and went.start_s > 0 and went.pull_s >= 0
    assert went.total_s == pytest.approx(went.pull_s + went.create_s + went.start_s
                                         + went.load_s)
    [ready] = [e for e in await h.store.events("llm") if e.kind == "ready"]
    assert f"load {went.load_s:.2f} s" in ready.message
    view = await (await client.get("/v1/endpoints/llm", headers=ADMIN)).json()
    assert view["starts"]["count"] == 1
    assert view["starts"]["last"]["load_s"] == pytest.approx(went.load_s)
    assert view["starts"]["median"] == view["starts"]["last"]
    shown = cli.show_endpoint(view)
    assert "last start" in shown and f"load {went.load_s:.1f})" in shown
    metrics = (await (await client.get("/metrics", headers=ADMIN)).text()).splitlines()
    for phase in ("pull", "create", "start", "load", "total"):
        assert (f'berth_replica_start_seconds_count{{endpoint="llm",phase="{phase}"}} 1.0'
                in metrics), phase
    assert 'berth_replica_start_seconds_bucket{endpoint="llm",le="0.5",phase="load"} 0.0' \
        in metrics
