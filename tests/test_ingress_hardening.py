"""The front door: sender allowlists behind trusted proxies, log-only verification, slow bodies and load
shedding, against a real server."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest

from tests.support import RunningGateway, gateway_config, svix_request, wait_until


def with_source(tmp_path: Any, **source: Any) -> dict[str, Any]:
    config = gateway_config(tmp_path)
    config["sources"]["consignease"].update(source)
    return config


@pytest.mark.parametrize(
    ("allow_ips", "trusted", "forwarded_for", "status"),
    [
        (["10.0.0.0/8"], [], None, 403),  # the peer is 127.0.0.1
        (["loopback"], [], None, 200),  # a preset
        (["10.0.0.0/8"], [], "10.1.2.3", 403),  # X-Forwarded-For from an untrusted peer is ignored
        (["10.0.0.0/8"], ["127.0.0.1"], "10.1.2.3", 200),  # ... and believed from a trusted proxy
        (["10.0.0.0/8"], ["127.0.0.1"], "10.1.2.3, 6.6.6.6", 403),  # rightmost untrusted hop decides
        (["10.0.0.0/8"], ["127.0.0.1", "192.168.0.0/16"], "10.1.2.3, 192.168.1.1", 200),  # proxies skipped
        (["6.6.6.6"], ["127.0.0.1"], "10.1.2.3, 6.6.6.6", 200),  # a spoofed left hop is not believed
        (["10.0.0.0/8"], ["127.0.0.1"], "not-an-address", 403),
    ],
)
def test_allow_ips_behind_trusted_proxies(
    tmp_path: Any, allow_ips: list[str], trusted: list[str], forwarded_for: str | None, status: int
) -> None:
    config = with_source(tmp_path, allow_ips=allow_ips)
    config["listen"] = {"trusted_proxies": trusted}
    with RunningGateway(config) as gw:
        body, headers = svix_request()
        if forwarded_for is not None:
            headers["x-forwarded-for"] = forwarded_for
        response = gw.post("/webhooks/consignease", body, headers)
        assert response.status_code == status, response.text
        if status == 403:
            assert response.json()["error"] == "ip_denied"
            assert (
                gw.metric("hookyard_webhook_rejections_total", source="consignease", reason="ip_denied") == 1
            )


def test_rfc7239_forwarded_header(tmp_path: Any) -> None:
    config = with_source(tmp_path, allow_ips=["2001:db8::/32"])
    config["listen"] = {"trusted_proxies": ["loopback"]}
    with RunningGateway(config) as gw:
        body, headers = svix_request()
        headers["forwarded"] = 'for="[2001:db8::17]:4711";proto=https'
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200


def test_invalid_allowlist_is_a_config_error(tmp_path: Any) -> None:
    from gateway.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as error:
        parse_config("sources: {a: {path: /a, provider: svix, allow_ips: [10.0.0.0/33]}}")
    assert "sources.a.allow_ips" in str(error.value)


def test_log_only_accepts_and_marks_unverified(tmp_path: Any) -> None:
    with RunningGateway(with_source(tmp_path, verify="log-only")) as gw:
        body, headers = svix_request(msg_id="msg_unverified", secret="whsec_" + "A" * 43 + "=")
        response = gw.post("/webhooks/consignease", body, headers)
        assert response.json() == {"id": "msg_unverified", "status": "accepted"}
        detail = asyncio.run_coroutine_threadsafe(
            gw.gateway.storage.get_event("msg_unverified"), gw.loop
        ).result()
        assert detail[0].event.verified is False
        assert (
            gw.metric("hookyard_webhooks_unverified_total", source="consignease", reason="invalid_signature")
            == 1
        )
        # Malformed requests are still refused: there is no event to keep.
        assert gw.post("/webhooks/consignease", b"nope", headers).status_code == 400
        good_body, good_headers = svix_request(msg_id="msg_verified")
        gw.post("/webhooks/consignease", good_body, good_headers)
        detail = asyncio.run_coroutine_threadsafe(
            gw.gateway.storage.get_event("msg_verified"), gw.loop
        ).result()
        assert detail[0].event.verified is True


def slow_client(url: str, declared: int = 100) -> socket.socket:
    """A client that sends its headers and a few bytes of a body, then stalls."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(
        b"POST /webhooks/consignease HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {declared}\r\n\r\n".encode()
        + b'{"partial":'
    )
    return sock


def read_response(sock: socket.socket) -> bytes:
    """The whole response: headers and body may arrive in separate segments."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _content_length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_slow_body_is_cut_off_with_408(tmp_path: Any) -> None:
    config = gateway_config(tmp_path, limits={"read_timeout": "300ms"})
    with RunningGateway(config) as gw:
        started = time.monotonic()
        with slow_client(gw.url) as sock:
            answer = read_response(sock)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
        assert b"body_timeout" in answer
        assert 0.25 < time.monotonic() - started < 5


def test_overload_is_shed_with_503_and_health_stays_up(tmp_path: Any) -> None:
    config = gateway_config(tmp_path, limits={"max_concurrent_requests": 2, "read_timeout": "5s"})
    with RunningGateway(config) as gw:
        stalled = [slow_client(gw.url), slow_client(gw.url)]
        try:
            wait_until(lambda: gw.gateway.ingress.in_flight == 2)
            body, headers = svix_request()
            started = time.monotonic()
            response = gw.post("/webhooks/consignease", body, headers)
            assert response.status_code == 503
            assert response.json()["error"] == "overloaded"
            assert response.headers["retry-after"]
            assert time.monotonic() - started < 1
            assert gw.client.get(gw.ops_url + "/healthz").status_code == 200
        finally:
            for sock in stalled:
                sock.close()
        wait_until(lambda: gw.gateway.ingress.in_flight == 0)
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200
