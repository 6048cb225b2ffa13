"""The forward action against real receivers: how their answers and connections are read."""

from __future__ import annotations

from typing import Any

from tests.support import RunningGateway, ServerThread, gateway_config, svix_request, wait_until


class Chatty:
    """A receiver that answers 200 with a large body (length-delimited or chunked) and counts the
    connections its requests arrive on."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        self.requests.append((scope["path"], scope["client"]))
        big = b"x" * 300_000
        if scope["path"].endswith("/small"):
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        if scope["path"].endswith("/chunked"):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for start in range(0, len(big), 50_000):
                await send(
                    {"type": "http.response.body", "body": big[start : start + 50_000], "more_body": True}
                )
            await send({"type": "http.response.body", "body": b""})
            return
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"300000")]}
        )
        await send({"type": "http.response.body", "body": big})


def route(url: str) -> dict[str, Any]:
    return {
        "name": "users",
        "source": "consignease",
        "events": ["user.*"],
        "actions": [{"id": "app", "use": "forward", "with": {"url": url}}],
    }


def test_large_and_chunked_answers_are_delivered_and_the_next_request_still_goes_out(tmp_path) -> None:
    receiver = Chatty()
    with ServerThread(receiver) as server:
        base = f"http://127.0.0.1:{server.port}"
        config = gateway_config(
            tmp_path, routes=[route(f"{base}/big"), {**route(f"{base}/chunked"), "name": "c"}]
        )
        with RunningGateway(config) as gw:
            for n in range(3):
                body, headers = svix_request(msg_id=f"msg_big_{n}")
                assert gw.post("/webhooks/consignease", body, headers).status_code == 200
            wait_until(lambda: len(receiver.requests) == 6)
            wait_until(
                lambda: (
                    gw.metric("hookyard_deliveries_total", route="users", action="app", outcome="delivered")
                    == 3
                    and gw.metric("hookyard_deliveries_total", route="c", action="app", outcome="delivered")
                    == 3
                )
            )
            assert gw.metric("hookyard_deliveries_total", outcome="retried") == 0


def test_answers_are_read_so_one_keep_alive_connection_serves_event_after_event(tmp_path) -> None:
    receiver = Chatty()
    with ServerThread(receiver) as server:
        base = f"http://127.0.0.1:{server.port}"
        with RunningGateway(gateway_config(tmp_path, routes=[route(f"{base}/small")])) as gw:
            for n in range(3):
                body, headers = svix_request(msg_id=f"msg_small_{n}")
                assert gw.post("/webhooks/consignease", body, headers).status_code == 200
                wait_until(lambda n=n: len(receiver.requests) == n + 1)
    assert len({client for _path, client in receiver.requests}) == 1
