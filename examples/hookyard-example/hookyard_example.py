"""An example Hookyard plugin: one provider and one action, registered through the `hookyard` entry point."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Mapping
from pathlib import Path

import orjson
from pydantic import BaseModel, ConfigDict

from gateway import Action, Job, Outcome, Provider, delivered, hookimpl, retry, unauthorized


class AcmeProvider(Provider):
    """`X-Acme-Signature: t=<unix seconds>,sha512=<hex HMAC-SHA512 of "{t}.{body}">`."""

    name = "acme"
    description = "Acme: X-Acme-Signature t=...,sha512=... over {t}.{body}"

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        fields = dict(
            part.strip().partition("=")[::2] for part in headers.get("x-acme-signature", "").split(",")
        )
        timestamp, offered = fields.get("t", ""), fields.get("sha512", "")
        if not timestamp or not offered:
            raise unauthorized("missing_signature", "missing X-Acme-Signature t=...,sha512=...")
        if not (timestamp.isascii() and timestamp.isdigit()):  # "²" is a digit to isdigit(), not to int()
            raise unauthorized("invalid_timestamp")
        if abs(now - int(timestamp)) > self.tolerance:
            raise unauthorized("timestamp_out_of_tolerance")
        signed = timestamp.encode() + b"." + body
        expected = [hmac.new(s.encode(), signed, hashlib.sha512).hexdigest() for s in self.secrets]
        # compare_digest on every secret: the time taken does not say which one matched.
        if not any([hmac.compare_digest(e, offered.lower()) for e in expected]):
            raise unauthorized("invalid_signature", "no signature matches")

    def sign(self, body: bytes, event_id: str, now: float) -> dict[str, str]:
        timestamp = str(int(now))
        mac = hmac.new(self.secrets[0].encode(), timestamp.encode() + b"." + body, hashlib.sha512)
        return {"X-Acme-Signature": f"t={timestamp},sha512={mac.hexdigest()}"}


class JsonlOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: Path


class JsonlAction(Action):
    """Appends each event to a file as one JSON line."""

    name = "jsonl"
    description = "append events to a JSON-lines file"
    Options = JsonlOptions
    options: JsonlOptions

    async def deliver(self, job: Job) -> Outcome:
        event = job.event
        line = orjson.dumps(
            {"id": event.id, "source": event.source, "type": event.type, "payload": event.payload}
        )
        try:
            await asyncio.to_thread(self._append, line + b"\n")
        except OSError as exc:
            return retry(f"cannot write {self.options.path}: {exc.strerror}")
        return delivered()

    def _append(self, line: bytes) -> None:
        self.options.path.parent.mkdir(parents=True, exist_ok=True)
        with self.options.path.open("ab") as file:
            file.write(line)


@hookimpl
def register_providers() -> list[type[Provider]]:
    return [AcmeProvider]


@hookimpl
def register_actions() -> list[type[Action]]:
    return [JsonlAction]
