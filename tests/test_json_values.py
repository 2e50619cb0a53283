"""json_values.json_value (the usage meter's) reads what json.loads reads, to the same value,
and refuses what it refuses, but for the two differences its docstring names; request_json
(an OpenAI call's body, which may be forwarded or rewritten) has none."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from berth.daemon.json_values import json_value, request_json

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


EXACT = [*DOCUMENTS, b"123456789012345678901234567890", b'{"n": -9223372036854775809}',
         b'{"id": "1234567890123456789012"}', b"[" * 950 + b"]" * 950,
         b"[" * 1020 + b"]" * 1020, b'{"a": ' * 1010 + b"0" + b"}" * 1010,
         b'[{"a": ' * 505 + b"0" + b"}]" * 505, b"\xef\xbb\xbf{}", '{"a": 1}'.encode("utf-16"),
         b'{"f": 1E400, "z": -0, "e": 0.1e-400}']


@pytest.mark.parametrize("raw", EXACT + REFUSED)
def test_a_request_body_reads_exactly_as_json_reads_it(raw):
    try:
        want = repr(json.loads(raw))
    except (ValueError, RecursionError) as exc:
        with pytest.raises(type(exc)):
            request_json(raw)
        return
    assert repr(request_json(raw)) == want
    assert repr(request_json(bytearray(raw))) == want


JSON_TEXT = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(value=JSON_TEXT, indent=st.sampled_from([None, 2]))
def test_any_request_body_reads_exactly_as_json_reads_it(value, indent):
    raw = json.dumps(value, indent=indent).encode()
    assert repr(request_json(raw)) == repr(json.loads(raw))


def _at_depth(frames: int, work):
    return work() if frames == 0 else _at_depth(frames - 1, work)


@pytest.mark.parametrize("depth", [499, 899])
def test_a_body_nested_near_the_limit_reads_as_json_reads_it_deep_in_a_call_stack(depth):
    """json's nesting limit counts the frames its caller is under; orjson's does not."""
    raw = b"[" * depth + b"]" * depth

    def both() -> list[str]:
        outcome = []
        for read in (json.loads, request_json):
            try:
                outcome.append(type(read(raw)).__name__)  # (repr of it may recurse too deep)
            except RecursionError:
                outcome.append("RecursionError")
        return outcome
    outcome = _at_depth(200, both)
    assert outcome[0] == outcome[1], outcome
