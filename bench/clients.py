"""Part 5: the CPU of one forwarded request in each HTTP client the gateway has, against the same sink.

Each client runs alone in a process of its own (`python -m bench.clients CLIENT PORT`), sends the same
forward-like request (1 KB body, forward's headers) `--requests` times over `--concurrency` keep-alive
connections to the benchmark sink, and prints its own CPU per request and rate as JSON:

- httpx: httpx's API over aiohttp's pool (what notify and acknowledge use);
- aiohttp: aiohttp's own API over that pool (what forward used before its own client);
- hookyard: gateway.http_client, forward's client now.

The sink, the body and the headers are the same for all three, so the figures differ only by the client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

from bench.common import PYTHON, Json, Processes, Settings, body_1kb, die_with_parent, say, start_sink, table

CLIENTS = ("httpx", "aiohttp", "hookyard")
NAMES = {
    "httpx": "httpx API over aiohttp's pool (notify, acknowledge)",
    "aiohttp": "aiohttp API (forward before)",
    "hookyard": "gateway.http_client (forward now)",
}
HEADERS = {
    "content-type": "application/json",
    "idempotency-key": "msg_bench",
    "x-hookyard-event-id": "msg_bench",
    "x-hookyard-source": "consignease",
    "x-hookyard-type": "user.created",
    "x-hookyard-attempt": "1",
}
# Each client's whole run is bounded: a client that cannot finish in this time fails the part.
TIMEOUT_S = 120


async def _sender(
    client: str, url: str
) -> tuple[Callable[[], Awaitable[int]], Callable[[], Awaitable[None]]]:
    """(send one request and return its status, close) for the named client."""
    body = body_1kb()
    if client == "hookyard":
        from gateway.http_client import HttpClient, Target

        http = HttpClient(ssl_context=ssl.create_default_context(), user_agent="hookyard/bench")
        target = Target.parse(url)

        async def lean() -> int:
            return (await http.request("POST", target, HEADERS, body)).status

        return lean, http.aclose

    import aiohttp

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=64, keepalive_timeout=30), cookie_jar=aiohttp.DummyCookieJar()
    )
    if client == "aiohttp":
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)

        async def own_api() -> int:
            async with session.request(
                "POST", url, data=body, headers=HEADERS, allow_redirects=False, timeout=timeout
            ) as response:
                return response.status

        return own_api, session.close

    import httpx
    from httpx_aiohttp import AiohttpTransport

    api = httpx.AsyncClient(transport=AiohttpTransport(client=session), follow_redirects=False)

    async def over_httpx() -> int:
        return (await api.post(url, content=body, headers=HEADERS)).status_code

    async def close() -> None:
        await api.aclose()
        await session.close()

    return over_httpx, close


async def _measure(client: str, url: str, requests: int, concurrency: int) -> Json:
    send, close = await _sender(client, url)
    statuses: list[int] = []

    async def worker(count: int) -> None:
        for _ in range(count):
            statuses.append(await send())

    try:
        # Warm up: open every connection and let each client build its caches.
        await asyncio.gather(*(worker(50) for _ in range(concurrency)))
        statuses.clear()
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
        after, elapsed = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - started
    finally:
        await close()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "client": client,
        "requests": len(statuses),
        "non_200": sum(status != 200 for status in statuses),
        "rps": len(statuses) / elapsed,
        "cpu_us_per_request": cpu / len(statuses) * 1e6,
    }


def run(settings: Settings, processes: Processes) -> Json:
    sink = start_sink(processes, name="sink-clients")
    requests, concurrency = settings.client_requests, 32
    rows = []
    try:
        for client in CLIENTS:
            say(f"   {NAMES[client]} ...")
            argv = [PYTHON, "-m", "bench.clients", client, sink.url + "/hooks"]
            argv += ["--requests", str(requests), "--concurrency", str(concurrency)]
            done = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
                check=True,
                preexec_fn=die_with_parent,
            )
            row = json.loads(done.stdout)
            row["name"] = NAMES[client]
            rows.append(row)
            say(f"     {row['rps']:.0f} req/s, {row['cpu_us_per_request']:.1f} µs CPU/req")
    finally:
        if sink.process is not None:
            processes.stop(sink.process)
    say()
    say(render_table(rows))
    return {"requests": requests, "concurrency": concurrency, "rows": rows}


def render_table(rows: list[Json]) -> str:
    aiohttp = next((row for row in rows if row["client"] == "aiohttp"), None)
    return table(
        ["client", "req/s", "CPU µs/req", "x aiohttp"],
        [
            [
                row["name"],
                f"{row['rps']:.0f}",
                f"{row['cpu_us_per_request']:.1f}",
                f"{row['cpu_us_per_request'] / aiohttp['cpu_us_per_request']:.2f}" if aiohttp else "",
            ]
            for row in rows
        ],
        "lrrr",
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.clients")
    parser.add_argument("client", choices=CLIENTS)
    parser.add_argument("url")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    try:
        import uvloop

        runner: Callable[..., Json] = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(_measure(args.client, args.url, args.requests, args.concurrency))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
