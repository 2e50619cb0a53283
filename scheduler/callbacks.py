"""Task callbacks: POST the final task JSON to the caller's URL, signed, retried with backoff.

Only where the egress policy (scheduler.egress) allows, checked as the connection is made;
redirects are never followed. The error a task records is one of REFUSED, "HTTP <status>" or
FAILED, never more: the submitter must not learn what answers inside berth's network.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import structlog
from yarl import URL

from berth.scheduler.egress import CallbackPolicy, CallbackRefused
from berth.store import Store, TaskRecord

log = structlog.get_logger("berth.callbacks")
MAX_BACKOFF_S = 300.0
REFUSED = "refused by policy"  # final: not retried
FAILED = "delivery failed"  # no connect/timeout/TLS distinction: that would scan the network
PER_ENDPOINT = 8  # deliveries under way at once for one endpoint's tasks (the others wait)
ATTEMPT_S = 30.0


def sign(secret: bytes, body: bytes) -> str:
    """Value of X-Berth-Signature: HMAC-SHA256 of the exact body bytes."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def describe_task(task: TaskRecord) -> dict[str, Any]:
    """The task as the API and callbacks show it."""
    result = None
    if task.result_status is not None:
        result = {"status": task.result_status, "content_type": task.result_type}
    callback = None
    if task.callback_url:
        callback = {"url": task.callback_url, "state": task.callback_state,
                    "attempts": task.callback_attempts, "error": task.callback_error}
    return {"id": task.id, "endpoint": task.endpoint, "method": task.method,
            "path": "/" + task.path, "status": task.status, "attempts": task.attempts,
            "replica": task.replica, "created_at": task.created_at,
            "started_at": task.started_at, "finished_at": task.finished_at,
            "error": task.error, "result": result, "callback": callback,
            "purged": task.purged_at is not None}


def refused(exc: BaseException) -> bool:
    """True when the egress policy (not the network or the receiver) stopped the delivery."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return isinstance(exc.os_error, CallbackRefused)
    return isinstance(exc, CallbackRefused)


class CallbackSender:
    """Delivers each finished task's callback once it succeeds, or gives up after retry_for_s
    (at once when the policy refuses the receiver). Each endpoint's tasks deliver in their
    own lane of PER_ENDPOINT at a time: a receiver that never answers stalls only the
    callbacks of the endpoint whose callers chose it."""

    def __init__(self, store: Store, secret: bytes, retry_for_s: float, backoff_s: float,
                 policy: CallbackPolicy, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.policy = policy
        self.secret = secret
        self.retry_for_s = retry_for_s
        self.backoff_s = backoff_s
        self.clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._lanes: dict[str, asyncio.Semaphore] = {}

    def schedule(self, task_id: str) -> None:
        job = asyncio.get_running_loop().create_task(self._deliver(task_id))
        self._pending.add(job)
        job.add_done_callback(self._pending.discard)

    async def _deliver(self, task_id: str) -> None:
        task = await self.store.tasks.get(task_id)
        if task is None or not task.callback_url:
            return
        body = json.dumps(describe_task(task)).encode()
        task.body = task.result_body = None  # (not needed here, where it may wait an hour)
        lane = self._lanes.setdefault(task.endpoint, asyncio.Semaphore(PER_ENDPOINT))
        deadline, delay = self.clock() + self.retry_for_s, self.backoff_s
        while True:
            task.callback_attempts += 1
            async with lane:
                task.callback_error = await self._post(task.callback_url, body)
            if task.callback_error is None:
                task.callback_state = "delivered"
            elif task.callback_error == REFUSED or self.clock() + delay > deadline:
                task.callback_state = "failed"
            await self.store.tasks.update(task, "callback_state", "callback_attempts",
                                          "callback_error")
            if task.callback_state != "pending":
                log.info(f"callback.{task.callback_state}", task=task.id,
                         endpoint=task.endpoint, attempts=task.callback_attempts)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)

    async def _post(self, url: str, body: bytes) -> str | None:
        """None when the receiver answered 2xx, else REFUSED, "HTTP <status>" (a redirect
        included) or FAILED; the details go to berth's log only."""
        if self._session is None:
            # No DNS cache and no kept connections: each delivery is resolved and judged anew.
            # No pool limit: the lanes bound deliveries, so an attempt's time is all its own.
            connector = aiohttp.TCPConnector(resolver=self.policy.resolver(), limit=0,
                                             use_dns_cache=False, force_close=True)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=ATTEMPT_S))
        headers = {"Content-Type": "application/json", "X-Berth-Signature": sign(self.secret, body)}
        try:
            await self.policy.check_literal(URL(url).host or "")
            async with self._session.post(url, data=body, headers=headers,
                                          allow_redirects=False) as resp:
                return None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            log.info("callback.attempt_failed", url=url, error=repr(exc))
            return REFUSED if refused(exc) else FAILED

    async def close(self) -> None:
        for job in list(self._pending):
            job.cancel()  # pending callbacks resume at the next start
        await asyncio.gather(*self._pending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
