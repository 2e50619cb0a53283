"""The `model` field of a multipart/form-data body (`/v1/audio/transcriptions` and
`/translations`), found without reading the whole body: berth reads only until that field's
value is complete (the openai SDK and curl -F in the usual order send it before the file) and
the rest of the body, audio included, streams to the replica as it arrives."""

from __future__ import annotations

import re
from dataclasses import dataclass

from aiohttp import web

HEAD_MAX = 1024 ** 2  # the most berth reads to find `model`; then it must have come
NAME = re.compile(rb'(?i)content-disposition:[^\r\n]*;\s*name="([^"]*)"')
FILENAME = re.compile(rb'(?i)content-disposition:[^\r\n]*;\s*filename\*?=')


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
    return match.group(1).encode()


def find_field(head: bytes, boundary: bytes, name: bytes, complete: bool) -> Found | None:
    """Where the value of form field `name` lies in `head` (the body's first bytes; all of it
    when `complete`); None while more bytes are needed; FormError when the form has no such
    field or is not a form."""
    delimiter = b"--" + boundary
    pos = head.find(delimiter)
    while pos >= 0:
        after = pos + len(delimiter)
        if head[after:after + 2] == b"--":
            raise FormError("the form has no `model` field")
        headers_end = head.find(b"\r\n\r\n", after)
        if headers_end < 0:
            break
        headers = head[after:headers_end]
        start = headers_end + 4
        end = head.find(b"\r\n" + delimiter, start)
        if end < 0:
            break
        field = NAME.search(headers)
        if field is not None and field.group(1) == name and not FILENAME.search(headers):
            return Found(start, end)
        pos = end + 2
    if complete:
        raise FormError("the form has no `model` field" if delimiter in head else
                        "the body is not a multipart form with the boundary it declares")
    return None


async def read_model_field(request: web.Request) -> tuple[str, bytes, Found]:
    """(model, the bytes read so far, where the model's value is in them)."""
    boundary = boundary_of(request.headers.get("Content-Type", ""))
    head = b""
    while True:
        chunk = await request.content.readany()
        head += chunk
        found = find_field(head, boundary, b"model", complete=not chunk)
        if found is not None:
            break
        if len(head) > HEAD_MAX:
            raise FormError(f"no `model` field in the first {HEAD_MAX} bytes: send it before "
                            "the file")
    try:
        model = head[found.start:found.end].decode().strip()
    except UnicodeDecodeError:
        raise FormError("`model` is not text") from None
    return model, head, found
