"""end_to_end: which header lines cross berth (RFC 9110 section 7.6.1), as a table."""

from __future__ import annotations

import pytest

from berth.daemon.proxy import REQUEST_ONLY, end_to_end

NONE: frozenset[bytes] = frozenset()


@pytest.mark.parametrize(("fields", "drop", "kept"), [
    ([("Accept", "a"), ("Connection", "keep-alive"), ("Keep-Alive", "timeout=5")], NONE,
     [("Accept", "a")]),
    # names the Connection lines list go too, whatever their case and spacing, in any line
    ([("X-A", "1"), ("connection", " X-A , x-b"), ("X-B", "2"), ("CONNECTION", "x-c"),
      ("X-C", "3"), ("X-D", "4")], NONE, [("X-D", "4")]),
    ([("Transfer-Encoding", "chunked"), ("TE", "trailers"), ("Upgrade", "h2c"),
      ("Host", "h"), ("Content-Length", "1"), ("Expect", "100-continue"), ("Z", "z")], NONE,
     [("Z", "z")]),
    # the caller's own list: credentials and forwarding claims never reach the model
    ([("Authorization", "Bearer k"), ("X-Forwarded-For", "1.2.3.4"), ("x-request-id", "r"),
      ("Accept", "b")], REQUEST_ONLY, [("Accept", "b")]),
    # order and repeated lines are kept as sent
    ([("B", "1"), ("A", "2"), ("B", "3")], NONE, [("B", "1"), ("A", "2"), ("B", "3")]),
])
def test_end_to_end(fields: list[tuple[str, str]], drop: frozenset[bytes],
                    kept: list[tuple[str, str]]) -> None:
    # (written as text to be read; header lines cross berth as bytes)
    assert end_to_end(_bytes(fields), drop) == _bytes(kept)


def _bytes(lines: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in lines]
