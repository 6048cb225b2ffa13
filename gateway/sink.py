"""`hookyard sink`: a tiny receiver that prints every request it gets, for tours and debugging."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import orjson

from gateway.events import exact_payload, holds_lost_digits


class Sink:
    """An ASGI app answering every request with `status` (or the status given for its path prefix),
    printing one JSON line per request."""

    def __init__(self, status: int = 200, out: Any = None, answers: dict[str, int] | None = None) -> None:
        self.status = status
        self.out = out or sys.stdout
        # Path prefix -> status, longest prefix first: make one route fail while others succeed.
        self.answers = sorted((answers or {}).items(), key=lambda item: -len(item[0]))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            shown: Any = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            shown = body.decode("utf-8", "replace")
        exact = exact_payload(body) if holds_lost_digits(shown) else None
        line = {
            "time": round(time.time(), 3),
            "method": scope["method"],
            "path": scope["path"],
            "headers": {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
            "body": shown,
        }
        if scope.get("query_string"):
            # A forward URL may carry one (`/hooks?tenant=a`): the request is not what was sent without it.
            line = {**line, "query": scope["query_string"].decode("latin-1")}
        try:
            if exact is not None:
                # An integer past 64 bits, which orjson reads as a float and cannot write: every digit.
                printed = json.dumps(
                    {**line, "body": exact}, ensure_ascii=False, separators=(",", ":")
                ).encode()
            else:
                printed = orjson.dumps(line)
        except (orjson.JSONEncodeError, RecursionError):
            # Nested past the 254 levels orjson writes (or the ones Python's json does): the body as it came.
            printed = orjson.dumps({**line, "body": body.decode("utf-8", "replace")})
        self.out.write(printed.decode() + "\n")
        self.out.flush()
        status = next(
            (code for prefix, code in self.answers if scope["path"].startswith(prefix)), self.status
        )
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})
