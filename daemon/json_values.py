"""JSON read on the data plane's hot path, by orjson where it gives what json would.

`json_value` reads the usage object of every answer the usage meter reads. By orjson, four
times faster than json on a chat answer (0.8 against 3.2 us); what orjson refuses (NaN,
lone surrogates, nesting past 1024) json reads. Two differences from json remain: orjson
reads integers past 64 bits as floats (json: exact ints), and it nests to 1024 where json
stops near 1000. No token count comes near either.

`request_json` reads an OpenAI call's body (its model, whether it streams), which may be
forwarded or rewritten: it gives exactly what json.loads gives. orjson reads it (0.29
against 1.84 us for a small chat request) unless the text holds a run of 19 digits (an
integer past 64 bits would come back a float) or 900 brackets (orjson nests deeper)."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

LONG_NUMBER = re.compile(rb"[0-9]{19}")  # (19: -9223372036854775809 is past 64 bits)
MANY_BRACKETS = 900


def json_value(raw: bytes | bytearray) -> Any:
    """`raw` read as JSON: ValueError (or RecursionError) if it is not, as json.loads."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def request_json(raw: bytes | bytearray) -> Any:
    """`raw` read as json.loads reads it, to the same value and the same errors."""
    if LONG_NUMBER.search(raw) is None and \
            raw.count(b"[") + raw.count(b"{") < MANY_BRACKETS:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # (json says why, or reads what orjson refuses: NaN, a lone surrogate)
    return json.loads(raw)
