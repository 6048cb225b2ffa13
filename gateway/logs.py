"""Structured logs: one JSON object per line, with the event id and source as fields."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from contextvars import ContextVar
from typing import Any

from pythonjsonlogger.json import JsonFormatter


class Throttle:
    """At most one line of each kind per `interval` seconds, for lines that anyone who can reach the webhook
    listener causes (a refused webhook, a request that is not HTTP): without a secret, they would otherwise
    write the log as fast as they can send, and push out what an operator needs from it. The metrics count
    every one."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        # Per kind: when its line was last written, and how many were not since.
        self._kinds: dict[tuple[str, ...], tuple[float, int]] = {}

    def admit(self, *kind: str) -> int | None:
        """None when a line of `kind` is not to be written now; otherwise how many were not since the last
        one that was (its `suppressed` field)."""
        now = time.monotonic()
        written, suppressed = self._kinds.get(kind, (-math.inf, 0))
        if now - written < self.interval:
            self._kinds[kind] = (written, suppressed + 1)
            return None
        self._kinds[kind] = (now, 0)
        return suppressed


class _DropColorMessage(logging.Filter):
    """uvicorn attaches an ANSI-coloured copy of each message; it has no place in JSON logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("color_message", None)
        return True


# The listener whose uvicorn server runs in this task. `hookyard serve` runs two in one process, and
# uvicorn's own lines ("Started server process [PID]", "Shutting down", "Waiting for connections to
# close") would otherwise come twice without saying which listener each is about.
serving_listener: ContextVar[str | None] = ContextVar("serving_listener", default=None)


class _NameTheListener(logging.Filter):
    """Gives uvicorn's lines a `listener` field: `webhook` or `ops`."""

    def filter(self, record: logging.LogRecord) -> bool:
        listener = serving_listener.get()
        if listener is not None:
            record.listener = listener
        return True


_NAME_THE_LISTENER = _NameTheListener()


# What every LogRecord has: anything else on a record is a field given with `extra=`.
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message`, then the record's fields as `name=value`: without them, `delivery dead`
    would not say which event nor why, and a refused reload not what was wrong."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [
            f"{name}={_text_value(value)}"
            for name, value in record.__dict__.items()
            if name not in _RECORD_ATTRIBUTES
        ]
        if not fields:
            return line
        # Before a traceback, which super() appended on lines of its own.
        first, newline, rest = line.partition("\n")
        return f"{first} {' '.join(fields)}{newline}{rest}"


def _text_value(value: Any) -> str:
    if isinstance(value, str) and value and not any(char.isspace() or char in '"=' for char in value):
        return value
    # Quoted (and a list or a number as JSON), so that a value with spaces or a line break stays one field.
    return json.dumps(value, ensure_ascii=False, default=str)


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(TextFormatter())
    handler.addFilter(_DropColorMessage())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's access log would write a line per webhook; Hookyard's own metrics and logs cover it.
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("uvicorn.error").addFilter(_NAME_THE_LISTENER)  # added once, however often called
    # httpx logs every request's full URL at INFO; a chat webhook's URL is a secret.
    logging.getLogger("httpx").setLevel(logging.WARNING)
