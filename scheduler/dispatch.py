"""Async dispatch: stored tasks run on replicas, FIFO per endpoint, in the same slots as sync
calls, with retries when a replica fails, and at-least-once delivery across crashes.

Owns the async queues (one per endpoint, in memory, rebuilt from SQLite at start) and the
tasks' rows while they run; only the Dispatcher changes them. State lives in SQLite (status,
attempts, result); memory holds only the queues in order. Slots come from the router as
Leases, released in one place (`_run`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote

import aiohttp
import structlog
from yarl import URL

from berth.daemon.metering import UsageMeter
from berth.scheduler.callbacks import CallbackSender
from berth.scheduler.errors import SchedulerError
from berth.scheduler.pool import EndpointPool
from berth.scheduler.replica import Replica, ReplicaState
from berth.scheduler.router import Lease, Router
from berth.store import Store, TaskRecord

log = structlog.get_logger("berth.dispatch")
INLINE_MAX = 64 * 1024  # bodies and results up to this live in SQLite, larger ones in files
CHUNK = 64 * 1024
NO_CAPACITY_RETRY_S = 1.0


class Spool:
    """Bytes kept in memory up to INLINE_MAX, and in a file named `name` beyond that.

    Task bodies and results both arrive as streams of unknown length; small ones belong in
    SQLite, large ones must never be held whole in memory.
    """

    def __init__(self, directory: Path, name: str) -> None:
        self.path = directory / name
        self.head = bytearray()
        self._out: BinaryIO | None = None

    def write(self, chunk: bytes) -> None:
        if self._out is None and len(self.head) + len(chunk) <= INLINE_MAX:
            self.head += chunk
            return
        if self._out is None:  # 64 KiB writes to the page cache: not worth a thread
            # 0600: bodies and results are callers' data, not for other users of the host.
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            self._out = os.fdopen(fd, "wb")
            self._out.write(self.head)
        self._out.write(chunk)

    def close(self) -> tuple[bytes | None, str | None]:
        """(inline bytes, None) or (None, file name)."""
        if self._out is None:
            return bytes(self.head), None
        self._out.close()
        return None, self.path.name

    def discard(self) -> None:
        if self._out is not None:
            self._out.close()
        self.path.unlink(missing_ok=True)


class TaskFinished(Exception):
    """The task already ended; it cannot be cancelled."""


class ReplicaFailed(Exception):
    """The replica could not be reached or broke off: the attempt may be retried."""


@dataclass(frozen=True)
class DispatchSettings:
    max_attempts: int = 3
    retry_backoff_s: float = 1.0


class Dispatcher:
    """Owns the async queues. Every task it finishes is written before callbacks are sent."""

    def __init__(self, store: Store, router: Router, files: Path, callbacks: CallbackSender,
                 settings: DispatchSettings, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.router = router
        self.files = files
        self.callbacks = callbacks
        self.settings = settings
        self.clock = clock
        self.queues: dict[str, deque[str]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._pumps: dict[str, asyncio.Task[None]] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._excluded: dict[str, frozenset[str]] = {}
        self._cancelling: set[str] = set()
        self._finishing: set[str] = set()  # tasks whose end is being written
        # Told each task that ended here, with what its answer said of usage (if looked at)
        self.finished_listeners: list[Callable[[TaskRecord, UsageMeter | None], None]] = []
        # Asked as each task gets its slot: a reason not to run it now (it then fails with it)
        self.start_checks: list[Callable[[TaskRecord], str | None]] = []
        self._session: aiohttp.ClientSession | None = None

    # --- life ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Resume after a stop or a crash: running tasks are queued again, in creation order."""
        self.files.mkdir(parents=True, exist_ok=True)
        requeued = await self.store.tasks.requeue_running()
        if requeued:
            log.warning("task.requeued",
                        message="tasks that were running when berthd stopped are queued again",
                        count=requeued)
        for endpoint, task_id in await self.store.tasks.queued_ids():
            self._enqueue(endpoint, task_id)
        for task_id in await self.store.tasks.pending_callbacks():
            self.callbacks.schedule(task_id)

    async def stop(self) -> None:
        """Stop dispatching; running tasks stay `running` in the store and resume at start."""
        work = [*self._pumps.values(), *self._running.values()]
        for job in work:
            job.cancel()
        await asyncio.gather(*work, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def file(self, name: str) -> Path:
        return self.files / name

    # --- queue ---------------------------------------------------------------------------

    def submit(self, task: TaskRecord) -> None:
        """A stored, queued task joins its endpoint's queue."""
        self._enqueue(task.endpoint, task.id)

    def _enqueue(self, endpoint: str, task_id: str, front: bool = False) -> None:
        queue = self.queues.setdefault(endpoint, deque())
        if front:
            queue.appendleft(task_id)
        else:
            queue.append(task_id)
        self._update_backlog(endpoint)
        self._wake.setdefault(endpoint, asyncio.Event()).set()
        pump = self._pumps.get(endpoint)
        if pump is None or pump.done():
            self._pumps[endpoint] = asyncio.get_running_loop().create_task(
                self._pump(endpoint), name=f"dispatch:{endpoint}")

    def _update_backlog(self, endpoint: str) -> None:
        """Queued tasks are demand: the one being placed waits in the router and counts there."""
        pool = self.router.reconciler.pool(endpoint)
        if pool is not None:
            pool.set_backlog(len(self.queues.get(endpoint, ())) - 1)

    async def _pump(self, endpoint: str) -> None:
        """Place the endpoint's tasks on slots, oldest first, as slots come free."""
        queue, wake = self.queues[endpoint], self._wake[endpoint]
        while True:
            if not queue:
                wake.clear()
                await wake.wait()
                continue
            pool = self.router.reconciler.pool(endpoint)
            if pool is None:
                await self._cancel_all(endpoint, "endpoint removed")
                continue
            task_id = queue[0]
            self._update_backlog(endpoint)
            try:
                lease = await self.router.lease(pool, exclude=self._avoid(pool, task_id))
            except SchedulerError:  # tasks wait out errors and slow starts: try again shortly
                await asyncio.sleep(NO_CAPACITY_RETRY_S)
                continue
            queued = bool(queue) and queue[0] == task_id  # else cancelled while it waited
            if queued:
                queue.popleft()
                self._update_backlog(endpoint)
            job = asyncio.get_running_loop().create_task(self._run(lease, task_id, queued),
                                                         name=f"task:{task_id}")
            job.add_done_callback(functools.partial(self._job_ended, lease, task_id))
            self._running[task_id] = job

    def _job_ended(self, lease: Lease, task_id: str, job: asyncio.Task[None]) -> None:
        """A job cancelled before its first step ran none of its code (a cancel in the same
        pass of the loop as its slot came): its slot is given back here, not leaked."""
        if lease.give_back():  # (nothing, when the job's own `async with` gave it back)
            asyncio.get_running_loop().create_task(lease.pool.notify())
        if self._running.get(task_id) is job:
            del self._running[task_id]

    def _avoid(self, pool: EndpointPool, task_id: str) -> frozenset[str]:
        """Replicas a retried task failed on, as long as another ready one can take it (an
        endpoint with a single replica tries that one again rather than waiting forever)."""
        failed = self._excluded.get(task_id, frozenset())
        others = [r for r in pool.replicas.values()
                  if r.state is ReplicaState.READY and r.id not in failed]
        return failed if others else frozenset()

    async def _cancel_all(self, endpoint: str, reason: str) -> None:
        """The endpoint is gone: its queued tasks end cancelled. A task queued while the store
        cancelled the others stays queued here, for the pump's next turn to cancel."""
        queue = self.queues[endpoint]
        seen = set(queue)
        ids = await self.store.tasks.cancel_queued_of(endpoint, self.clock(), reason)
        gone = seen.union(ids)
        kept = [task_id for task_id in queue if task_id not in gone]
        queue.clear()
        queue.extend(kept)
        for task_id in ids:
            self.callbacks.schedule(task_id)

    # --- one attempt ---------------------------------------------------------------------

    async def _run(self, lease: Lease, task_id: str, queued: bool) -> None:
        """One attempt of a task on the leased slot (none if it is no longer `queued`). The
        slot goes back when the `async with` below ends, the only place the dispatcher releases
        one: before a retry's backoff, the callback and the final store write."""
        try:
            async with lease:
                task = await self._begin(lease, task_id) if queued else None
                if task is None:
                    return
                refusal = next((why for check in self.start_checks
                                if (why := check(task)) is not None), None)
                # An OpenAI-style path: its answer's usage is read as it is kept
                meter = UsageMeter() if unquote(task.path).startswith("v1/") else None
                if refusal is not None:
                    task.status, task.error, meter, retry_for = "failed", refusal, None, None
                else:
                    retry_for = await self._attempt(lease, task, meter)
            if retry_for is not None:
                await self._retry(task, lease.replica, retry_for)
            else:
                self._finishing.add(task_id)  # a cancel now waits for its end (cancel())
                await self._finish(task, meter)
        finally:
            self._finishing.discard(task_id)
            self._running.pop(task_id, None)

    async def _begin(self, lease: Lease, task_id: str) -> TaskRecord | None:
        """The task, marked running on the lease's replica; None if it is no longer queued
        (cancelled while it waited for the slot)."""
        task = await self.store.tasks.get(task_id)
        if task is None or task.status != "queued" or task_id in self._finishing:
            return None  # (in _finishing: a cancel that read it queued is ending it)
        task.status, task.replica = "running", lease.replica.id
        task.started_at = self.clock()
        task.attempts += 1
        await self._store(task, "status", "replica", "started_at", "attempts")
        return task

    async def _store(self, task: TaskRecord, *fields: str) -> None:
        """A task's change, written until it is: a full or failing disk stalls the task
        rather than leaving it half moved (running in SQLite, in no queue in memory)."""
        await self.router.reconciler.durably(self.store.tasks.update, task, *fields)

    async def _attempt(self, lease: Lease, task: TaskRecord,
                       meter: UsageMeter | None = None) -> str | None:
        """Run the call; its outcome goes into `task`, or the error of a failure that earns
        another attempt is returned."""
        timeout, replica = lease.pool.spec.async_timeout_s, lease.replica
        try:
            async with asyncio.timeout(timeout):
                await self._call(replica, task, meter)
            task.status, task.error = "succeeded", None
        except TimeoutError:
            task.status, task.error = "failed", f"task exceeded async_timeout_s={timeout:g}"
        except ReplicaFailed as exc:
            if task.attempts < self.settings.max_attempts:
                return str(exc)
            task.status = "failed"
            task.error = f"replica failed on all {task.attempts} attempts; last: {exc}"
        except asyncio.CancelledError:
            if task.id not in self._cancelling:
                raise  # berthd stopping: the store still says running; requeued at start
            task.status, task.error = "cancelled", "cancelled by request"
        except OSError as exc:  # berth's own files: its body gone, no room for its result
            task.status, task.error = "failed", f"berth could not run the task: {exc}"
        return None

    async def _retry(self, task: TaskRecord, replica: Replica, error: str) -> None:
        """Back to the front of the queue after a backoff, avoiding the replica that failed."""
        task.status, task.error, task.replica = "queued", error, None
        await self._store(task, "status", "error", "replica")
        self._excluded[task.id] = self._excluded.get(task.id, frozenset()) | {replica.id}
        self.router.refused(replica)  # let the reconciler look at that replica now
        delay = self.settings.retry_backoff_s * 2 ** (task.attempts - 1)
        log.warning("task.retrying", task=task.id, endpoint=task.endpoint,
                    replica=replica.id, attempt=task.attempts, error=error, retry_in_s=delay)
        await asyncio.sleep(delay)
        self._enqueue(task.endpoint, task.id, front=True)

    async def _finish(self, task: TaskRecord, meter: UsageMeter | None = None) -> None:
        task.finished_at = self.clock()
        self._excluded.pop(task.id, None)
        self._cancelling.discard(task.id)
        await self._store(task)
        for listener in self.finished_listeners:
            listener(task, meter if task.status == "succeeded" else None)
        log.info(f"task.{task.status}", task=task.id, endpoint=task.endpoint,
                 replica=task.replica, attempts=task.attempts, error=task.error)
        if task.callback_url:
            self.callbacks.schedule(task.id)

    async def _call(self, replica: Replica, task: TaskRecord,
                    meter: UsageMeter | None = None) -> None:
        """One HTTP exchange with the replica; the result goes to the task (and a file)."""
        url = f"http://{replica.address}/{task.path}" + (f"?{task.query}" if task.query else "")
        headers = [*task.headers, ("X-Request-Id", task.id)]
        data = task.body if task.body_file is None else self._read_file(task.body_file)
        if task.body_file is not None:  # a length, not chunks: many model servers need it
            size = self.file(task.body_file).stat().st_size
            headers.append(("Content-Length", str(size)))
        try:
            async with self._client().request(task.method, URL(url, encoded=True),
                                              headers=headers, data=data,
                                              allow_redirects=False) as resp:
                await self._keep_result(task, resp, meter)
                # (only now: an answer cut off, timed out or cancelled has no result)
                task.result_status = resp.status
                task.result_type = resp.headers.get("Content-Type")
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise ReplicaFailed(f"{replica.id}: {exc!r}") from exc

    async def _keep_result(self, task: TaskRecord, resp: aiohttp.ClientResponse,
                           meter: UsageMeter | None = None) -> None:
        spool = Spool(self.files, f"{task.id}.result")
        if meter is not None:
            meter.sse = resp.content_type == "text/event-stream"
        try:
            async for chunk in resp.content.iter_chunked(CHUNK):
                spool.write(chunk)
                if meter is not None:
                    meter.feed(chunk)
        except BaseException:
            spool.discard()
            raise
        task.result_body, task.result_file = spool.close()
        if meter is not None and task.result_body is not None and not meter.sse:
            meter.whole(task.result_body)  # (all of a small answer, not only its tail)
        elif meter is not None:
            meter.end()

    async def _read_file(self, name: str) -> AsyncIterator[bytes]:
        with open(self.file(name), "rb") as f:  # noqa: ASYNC230 - 64 KiB page-cache reads
            while chunk := f.read(CHUNK):
                yield chunk

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
        return self._session

    # --- cancel and purge ------------------------------------------------------------------

    async def cancel(self, task_id: str) -> TaskRecord | None:
        """Cancel a queued or running task (TaskFinished if it ended); None if unknown."""
        task = await self.store.tasks.get(task_id)
        if task is None:
            return None
        if task.finished:
            raise TaskFinished(f"task {task_id} already {task.status}")
        running = self._running.get(task_id)
        if running is not None and task_id in self._finishing:  # its end is being written
            await asyncio.wait((running,))  # (waited, not awaited: a cancel of ours stays ours)
            raise TaskFinished(f"task {task_id} already finished")
        if running is not None:  # on a replica, or waiting out a retry backoff
            self._cancelling.add(task_id)
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
            task = await self.store.tasks.get(task_id)
            if task is None or task.finished:
                return task
        # Another cancel may have ended it meanwhile, or be ending it now: one cancel ends a
        # task. Its end is taken (_finishing) before it is read again, for a read may come
        # back after another cancel's write that it missed (aiosqlite answers from its thread).
        if task_id in self._finishing:
            raise TaskFinished(f"task {task_id} already ended")
        self._finishing.add(task_id)
        try:
            task = await self.store.tasks.get(task_id)
            if task is None or task.finished:
                raise TaskFinished(f"task {task_id} already ended")
            queue = self.queues.get(task.endpoint)
            if queue is not None and task_id in queue:
                queue.remove(task_id)
                self._update_backlog(task.endpoint)
            task.status, task.error = "cancelled", "cancelled by request"
            await self._finish(task)
        finally:
            self._finishing.discard(task_id)
        return task

    async def purge(self, ttl_s: float) -> int:
        """Delete bodies and results of tasks that finished more than ttl_s ago."""
        now = self.clock()
        expired = await self.store.tasks.expired(now - ttl_s)
        for task in expired:
            for name in (task.body_file, task.result_file):
                if name:
                    self.file(name).unlink(missing_ok=True)
            await self.store.tasks.mark_purged(task.id, now)
        if expired:
            log.info("task.results_purged", count=len(expired))
        return len(expired)
