"""Structured logs: one JSON object per line, with the event id and source as fields."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter


class _DropColorMessage(logging.Filter):
    """uvicorn attaches an ANSI-coloured copy of each message; it has no place in JSON logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("color_message", None)
        return True


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
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_DropColorMessage())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's access log would write a line per webhook; Hookyard's own metrics and logs cover it.
    logging.getLogger("uvicorn.access").disabled = True
    # httpx logs every request's full URL at INFO; a chat webhook's URL is a secret.
    logging.getLogger("httpx").setLevel(logging.WARNING)
