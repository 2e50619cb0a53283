"""The `model` field of a multipart/form-data body (`/v1/audio/transcriptions` and
`/translations`), found without reading the whole body: berth reads only until that field's
value is complete (the openai SDK and curl -F in the usual order send it before the file) and
the rest of the body, audio included, streams to the replica as it arrives."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from aiohttp import web

HEAD_MAX = 1024 ** 2  # the most berth reads to find `model`; then it must have come
PART_HEADERS_MAX = 8 * 1024  # a part's header block longer than this is not a form's
READ_TIMEOUT_S = 30.0  # to send the form up to its `model` (the body is read before auth)
# Anchored at a line start: a header line repeated thousands of times stays linear.
NAME = re.compile(rb'(?im)^content-disposition:[^\r\n]*?;[ \t]*name="([^"\r\n]*)"')
FILENAME = re.compile(rb'(?im)^content-disposition:[^\r\n]*?;[ \t]*filename\*?=')


class FormError(Exception):
    """The body is not a form berth can route: `message` says why."""


@dataclass(frozen=True)
class Found:
    """The field's value: head[start:end]."""

    start: int
    end: int


def boundary_of(content_type: str) -> bytes:
    match = re.search(r'(?i);\s*boundary="?([^";]{1,200})"?', content_type)
    if not content_type.lower().startswith("multipart/form-data") or match is None:
        raise FormError("this route takes multipart/form-data with a boundary")
    try:
        return match.group(1).encode("ascii")
    except UnicodeEncodeError:
        raise FormError("the form's boundary is not ASCII") from None


@dataclass
class FormScan:
    """Where a scan of the form's first bytes stands, so each new chunk is read once: `pos`
    is the delimiter of the first part not yet looked at."""

    boundary: bytes
    pos: int = -1

    def find(self, head: bytes | bytearray, name: bytes, complete: bool) -> Found | None:
        """Where the value of field `name` lies in `head` (the body's first bytes; all of it
        when `complete`); None while more are needed; FormError when the form has no such
        field or is not a form."""
        delimiter = b"--" + self.boundary
        if self.pos < 0:
            self.pos = head.find(delimiter)
        while self.pos >= 0:
            after = self.pos + len(delimiter)
            if head[after:after + 2] == b"--":
                raise FormError("the form has no `model` field")
            headers_end = head.find(b"\r\n\r\n", after, after + PART_HEADERS_MAX)
            if headers_end < 0:
                if len(head) - after > PART_HEADERS_MAX:
                    raise FormError("a part's headers are too long for a form")
                break
            start = headers_end + 4
            end = head.find(b"\r\n" + delimiter, start)
            if end < 0:
                break
            headers = head[after:headers_end]
            field = NAME.search(headers)
            if field is not None and field.group(1) == name and not FILENAME.search(headers):
                return Found(start, end)
            self.pos = end + 2
        if complete:
            raise FormError("the form has no `model` field" if delimiter in head else
                            "the body is not a multipart form with the boundary it declares")
        return None


def find_field(head: bytes, boundary: bytes, name: bytes, complete: bool) -> Found | None:
    """FormScan.find on the whole of `head` at once."""
    return FormScan(boundary).find(head, name, complete)


async def read_model_field(request: web.Request) -> tuple[str, bytes, Found]:
    """(model, the bytes read so far, where the model's value is in them)."""
    scan = FormScan(boundary_of(request.headers.get("Content-Type", "")))
    head = bytearray()
    try:
        async with asyncio.timeout(READ_TIMEOUT_S):
            while True:
                chunk = await request.content.readany()
                head += chunk
                found = scan.find(head, b"model", complete=not chunk)
                if found is not None:
                    break
                if len(head) > HEAD_MAX:
                    raise FormError(f"no `model` field in the first {HEAD_MAX} bytes: send "
                                    "it before the file")
    except TimeoutError:
        raise FormError(f"the form did not reach its `model` field within "
                        f"{READ_TIMEOUT_S:g} s") from None
    try:
        model = head[found.start:found.end].decode().strip()
    except UnicodeDecodeError:
        raise FormError("`model` is not text") from None
    return model, bytes(head), found
