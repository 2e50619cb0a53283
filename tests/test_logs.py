"""Log lines: JSON for journald, readable on a terminal, stdlib loggers routed through."""

from __future__ import annotations

import io
import json
import logging
import re
import sys

import pytest
import structlog

from berth.daemon.logs import setup_logging


@pytest.fixture(autouse=True)
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def capture(monkeypatch, stream: io.StringIO, log_format: str) -> str:
    monkeypatch.setattr(sys, "stdout", stream)
    structlog.reset_defaults()
    setup_logging(log_format)
    structlog.get_logger("berth.test").info("replica ready", endpoint="llm", replica="llm-1")
    logging.getLogger("docker.test").warning("from a library")
    for handler in logging.getLogger().handlers:
        handler.flush()
    return stream.getvalue()


def test_json_lines_when_not_a_terminal(monkeypatch):
    lines = capture(monkeypatch, io.StringIO(), "auto").splitlines()
    first, second = (json.loads(line) for line in lines)
    assert (first["event"], first["endpoint"], first["replica"]) == ("replica ready", "llm",
                                                                       "llm-1")
    assert first["level"] == "info" and first["timestamp"]
    assert second["event"] == "from a library" and second["level"] == "warning"


def test_readable_lines_on_a_terminal(monkeypatch):
    text = re.sub(r"\x1b\[[0-9;]*m", "", capture(monkeypatch, Tty(), "auto"))  # colours off
    assert "replica ready" in text and "endpoint=llm" in text and "replica=llm-1" in text
    try:
        json.loads(text.splitlines()[0])
        raise AssertionError("terminal output should not be JSON")
    except ValueError:
        pass
