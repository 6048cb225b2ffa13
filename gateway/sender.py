"""`hookyard send`: a realistic, correctly signed test event for a configured source."""

from __future__ import annotations

import asyncio
import reprlib
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson

from gateway.config import Listener
from gateway.plugins import PluginError
from gateway.providers import Provider
from gateway.routing import Endpoint, RouteTable

# Sample `data` per event type, so that a bare `hookyard send SOURCE --type T` looks like the real thing.
SAMPLE_DATA: dict[str, Any] = {
    "user.created": {
        "id": "user_29w83sxmDNGwOuEthce5gg56FcC",
        "object": "user",
        "first_name": "Ada",
        "last_name": "Lovelace",
        "email_addresses": [{"email_address": "ada@example.com", "id": "idn_29w83yL7CwVlJXylYLxcslromF1"}],
        "created_at": 1654012591514,
    },
    "consignment.created": {
        "consignmentId": "550e8400-e29b-41d4-a716-446655440000",
        "consignmentNumber": "CN-000123",
        "status": 1,
        "carrier": "Example Freight",
        "reference": "ORDER-1001",
    },
}
# Every consignment event names its consignment (data.consignmentId), which `acknowledge` reports on: a sample
# of another consignment type without it would be skipped there, as no event Consignly sends is.
SAMPLE_DATA["consignment.*"] = SAMPLE_DATA["consignment.created"]


def sample_data(canonical: str) -> Any:
    """The sample `data` of a type: its own, or its resource's (`consignment.*`), or a bare object id."""
    resource = canonical.partition(".")[0]
    sample = SAMPLE_DATA.get(canonical) or SAMPLE_DATA.get(f"{resource}.*")
    return sample if sample is not None else {"id": f"obj_{uuid.uuid4().hex[:12]}"}


def find_endpoint(table: RouteTable, source: str) -> Endpoint:
    for endpoint in table.endpoints.values():
        if endpoint.name == source:
            return endpoint
    known = ", ".join(sorted(e.name for e in table.endpoints.values()))
    raise KeyError(f"unknown source {source!r}; known: {known}")


def build_request(
    table: RouteTable, source: str, event_type: str, data: Any = None, event_id: str | None = None
) -> tuple[str, bytes, dict[str, str]]:
    """(path, body, headers) of a webhook signed as the source's provider signs it."""
    endpoint = find_endpoint(table, source)
    provider = endpoint.provider
    now = time.time()
    event_id = event_id or f"msg_{uuid.uuid4().hex}"
    canonical = provider.event_type(event_type)
    if data is None:
        data = sample_data(canonical)
    orjson.dumps(data)  # what --data holds that cannot be written (an integer past 64 bits) is its own error
    payload = _provider_call(provider, "sample_payload", event_type, event_id, data, now)
    try:
        body = orjson.dumps(payload)
    except orjson.JSONEncodeError as exc:
        raise PluginError(
            f"the {provider.name} provider's sample_payload cannot be written as JSON: {exc}"
        ) from exc
    signed = _provider_call(provider, "sign", body, event_id, now)
    if not isinstance(signed, Mapping):
        shown = f"{reprlib.repr(signed)} (a {type(signed).__name__})"
        raise PluginError(f"the {provider.name} provider's sign returned {shown}, not headers")
    headers = {"content-type": "application/json", **signed}
    return endpoint.path, body, headers


def _provider_call(provider: Provider, method: str, *args: Any) -> Any:
    """A provider's sample_payload or sign, whose failure is the plugin's: named as such, not taken for an
    error of the operator's --data or SOURCE. A ValueError is a provider's refusal to sign (a source with only
    public keys), and passes."""
    try:
        return getattr(provider, method)(*args)
    except ValueError:
        raise
    except Exception as exc:
        raise PluginError(
            f"the {provider.name} provider's {method} raised {type(exc).__name__}: {exc}"
        ) from exc


def listen_url(table: RouteTable) -> str:
    listen = table.config.listen
    return listener_url(listen, "https" if listen.tls is not None else "http")


def listener_url(listener: Listener, scheme: str = "http") -> str:
    """Where this host reaches a listener of the config: one bound to every address, on loopback."""
    host = "127.0.0.1" if listener.host in ("0.0.0.0", "::", "") else listener.host
    if ":" in host:  # an IPv6 address goes in brackets in a URL
        host = f"[{host}]"
    return f"{scheme}://{host}:{listener.port}"


def source_url(base: str, path: str) -> str:
    """Where a source's webhooks go through `base` (--url): its path after the base's own path, and the
    base's query after both, where appending would have put the path inside the query."""
    try:
        parts = urlsplit(base)
    except ValueError:  # unreadable (`http://[::1`)
        parts = None
    if parts is None or "@" in parts.fragment:
        # Left whole, for the URL check to refuse it without showing a password: unreadable, or with an
        # unencoded '#' in its password, after which the '@' that tells of one is no fragment to drop.
        return base.rstrip("/") + path
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + path, fragment=""))


def unproxied_if_loopback(url: str) -> dict[str, None]:
    """httpx `mounts` for the CLI's clients (`send`, `--admin-url`) that keep a request to a loopback
    gateway off a proxy of the environment ($HTTP_PROXY, $ALL_PROXY): the proxy's loopback is not this
    host's, so the gateway can never be reached through it (a proxy answering for it would be taken for
    it), and it would see the request, the admin token included. Other hosts go through it as usual."""
    from gateway.config import is_loopback

    try:
        host = httpx.URL(url).host
    except httpx.InvalidURL:
        return {}
    if not host or not is_loopback(host):
        return {}
    return {f"all://{f'[{host}]' if ':' in host else host}": None}


def wire_headers(headers: dict[str, str]) -> dict[bytes, bytes]:
    """Header values in UTF-8, as the gateway reads an id or a type from a header: httpx would encode them
    as ASCII, and refuse an id that is not."""
    return {name.encode(): value.encode() for name, value in headers.items()}


# How long `hookyard send` waits for the gateway's answer, which comes once the event is on disk.
SEND_TIMEOUT = 10.0


def send(url: str, body: bytes, headers: dict[str, str], timeout: float | None = None) -> httpx.Response:
    timeout = SEND_TIMEOUT if timeout is None else timeout
    with httpx.Client(timeout=timeout, mounts=unproxied_if_loopback(url)) as client:
        return client.post(url, content=body, headers=wire_headers(headers))


@dataclass
class LoadSummary:
    """What `hookyard send --count N` saw."""

    statuses: Counter[str]
    latencies: list[float]
    seconds: float

    @property
    def all_succeeded(self) -> bool:
        return all(status.startswith("2") for status in self.statuses)

    def describe(self) -> str:
        total = sum(self.statuses.values())
        ordered = sorted(self.latencies)

        def percentile(fraction: float) -> float:
            return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000 if ordered else 0.0

        statuses = ", ".join(f"{status}: {count}" for status, count in sorted(self.statuses.items()))
        return (
            f"sent {total} in {self.seconds:.2f}s ({total / self.seconds:.0f}/s); {statuses}; "
            f"latency p50 {percentile(0.5):.1f} ms, p99 {percentile(0.99):.1f} ms"
        )


async def send_many(
    url: str,
    requests: list[tuple[bytes, dict[str, str]]],
    concurrency: int,
    statuses: Counter[str] | None = None,
) -> LoadSummary:
    """Send every request, at most `concurrency` at a time: a quick, bounded load. Each answer's status (or
    error) is counted in `statuses` as it comes: what a Ctrl-C says was done."""
    statuses = Counter() if statuses is None else statuses
    latencies: list[float] = []
    queue = list(reversed(requests))
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=30, mounts=unproxied_if_loopback(url)) as client:

        async def worker() -> None:
            while queue:
                body, headers = queue.pop()
                sent = time.perf_counter()
                try:
                    response = await client.post(url, content=body, headers=wire_headers(headers))
                    statuses[str(response.status_code)] += 1
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    return LoadSummary(statuses, latencies, time.perf_counter() - started)
