"""The complete lines of a byte stream (SSE) as its chunks arrive, for the parts of berth that
read a stream while passing it on (the usage meter), and the model-name rewriter of SSE."""

from __future__ import annotations

from collections.abc import Callable

MAX_HELD = 1024 ** 2  # the most of one SSE line the rewriter holds back


class LineBuffer:
    """Holds only a line's unfinished end. A chunk without a newline is appended, never
    rescanned, so a stream cut into tiny pieces still costs linear time; `overflowing` says
    when the held line passed `limit` (the caller decides what to do with it)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = bytearray()

    def feed(self, chunk: bytes) -> bytes:
        """The complete lines this chunk finishes, newlines kept (b"" if none)."""
        if b"\n" not in chunk:
            self.held += chunk
            return b""
        data = bytes(self.held) + chunk
        cut = data.rfind(b"\n") + 1
        self.held[:] = data[cut:]
        return data[:cut]

    @property
    def overflowing(self) -> bool:
        return len(self.held) > self.limit

    def take(self) -> bytes:
        """The held, unfinished line, no longer held."""
        held = bytes(self.held)
        self.held.clear()
        return held


class SseRewriter:
    """Rewrites each complete `data:` line of an SSE stream with `rewrite` (JSON bytes in,
    JSON bytes out); everything else passes as it comes. Only a line's unfinished end is held
    until its newline arrives, and SSE events end in a blank line, so no event waits. A line
    longer than MAX_HELD is passed on unrewritten rather than held (memory is bounded)."""

    def __init__(self, rewrite: Callable[[bytes], bytes]) -> None:
        self.rewrite = rewrite
        self.lines = LineBuffer(MAX_HELD)
        self.passing = False  # inside an over-long line: pass it until its end

    @property
    def tail(self) -> bytes:
        return bytes(self.lines.held)

    def feed(self, chunk: bytes) -> bytes:
        if self.passing:  # the rest of an over-long line goes as it comes
            end = chunk.find(b"\n") + 1
            if not end:
                return chunk
            self.passing = False
            return chunk[:end] + self.feed(chunk[end:])
        done = self.lines.feed(chunk)
        out = b"".join(self._line(line) for line in done.splitlines(keepends=True))
        if self.lines.overflowing:
            out, self.passing = out + self.lines.take(), True
        return out

    def flush(self) -> bytes:
        tail = self.lines.take()
        return tail if self.passing else self._line(tail) if tail else b""

    def _line(self, line: bytes) -> bytes:
        if not line.startswith(b"data:"):
            return line
        payload = line[5:].strip()
        if not payload.startswith(b"{"):
            return line  # [DONE] and anything that is not a JSON object
        ending = line[len(line.rstrip(b"\r\n")):]
        return b"data: " + self.rewrite(payload) + ending
