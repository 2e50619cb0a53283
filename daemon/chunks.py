"""A body as an async iterator, over a coroutine that gives its next piece (b"" at its end).

Why apart: the hot modules of the data plane may run compiled by mypyc (daemon/native.py),
which does not compile async generators; these two stay interpreted, and cost one generator
step per piece as before.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable


async def chunks_of(next_chunk: Callable[[], Awaitable[bytes]]) -> AsyncIterator[bytes]:
    """Each piece `next_chunk` gives, until it gives b"" (or raises)."""
    while chunk := await next_chunk():
        yield chunk


async def no_chunks() -> AsyncIterator[bytes]:
    """A body that has none."""
    return
    yield b""  # (an async generator that yields nothing)
