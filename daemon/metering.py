"""Usage accounting's part in every call: `UsageMeter` reads the OpenAI `usage` object of an
answer as it passes through the proxy (a whole JSON answer, the last SSE chunk that carries
one, or the tail of a large JSON answer) and never holds a byte back; `UsageLedger` owns the
counts: it adds each ended call in memory and writes them to SQLite in batches every
`flush_s` and at shutdown (one statement per batch, so a batch counts whole or not at all; a
crash loses at most the last `flush_s` of counts). It also keeps each principal's model
tokens of the current UTC day, loaded from SQLite at start, for the tokens_per_day limit
(daemon.quota). Principals are token ids, "admin" or "public" (no token, or open mode).

Compiled with the data plane's hot modules (daemon/native.py): a meter and a count per
OpenAI call were ~2.7 us of berthd's Python per call, the most of anything accounting adds.
The request side (asking a stream for its usage) and the ledger's flushing task are in
daemon/usage.py.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Final

import structlog

from berth.daemon.json_values import json_value
from berth.daemon.sse import LineBuffer
from berth.store.usage import ROWS_PER_STATEMENT, UsageRow, UsageStore

log = structlog.get_logger("berth.usage")

HOUR, DAY = 3600, 86400
# Final: compiled, a constant is inlined; else each use is a lookup in the module's dict.
MAX_TOKENS: Final = 1_000_000_000_000  # a model's claim beyond this is not a count
MISSING: Final = object()
TAIL = 4096  # bytes of a large JSON answer kept to find its usage object
MAX_LINE = 1024 ** 2  # an SSE line longer than this is not read for usage
USAGE_KEY = re.compile(rb'"usage"\s*:\s*')
BACKSLASH = 0x5C


def hour_of(now: float) -> int:
    return int(now) - int(now) % HOUR


def day_of(now: float) -> int:
    return int(now) - int(now) % DAY


def _count(value: Any) -> int | None:
    if type(value) is not int:  # (a JSON number that is an integer; true and false are not)
        return None
    count: int = value
    return count if 0 <= count <= MAX_TOKENS else None


def tokens_of(usage: Any) -> tuple[int, int] | None:
    """(prompt, completion) from an OpenAI usage object (chat/completions/embeddings names or
    the Responses API's input/output names); None when it is not one."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", MISSING)  # (the other name looked up only if needed)
    if prompt is MISSING:
        prompt = usage.get("input_tokens", 0)
    completion = usage.get("completion_tokens", MISSING)
    if completion is MISSING:
        completion = usage.get("output_tokens", 0)
    prompt_count, completion_count = _count(prompt), _count(completion)
    if prompt_count is None or completion_count is None:
        return None
    return prompt_count, completion_count


def usage_in_object(answer: Any) -> tuple[int, int] | None:
    """The usage of an answer object: top level, or in a Responses API event's `response`."""
    if not isinstance(answer, dict):
        return None
    found = tokens_of(answer.get("usage"))
    if found is None and isinstance(answer.get("response"), dict):
        found = tokens_of(answer["response"].get("usage"))
    return found


def usage_in_json(payload: bytes) -> tuple[int, int] | None:
    """The usage of one JSON answer (or SSE event's data), as `usage_in_object` of it parsed.

    Most answers end with their usage: the last `"usage"` and what follows it, read as an
    object (`{` + that), parse only when it is a member of the top level. A match deeper in
    leaves closing brackets over, one that is a string value leaves no member, and one that
    is inside a string begins with an escaped quote (a backslash before it). A top-level
    member that is no usage (`"usage": null`, on every chunk of a stream that asked for it)
    is the answer's unless it has a Responses API `response`. Only when that fails is the
    whole answer parsed: a chat answer costs a third of the work. Unlike a whole parse, an
    answer that is no JSON (or nested past the parser's depth) before its last usage member
    is still counted by it; and only UTF-8 answers with the key spelt plainly are read (not
    `"\\u0075sage"`, nor UTF-16): no model server writes either."""
    at = payload.rfind(b'"usage"')
    if at < 0:
        return None
    if at == 0 or payload[at - 1] != BACKSLASH:
        try:
            last = json_value(b"{" + payload[at:])
        except (ValueError, RecursionError):  # (the replica's bytes: anything)
            last = None
        if isinstance(last, dict):
            found = tokens_of(last.get("usage"))
            if found is not None or b'"response"' not in payload:
                return found
    try:
        return usage_in_object(json_value(payload))
    except (ValueError, RecursionError):
        return None


def usage_in_tail(data: bytes) -> tuple[int, int] | None:
    """The last `"usage": {...}` object in the tail of a JSON text too large to parse whole."""
    matches = list(USAGE_KEY.finditer(data))
    if not matches:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(data[matches[-1].end():].decode(errors="replace"))
    except (ValueError, RecursionError):  # (the replica's bytes: anything, nested at will)
        return None
    return tokens_of(value)


class UsageMeter:
    """The model tokens of one answer, read as it streams by. One is made per OpenAI-style
    call, so it costs next to nothing until it reads: try, not contextlib.suppress (a third
    of `whole` measured), and the SSE line buffer only for a stream."""

    __slots__ = ("_lines", "_tail", "sse", "tokens")

    def __init__(self) -> None:
        self.tokens: tuple[int, int] | None = None
        self.sse = False
        self._tail = b""  # the last TAIL bytes of a JSON answer
        self._lines: LineBuffer | None = None  # an SSE stream's lines, once one streams

    def whole(self, body: bytes) -> None:
        """A complete (small) answer."""
        self._line(body)

    def feed(self, chunk: bytes) -> None:
        """One chunk of a streamed answer (SSE when `sse` is set)."""
        if not self.sse:
            self._tail = (self._tail + chunk)[-TAIL:]
            return
        lines = self._lines
        if lines is None:
            lines = self._lines = LineBuffer(MAX_LINE)
        done = lines.feed(chunk)
        if lines.overflowing:  # not a line worth reading for usage
            lines.take()
        if b'"usage"' in done:
            for line in done.splitlines():
                if line.startswith(b"data:") and b'"usage"' in line:
                    self._line(line[5:])

    def end(self) -> None:
        """The streamed answer is over."""
        tail, self._tail = self._tail, b""
        held = self._lines.take() if self._lines is not None else b""
        if self.sse and held.startswith(b"data:"):
            self._line(held[5:])
        elif not self.sse and tail:
            self._take(usage_in_tail(tail))

    def _line(self, payload: bytes) -> None:
        self._take(usage_in_json(payload))

    def _take(self, found: tuple[int, int] | None) -> None:
        if found is not None:
            self.tokens = found  # the last usage seen is the call's


Cell = tuple[int, str, str, str]  # (hour, principal, endpoint, model)


class Tally:
    """A cell's counts. Every call adds to one: compiled, an object's int fields are added in
    place, where a list's items were each read, unboxed, added and boxed back (2,500
    instructions per call in berthd, bench/instructions.py)."""

    __slots__ = ("calls", "completion", "errors", "prompt")

    def __init__(self, calls: int, errors: int, prompt: int, completion: int) -> None:
        self.calls, self.errors, self.prompt, self.completion = calls, errors, prompt, completion


def add_to(tallies: dict[Cell, Tally], cell: Cell, calls: int, errors: int, prompt: int,
           completion: int) -> None:
    """Add to a cell's counts (numbers, not a Tally: every call adds to one)."""
    tally = tallies.get(cell)
    if tally is None:
        tallies[cell] = Tally(calls, errors, prompt, completion)
    else:
        tally.calls += calls
        tally.errors += errors
        tally.prompt += prompt
        tally.completion += completion


class UsageLedger:
    """Usage counts of every call, in memory until flushed to SQLite; see the module
    docstring. `enabled` False (daemon.usage_accounting = false) records nothing."""

    def __init__(self, store: UsageStore, flush_s: float = 1.0, enabled: bool = True) -> None:
        self.store, self.flush_s, self.enabled = store, flush_s, enabled
        self.pending: dict[Cell, Tally] = {}
        self.day = 0
        self.day_tokens: dict[str, int] = {}
        # (endpoint, model) -> [prompt, completion] since start: /metrics counters.
        self.model_tokens: dict[tuple[str, str], list[int]] = {}

    async def load(self, now: float) -> None:
        """Today's model tokens per principal, so daily budgets hold across restarts."""
        self.day = day_of(now)
        self.day_tokens = await self.store.tokens_since(self.day)

    def record(self, cell: Cell, error: bool, tokens: tuple[int, int] | None) -> None:
        if not self.enabled:
            return
        prompt, completion = tokens or (0, 0)
        add_to(self.pending, cell, 1, int(error), prompt, completion)
        if tokens is None:
            return
        self._roll(cell[0])
        principal = cell[1]
        self.day_tokens[principal] = self.day_tokens.get(principal, 0) + prompt + completion
        model = (cell[2], cell[3])
        totals = self.model_tokens.get(model)
        if totals is None:  # (not setdefault: its new list would be made for every call)
            totals = self.model_tokens[model] = [0, 0]
        totals[0] += prompt
        totals[1] += completion

    def tokens_today(self, principal: str, now: float) -> int:
        self._roll(hour_of(now))
        return self.day_tokens.get(principal, 0)

    def _roll(self, hour: int) -> None:
        if day_of(hour) > self.day:  # a new UTC day: every budget starts again
            self.day, self.day_tokens = day_of(hour), {}

    async def flush(self) -> None:
        """Write what is pending now, a batch per statement; a batch that fails stays
        pending. Counts added meanwhile wait for the next flush: flushing until nothing was
        pending wrote back to back under load (a statement and commit every ~70 ms, the
        SQLite thread contending for the GIL with the event loop all the while)."""
        cells = list(self.pending)
        for start in range(0, len(cells), ROWS_PER_STATEMENT):
            batch = {cell: self.pending.pop(cell)
                     for cell in cells[start:start + ROWS_PER_STATEMENT]}
            rows = [UsageRow(*cell, t.calls, t.errors, t.prompt, t.completion)
                    for cell, t in batch.items()]
            try:  # shielded: a statement already queued runs anyway, so it counts once
                await asyncio.shield(self.store.add(rows))
            except asyncio.CancelledError:
                raise
            except BaseException:
                for cell, t in batch.items():  # counted next time, never lost here
                    add_to(self.pending, cell, t.calls, t.errors, t.prompt, t.completion)
                raise

    async def run(self) -> None:
        """Flush every flush_s until cancelled."""
        while True:
            await asyncio.sleep(self.flush_s)
            try:
                await self.flush()
            except Exception as exc:  # a full disk: keep counting in memory, try again
                log.warning("usage.flush_failed", error=str(exc))


def account(ledger: UsageLedger, cell: Cell, status: int, meter: UsageMeter | None) -> None:
    """Count one ended call (status 499: the client left) in the ledger (and so /metrics)."""
    ledger.record(cell, status >= 400, meter.tokens if meter is not None else None)


