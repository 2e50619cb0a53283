"""The complete lines of a byte stream (SSE) as its chunks arrive, for the parts of berth that
read a stream while passing it on (the model-name rewriter, the usage meter)."""

from __future__ import annotations


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
