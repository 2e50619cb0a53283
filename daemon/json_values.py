"""JSON read on the data plane's hot path (the OpenAI routes' request bodies, the usage
objects of answers): by orjson, four to seven times faster than json on these small documents
(0.3 against 2.1 us for a chat request, 0.8 against 3.2 us for a chat answer). What orjson
refuses (NaN, integers past 64 bits, lone surrogates, nesting past 1024) json reads, so what is
accepted, and its value, is what json.loads gives."""

from __future__ import annotations

import json
from typing import Any

import orjson


def json_value(raw: bytes | bytearray) -> Any:
    """`raw` read as JSON: ValueError (or RecursionError) if it is not, as json.loads."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)
