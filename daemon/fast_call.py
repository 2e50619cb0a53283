"""The common model call, served from the connections' callbacks: no task, no coroutine.

Why: a call on the task path goes through a task and five coroutines, each resumed twice, on
top of what it does; that machinery was a third of berth's Python per proxied call
(bench/RESULTS.md). The common call needs none of it: its request is whole, a slot is free, a
connection to the replica is idle, and the replica's small answer comes whole in one read.

`serve_fast` takes a call only when all of that holds up to the slot: `/invoke` or an OpenAI
JSON route (its model known, its answer not asked to stream), no pin, not HEAD, no `Expect`,
its body (if any) whole in what was read, the browser and token checks passed, the caller
without token limits. Anything else goes the task's way untouched. Once it
holds a slot the call is the fast path's: its request goes out on an idle connection, and
each read of that connection steps it on (`FastCall.step`). A small whole answer is written
to the client from there; anything else (no idle connection, a big or streamed answer, a
broken connection, the deadline) hands the call on to a task that goes on from where the call
stands with the proxy's own code (proxy.resume_call), so each rule of the data plane lives
in one place. A client that leaves meanwhile ends it as a cancelled task would (499, slot
back, the connection to the replica closed).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

import structlog

from berth.daemon.errors import ApiError
from berth.daemon.json_values import json_object
from berth.daemon.keys import BROWSER, DATA_PLANE, DataPlane
from berth.daemon.models_api import presented_key
from berth.daemon.openai_api import OpenAIError, check_any_key
from berth.daemon.openai_api import fast_call as openai_fast_call
from berth.daemon.proxy import (
    Call,
    Sent,
    check_call,
    end_call,
    open_call,
    resume_call,
    small,
    upstream_request,
    whole_answer,
)
from berth.daemon.upstream import UpstreamConnection, UpstreamResponse
from berth.scheduler.errors import SchedulerError
from berth.scheduler.router import Lease

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from berth.daemon.front_messages import FrontReplier, FrontRequest

log = structlog.get_logger("berth.fast_call")
NO_EXCLUDE: frozenset[str] = frozenset()


class Front(Protocol):
    """What a fast call needs of the client connection it serves (front.Front)."""

    def fast_served(self, call: FastCall) -> None: ...

    def go_on_in_task(self, call: FastCall, work: Coroutine[object, None, object]) -> None: ...

    def abort(self) -> None: ...


def serve_fast(front: Front, request: FrontRequest, replier: FrontReplier) -> FastCall | None:
    """Begin `request` on the fast path if it can take it (see the module's doc); None: it
    goes the task's way, and nothing was done."""
    content = request.content
    if request.expect_continue or request.head_only or not content.done:
        return None
    app = request.app
    plane = app[DATA_PLANE]
    try:
        if "X-Berth-Replica" in request.headers:
            return None
        app[BROWSER].check(request)
        call = _openai_call(plane, request, replier) if request.openai else \
            _invoke_call(plane, request, replier)
        if call is None:
            return None
        replica = plane.router.free_slot(call.pool, None, NO_EXCLUDE)
    except (ApiError, SchedulerError):
        return None  # the task's way refuses it again, and says why
    if replica is None:
        return None  # it must wait for a slot
    # From here the call holds a slot: it is the fast path's, to its end.
    if request.body_exists:
        whole = content.whole()  # taken (an OpenAI call's was only peeked): its hold goes
        if call.body is None:
            call.whole = whole
    fast = FastCall(front, plane, call, Lease(call.pool, replica, plane.router.clock))
    fast.send()
    return fast


def _invoke_call(plane: DataPlane, request: FrontRequest, replier: FrontReplier
                 ) -> Call | None:
    call = open_call(plane, request, replier)
    if plane.auth.limits.get(call.principal) is not None:
        return None  # (a quota counts each call: the task's way would count it again)
    check_call(plane, call)
    if request.content.size > plane.limits.max_body:
        return None  # (a chunked body, whole: the task's way refuses it as it streams)
    return call


def _openai_call(plane: DataPlane, request: FrontRequest, replier: FrontReplier
                 ) -> Call | None:
    if request.content.size > plane.limits.max_body:
        return None  # (the task's way answers 413 in OpenAI's shape)
    key = presented_key(request)
    try:
        check_any_key(plane, key)  # (no body is parsed for a caller no model would take)
    except OpenAIError:
        return None
    raw = request.content.peek()
    body = request.json_body = json_object(raw)
    return openai_fast_call(plane, request, replier, raw, body, key) if body is not None \
        else None


class FastCall:
    """One call on the fast path, from its slot to its end (see the module's doc). Steps on
    when the replica's connection was read; at most one of its ends happens: `_finish`
    (answered here), `_hand_on` (to a task) or `abandon` (the client left)."""

    __slots__ = ("answer", "at", "call", "conn", "front", "lease", "plane")

    def __init__(self, front: Front, plane: DataPlane, call: Call, lease: Lease) -> None:
        self.front = front
        self.plane = plane
        self.call = call
        self.lease = lease
        self.at = plane.upstream.loop.time() + call.pool.spec.request_timeout_s
        self.conn: UpstreamConnection | None = None
        self.answer: asyncio.Future[UpstreamResponse] | None = None

    @property
    def request(self) -> FrontRequest:
        return self.call.request  # type: ignore[return-value]

    @property
    def replier(self) -> FrontReplier:
        return self.call.reply  # type: ignore[return-value]

    def send(self) -> None:
        """The request out on an idle connection to the replica, if there is one."""
        replica, upstream = self.lease.replica, self.plane.upstream
        conn = upstream.idle(replica.address) if replica.address is not None else None
        if conn is None:
            self._hand_on()  # connecting takes an await: the task's way does it
            return
        try:
            head, body, _ = upstream_request(self.call, replica)  # (a body here is whole)
            self.answer = conn.send(head, body)  # type: ignore[assignment]
        except Exception:  # (a fault: answered 500 by the front; nothing is left taken)
            conn.close()
            self.abandon(500)
            raise
        self.conn = conn
        conn.listener = self.step
        self.plane.deadlines.add(self)

    def step(self) -> None:
        """The replica's connection was read, or lost: end the call here if its answer is
        whole and small, hand it on if the answer is anything else."""
        answer = self.answer
        assert answer is not None
        if not answer.done():
            return  # its head is still to come
        if answer.exception() is not None:
            self._hand_on()  # the task's way tells it as every call's (502, a retry)
            return
        upstream = answer.result()
        if not small(upstream):
            self._hand_on()  # streamed, big, bodiless: the task's way relays it
        elif upstream.complete:
            self._finish(upstream)
        elif upstream.failed:
            self._hand_on()

    def expire(self) -> None:
        """Deadlines: request_timeout_s passed. The task's own deadline, passed too, ends
        the call as every call's (504)."""
        self._hand_on()

    def abandon(self, outcome: int = 499) -> None:
        """The client left: what a cancelled call's task does on its way out."""
        if self.lease.released:
            return  # (ended already)
        self._stop_listening()
        answer = self.answer
        if answer is not None and not answer.done():
            answer.cancel()  # (its connection's end would set an error nobody reads)
        elif answer is not None and not answer.cancelled():
            answer.exception()  # (read: an error nobody reads is logged)
        if self.conn is not None:
            self.conn.close()  # the answer comes to nobody: the connection is not reused
        self._slot_back()
        end_call(self.plane, self.call, outcome)

    def _finish(self, upstream: UpstreamResponse) -> None:
        self._stop_listening()
        conn, call = self.conn, self.call
        assert conn is not None
        try:
            status = whole_answer(call, self.lease.replica, upstream, upstream.body()).status
        except Exception:
            log.exception("fast_call.unhandled_error", endpoint=call.pool.name)
            self.abandon(500)
            self.front.abort()  # what went out is unknown: the client is told by the close
            return
        self.plane.upstream.keep_or_close(conn)
        self._slot_back()
        try:
            end_call(self.plane, call, status)
        finally:  # (the client's next request must not hang on a fault in the counting)
            self.front.fast_served(self)

    def _hand_on(self) -> None:
        self._stop_listening()
        sent = Sent(self.conn, self.answer, self.at)
        self.front.go_on_in_task(self, resume_call(self.plane, self.call, self.lease, sent))

    def _stop_listening(self) -> None:
        if self.conn is not None:
            self.conn.listener = None
            self.plane.deadlines.discard(self)

    def _slot_back(self) -> None:
        if self.lease.give_back():  # a drain waits for this slot (rare): tell it
            self.plane.upstream.loop.create_task(self.lease.pool.notify())

