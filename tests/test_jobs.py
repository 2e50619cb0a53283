"""berthd's timed jobs on a real APScheduler: a run cut short by berthd's stop ends quietly."""

from __future__ import annotations

import asyncio
import datetime
import logging

import pytest

from berth.daemon.service import PeriodicJobs


async def _stop_during_a_run(jobs: PeriodicJobs, stop) -> None:
    running = asyncio.Event()

    async def slow_pass() -> None:
        running.set()
        await asyncio.sleep(10)

    jobs.add(slow_pass, "slow", 60, next_run_time=datetime.datetime.now(datetime.UTC))
    jobs.scheduler.start()
    await asyncio.wait_for(running.wait(), 5)
    stop()  # (cancels the run under way)
    for _ in range(3):
        await asyncio.sleep(0)  # the cancelled run ends, and APScheduler says how


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_run_cut_short_by_the_stop_logs_no_error(caplog):
    # A SIGTERM during a reconcile pass logged "Job ... raised an exception" (CancelledError)
    jobs = PeriodicJobs()
    await _stop_during_a_run(jobs, jobs.stop)
    assert _errors(caplog) == []


async def test_a_run_cancelled_while_berthd_runs_is_still_an_error(caplog):
    jobs = PeriodicJobs()
    await _stop_during_a_run(jobs, lambda: jobs.scheduler.shutdown(wait=False))
    assert any("raised an exception" in e for e in _errors(caplog))
