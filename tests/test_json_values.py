"""json_values.json_value (the usage meter's) reads what json.loads reads, to the same value,
and refuses what it refuses, but for the two differences its docstring names."""

from __future__ import annotations

import json

import pytest

from berth.daemon.json_values import json_value

DOCUMENTS = [
    b'{"model": "llama", "messages": [{"role": "user", "content": "hi"}]}',
    b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}',
    b'{"a": 1, "a": 2}',  # the last of a repeated key
    b'{"n": NaN, "i": Infinity}',  # orjson refuses these; json reads them
    b'{"big": 12345678901234567890}',  # past 63 bits, within 64
    b'{"s": "\\ud800"}',  # a lone surrogate
    b'{"f": 1e400, "g": 0.1}',
    b'[' * 900 + b']' * 900,
    b'"\xc3\xa9t\xc3\xa9"',
    b"  7  ",
]
REFUSED = [b"", b"not json", b'{"a": 1', b"\xff\xfe", b'{"a": 1} x', b"[1,]"]


@pytest.mark.parametrize("raw", DOCUMENTS)
def test_a_document_reads_as_json_reads_it(raw):
    assert repr(json_value(raw)) == repr(json.loads(raw))
    assert repr(json_value(bytearray(raw))) == repr(json.loads(raw))


@pytest.mark.parametrize("raw", REFUSED)
def test_what_json_refuses_is_refused_with_a_value_error(raw):
    with pytest.raises(ValueError):
        json.loads(raw)
    with pytest.raises(ValueError):
        json_value(raw)


def test_the_two_differences_from_json():
    assert json_value(b"123456789012345678901234567890") == pytest.approx(1.2345678901e29)
    with pytest.raises(RecursionError):
        json.loads(b"[" * 1020 + b"]" * 1020)
    assert isinstance(json_value(b"[" * 1020 + b"]" * 1020), list)


def test_nesting_too_deep_for_json_too_is_a_recursion_error():
    raw = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(RecursionError):
        json_value(raw)
