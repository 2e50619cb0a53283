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
import time
from typing import Any, Final

import structlog
from mypy_extensions import i64

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
BACKSLASH: Final = 0x5C
COLON: Final = 0x3A
QUOTE: Final = 0x22
OPEN: Final = 0x7B  # {
CLOSE: Final = 0x7D  # }
COMMA: Final = 0x2C
ZERO: Final = 0x30
# flat_usage: a value it does not read (left to a parser), and a count that is none
UNREAD: Final = -1
NOT_A_COUNT: Final = -2
MAX_DIGITS: Final = 15


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

    Most answers carry their usage as a top-level member near their end: the last
    `"usage"` and what follows it are read as an object (`b"{" + payload[at:]`), which
    parses only when that `"usage"` is a member of the top level. A match deeper in leaves
    closing brackets over, one that is a string value leaves no member, and one that is
    inside a string begins with an escaped quote (a backslash before it). When the member is
    the last and its object flat (as model servers write usage), flat_usage reads it without
    a parser. A top-level member that is no usage (`"usage": null`, on every chunk of a
    stream that asked for it) is the answer's unless it has a Responses API `response`. Only
    when that fails is the whole answer parsed. Unlike a whole parse, an answer that is no
    JSON (or nested past the parser's depth) before its last usage member is still counted
    by it; and only UTF-8 answers with the key spelt plainly are read (not `"\\u0075sage"`,
    nor UTF-16): no model server writes either."""
    at = payload.rfind(b'"usage"')
    if at < 0:
        return None
    if at == 0 or payload[at - 1] != BACKSLASH:
        start, end = last_member_value(payload, at + 7)
        found = flat_usage(payload, start, end) if start >= 0 else (UNREAD, UNREAD)
        if found is not None and found[0] == UNREAD:
            found = usage_member(payload, at)
        read = found is None or found[0] != UNREAD
        if read and (found is not None or b'"response"' not in payload):
            return found
    try:
        return usage_in_object(json_value(payload))
    except (ValueError, RecursionError):
        return None


def _is_space(byte: int) -> bool:
    return byte == 0x20 or byte == 0x0A or byte == 0x0D or byte == 0x09  # JSON's whitespace


def last_member_value(payload: bytes, at: i64) -> tuple[i64, i64]:
    """Where the value of the member whose key ends before `at` lies, if that member is the
    last of the top-level object: `payload` then holds only `: VALUE }` after `at` (and
    whitespace). (-1, -1) if not."""
    size: i64 = len(payload)
    end = size
    at = _skip_space(payload, at, size)
    if at == size or payload[at] != COLON:
        return -1, -1
    while end > at and _is_space(payload[end - 1]):
        end -= 1
    if end - 1 <= at or payload[end - 1] != CLOSE:
        return -1, -1
    return at + 1, end - 1


def usage_member(payload: bytes, at: int) -> tuple[int, int] | None:
    """tokens_of the usage member whose key begins at `at`, read with all that follows it as
    an object (`b"{" + payload[at:]`); (UNREAD, UNREAD) if that is no JSON object."""
    try:
        last = json_value(b"{" + payload[at:])
    except (ValueError, RecursionError):  # (the replica's bytes: anything)
        return UNREAD, UNREAD
    return tokens_of(last.get("usage")) if isinstance(last, dict) else (UNREAD, UNREAD)


def flat_usage(payload: bytes, start: i64, end: i64) -> tuple[int, int] | None:
    """tokens_of the JSON object in payload[start:end] read byte by byte, when it is flat as
    model servers write their usage: keys of printable ASCII without escapes, each value an
    unsigned integer of at most MAX_DIGITS digits or null. (UNREAD, UNREAD) for anything
    else, a parser's to read. Why: orjson took 3,400 instructions per answer in berthd, and
    tokens_of 700 more, for an object of three numbers (bench/instructions.py). Positions
    are i64: compiled, a tagged int's checks doubled the cost of each byte."""
    at = _skip_space(payload, start, end)
    if at == end or payload[at] != OPEN:
        return UNREAD, UNREAD
    prompt = completion = inputs = outputs = UNREAD
    at = _skip_space(payload, at + 1, end)
    more = at < end and payload[at] != CLOSE
    while more:
        key_end = _key_end(payload, at, end)
        if key_end < 0:
            return UNREAD, UNREAD
        key = payload[at + 1:key_end]  # (one slice and compares cost less than byte loops)
        at = _skip_space(payload, key_end + 1, end)
        if at == end or payload[at] != COLON:
            return UNREAD, UNREAD
        at = _skip_space(payload, at + 1, end)
        count, value_end = _flat_count(payload, at, end)
        if value_end < 0:
            return UNREAD, UNREAD
        if key == b"prompt_tokens":
            prompt = count
        elif key == b"completion_tokens":
            completion = count
        elif key == b"input_tokens":
            inputs = count
        elif key == b"output_tokens":
            outputs = count
        at = _skip_space(payload, value_end, end)
        if at == end or (payload[at] != COMMA and payload[at] != CLOSE):
            return UNREAD, UNREAD
        more = payload[at] == COMMA
        if more:
            at = _skip_space(payload, at + 1, end)
    if at == end or payload[at] != CLOSE or _skip_space(payload, at + 1, end) != end:
        return UNREAD, UNREAD
    prompt = prompt if prompt != UNREAD else inputs if inputs != UNREAD else 0
    completion = completion if completion != UNREAD else outputs if outputs != UNREAD else 0
    return None if prompt < 0 or completion < 0 else (prompt, completion)


def _skip_space(payload: bytes, at: i64, end: i64) -> i64:
    while at < end:
        byte = payload[at]  # (JSON's whitespace, as _is_space: compiled, no call per byte)
        if byte != 0x20 and byte != 0x0A and byte != 0x0D and byte != 0x09:
            return at
        at += 1
    return at


def _key_end(payload: bytes, at: i64, end: i64) -> i64:
    """Where the plain key that opens at `at` closes (its last quote); -1 if not plain."""
    if at == end or payload[at] != QUOTE:
        return -1
    at += 1
    while at < end:
        byte = payload[at]
        if byte == QUOTE:
            return at
        if byte < 0x20 or byte > 0x7E or byte == BACKSLASH:
            return -1
        at += 1
    return -1


def _flat_count(payload: bytes, at: i64, end: i64) -> tuple[int, i64]:
    """(the count, where it ends) of the value at `at` if it is null or an unsigned integer
    of MAX_DIGITS digits at most (NOT_A_COUNT for null or past MAX_TOKENS); (UNREAD, -1) for
    any other (or no) value."""
    if end - at >= 4 and payload[at] == 0x6E and payload[at + 1] == 0x75 \
            and payload[at + 2] == 0x6C and payload[at + 3] == 0x6C:  # null
        return NOT_A_COUNT, at + 4
    start, count = at, 0
    while at < end and 0x30 <= payload[at] <= 0x39 and at - start < MAX_DIGITS:
        count = count * 10 + payload[at] - ZERO
        at += 1
    if at == start or (payload[start] == ZERO and at - start > 1):
        return UNREAD, -1  # (a leading zero is not JSON)
    if at < end and (0x30 <= payload[at] <= 0x39 or payload[at] == 0x2E
                     or payload[at] | 0x20 == 0x65):
        return UNREAD, -1  # more than MAX_DIGITS, a fraction or an exponent
    return (count if count <= MAX_TOKENS else NOT_A_COUNT), at


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


class ModelTokens:
    """An (endpoint, model)'s tokens since berthd started: its /metrics counters."""

    __slots__ = ("completion", "prompt")

    def __init__(self) -> None:
        self.prompt, self.completion = 0, 0


class DayTokens:
    """A principal's model tokens of one UTC day (`day`: its first second): what its
    tokens_per_day budget is held to."""

    __slots__ = ("day", "tokens")

    def __init__(self, day: int, tokens: int) -> None:
        self.day, self.tokens = day, tokens


class Account:
    """What the calls of one (principal, endpoint, model) count into, held by the ledger so
    that a call adds to its counts with one lookup, not a cell built and looked up, a day
    counter and a model's totals each looked up (4,000 instructions per call in berthd):
    the pending tally of its last hour (stale once the ledger has flushed since: a flush
    takes pending tallies away), its principal's DayTokens and its model's ModelTokens."""

    __slots__ = ("day", "flushes", "hour", "model_tokens", "tally")

    def __init__(self, day: DayTokens, model_tokens: ModelTokens) -> None:
        self.hour = -1
        self.tally = Tally(0, 0, 0, 0)  # (none yet: `flushes` -1 never matches)
        self.flushes = -1
        self.day, self.model_tokens = day, model_tokens


class UsageLedger:
    """Usage counts of every call, in memory until flushed to SQLite; see the module
    docstring. `enabled` False (daemon.usage_accounting = false) records nothing."""

    def __init__(self, store: UsageStore, flush_s: float = 1.0, enabled: bool = True) -> None:
        self.store, self.flush_s, self.enabled = store, flush_s, enabled
        self.pending: dict[Cell, Tally] = {}
        self.flushes = 0  # flushes begun: an Account's tally from before one is stale
        self.accounts: dict[tuple[str, str, str], Account] = {}
        self.day_tokens: dict[str, DayTokens] = {}
        self.model_tokens: dict[tuple[str, str], ModelTokens] = {}  # since start: /metrics

    async def load(self, now: float) -> None:
        """Today's model tokens per principal, so daily budgets hold across restarts."""
        day = day_of(now)
        used = await self.store.tokens_since(day)
        self.accounts = {}  # (none holds a DayTokens of before)
        self.day_tokens = {principal: DayTokens(day, tokens) for principal, tokens in used.items()}

    def count(self, principal: str, endpoint: str, model: str, status: int,
              tokens: tuple[int, int] | None) -> None:
        """A call that ended now (status 499: the client left), with its answer's tokens."""
        if self.enabled:
            self.add(hour_of(time.time()), principal, endpoint, model, status >= 400, tokens)

    def record(self, cell: Cell, error: bool, tokens: tuple[int, int] | None) -> None:
        if self.enabled:
            self.add(cell[0], cell[1], cell[2], cell[3], error, tokens)

    def add(self, hour: int, principal: str, endpoint: str, model: str, error: bool,
            tokens: tuple[int, int] | None) -> None:
        account = self.accounts.get((principal, endpoint, model))
        if account is None:
            account = self._open(principal, endpoint, model)
        tally = account.tally
        if account.flushes != self.flushes or account.hour != hour:
            tally = self._pending_tally(account, (hour, principal, endpoint, model))
        tally.calls += 1
        if error:
            tally.errors += 1
        if tokens is None:
            return
        prompt, completion = tokens
        tally.prompt += prompt
        tally.completion += completion
        day, today = account.day, day_of(hour)
        if day.day < today:  # a new UTC day: its budget starts again
            day.day, day.tokens = today, 0
        if day.day == today:  # (not a late count of an earlier day: a restart would not)
            day.tokens += prompt + completion
        totals = account.model_tokens
        totals.prompt += prompt
        totals.completion += completion

    def tokens_today(self, principal: str, now: float) -> int:
        day = self.day_tokens.get(principal)
        return day.tokens if day is not None and day.day >= day_of(now) else 0

    def _open(self, principal: str, endpoint: str, model: str) -> Account:
        day = self.day_tokens.get(principal)
        if day is None:
            day = self.day_tokens[principal] = DayTokens(0, 0)
        totals = self.model_tokens.get((endpoint, model))
        if totals is None:
            totals = self.model_tokens[(endpoint, model)] = ModelTokens()
        account = self.accounts[(principal, endpoint, model)] = Account(day, totals)
        return account

    def _pending_tally(self, account: Account, cell: Cell) -> Tally:
        tally = self.pending.get(cell)
        if tally is None:
            tally = self.pending[cell] = Tally(0, 0, 0, 0)
        account.hour, account.tally, account.flushes = cell[0], tally, self.flushes
        return tally

    async def flush(self) -> None:
        """Write what is pending now, a batch per statement; a batch that fails stays
        pending. Counts added meanwhile wait for the next flush: flushing until nothing was
        pending wrote back to back under load (a statement and commit every ~70 ms, the
        SQLite thread contending for the GIL with the event loop all the while)."""
        cells = list(self.pending)
        for start in range(0, len(cells), ROWS_PER_STATEMENT):
            batch = {cell: self.pending.pop(cell)
                     for cell in cells[start:start + ROWS_PER_STATEMENT]}
            # (each batch taken away: an Account's tally may be in it, and calls that end
            # while it is written count into new pending ones)
            self.flushes += 1
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
    """Count one call that ended in `cell`'s hour (status 499: the client left)."""
    ledger.record(cell, status >= 400, meter.tokens if meter is not None else None)


