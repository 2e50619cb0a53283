"""Pure scheduling decisions, as tables. No I/O, injected time."""

from __future__ import annotations

import pytest

from berth.scheduler.policy import (
    STABLE_AFTER_S,
    backoff_delay,
    desired_replicas,
    failures_after,
    plan_replicas,
)
from berth.scheduler.replica import (
    TRANSITIONS,
    IllegalTransition,
    Replica,
    ReplicaState,
)

S = ReplicaState


@pytest.mark.parametrize(("demand", "concurrency", "lo", "hi", "expected"), [
    (0, 1, 0, 1, 0),    # scale to zero
    (0, 1, 2, 4, 2),    # baseline holds
    (1, 1, 0, 4, 1),    # scale from zero
    (5, 2, 0, 4, 3),    # ceil(5/2)
    (100, 1, 0, 4, 4),  # ceiling
    (3, 4, 1, 4, 1),
    (9, 4, 0, 10, 3),
])
def test_desired_replicas(demand, concurrency, lo, hi, expected):
    assert desired_replicas(demand, concurrency, lo, hi) == expected


@pytest.mark.parametrize(("failures", "delay"), [
    (0, 0), (1, 1), (2, 2), (3, 4), (9, 256), (10, 300), (50, 300), (10_000, 300)])
def test_backoff_doubles_from_one_second_to_five_minutes(failures, delay):
    assert backoff_delay(failures) == delay


@pytest.mark.parametrize(("previous", "ready_at", "now", "expected"), [
    (0, None, 100.0, 1),                   # never became ready
    (3, None, 100.0, 4),
    (3, 99.0, 100.0, 4),                   # crashed right after ready: still in the row
    (3, 100.0 - STABLE_AFTER_S, 100.0, 1),  # ran fine for a while: a fresh count
])
def test_failures_after(previous, ready_at, now, expected):
    assert failures_after(previous, ready_at, now) == expected


def rep(rid: str, state: S, gen: int = 1, idle_since: float = 0.0, in_flight: int = 0) -> Replica:
    return Replica(id=rid, endpoint="e", generation=gen, state=state, created_at=idle_since,
                   ready_at=idle_since if state is S.READY else None, in_flight=in_flight)


NOW = 1000.0


@pytest.mark.parametrize(("replicas", "desired", "may_start", "start", "stop"), [
    ([], 2, True, 2, ()),                                    # fill up
    ([], 2, False, 0, ()),                                   # backing off
    ([rep("a", S.READY)], 1, True, 0, ()),                   # steady
    ([rep("a", S.STARTING)], 1, True, 0, ()),                # starting counts
    ([rep("a", S.DRAINING)], 1, True, 1, ()),                # draining does not
    ([rep("a", S.READY, idle_since=NOW - 10)], 0, True, 0, ()),     # not idle long enough
    ([rep("a", S.READY, idle_since=NOW - 400)], 0, True, 0, ("a",)),  # idle: scale down
    ([rep("a", S.READY, idle_since=NOW - 400, in_flight=1)], 0, True, 0, ()),  # busy: never
    ([rep("a", S.READY, idle_since=NOW - 500), rep("b", S.READY, idle_since=NOW - 400)],
     1, True, 0, ("a",)),                                    # longest idle goes first
    ([rep("a", S.READY, idle_since=NOW - 500), rep("p", S.PENDING)], 1, True, 0, ("p",)),
    # Rolling: old ready stays until the new generation is ready...
    ([rep("o", S.READY, gen=1), rep("n", S.STARTING, gen=2)], 1, True, 0, ()),
    # ...and goes once it is.
    ([rep("o", S.READY, gen=1), rep("n", S.READY, gen=2)], 1, True, 0, ("o",)),
    # Old replicas not serving yet are dropped at once; the new generation is started.
    ([rep("o", S.PENDING, gen=1)], 1, True, 1, ("o",)),
    ([rep("o", S.READY, gen=1)], 1, True, 1, ()),
])
def test_plan_replicas(replicas, desired, may_start, start, stop):
    plan = plan_replicas(replicas, 2 if any(r.generation == 2 for r in replicas)
                         or any(r.id == "o" for r in replicas) else 1,
                         desired, 300.0, NOW, may_start)
    assert (plan.start, plan.stop) == (start, stop)


def test_plan_remove_all_stops_every_active_replica():
    replicas = [rep("a", S.READY, in_flight=1), rep("b", S.PENDING), rep("c", S.DRAINING)]
    plan = plan_replicas(replicas, 1, 0, 300.0, NOW, True, remove_all=True)
    assert plan.stop == ("a", "b") and plan.start == 0


def test_every_transition_not_in_the_table_raises():
    for old in S:
        for new in S:
            replica = rep("r", old)
            if new in TRANSITIONS[old]:
                replica.check_move(new)
            else:
                with pytest.raises(IllegalTransition, match=f"{old} -> {new}"):
                    replica.check_move(new)


def test_stopped_and_failed_are_final():
    assert TRANSITIONS[S.STOPPED] == frozenset() and TRANSITIONS[S.FAILED] == frozenset()


def test_replica_record_round_trip():
    replica = Replica(id="e-1", endpoint="e", generation=3, state=S.READY, created_at=1.0,
                      container_id="c", address="10.0.0.2:80", gpus=["u0"], ready_at=2.0,
                      failures=2, reason="ok")
    assert Replica.from_record(replica.record()) == replica
