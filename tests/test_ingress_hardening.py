"""The front door: sender allowlists behind trusted proxies, log-only verification, slow bodies and load
shedding, against a real server."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import json
import logging
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway import protocol
from gateway.addresses import PRESETS, ForwardedHeader, client_address, parse_address, parse_networks
from gateway.protocol import LINGERING_AT_MOST
from tests.support import (
    GatewayProcess,
    RunningGateway,
    free_port,
    gateway_config,
    metric_value,
    open_files,
    self_signed,
    svix_request,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent


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


def test_a_clients_own_forwarded_header_is_not_believed(tmp_path: Any) -> None:
    """nginx and ALB append to X-Forwarded-For and pass a client's `Forwarded` through untouched: by default
    only X-Forwarded-For is read, so a client cannot name its own address with `Forwarded`."""
    config = with_source(tmp_path, allow_ips=["10.0.0.0/8"])
    config["listen"] = {"trusted_proxies": ["127.0.0.1"]}
    with RunningGateway(config) as gw:
        for spoof in (
            {"forwarded": "for=10.1.2.3", "x-forwarded-for": "6.6.6.6"},  # the proxy appended 6.6.6.6
            {"forwarded": "for=10.1.2.3"},  # no X-Forwarded-For: the peer itself is the client
        ):
            body, headers = svix_request()
            response = gw.post("/webhooks/consignease", body, {**headers, **spoof})
            assert (response.status_code, response.json()["error"]) == (403, "ip_denied"), spoof
        body, headers = svix_request()
        headers.update({"forwarded": "for=6.6.6.6", "x-forwarded-for": "10.1.2.3"})
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200


def test_forwarded_header_setting_reads_rfc7239_forwarded_only(tmp_path: Any) -> None:
    config = with_source(tmp_path, allow_ips=["2001:db8::/32"])
    config["listen"] = {"trusted_proxies": ["loopback"], "forwarded_header": "forwarded"}
    with RunningGateway(config) as gw:
        body, headers = svix_request()
        headers["forwarded"] = 'for="[2001:db8::17]:4711";proto=https'
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        # ... and then X-Forwarded-For is the client's own.
        body, headers = svix_request()
        headers.update({"x-forwarded-for": "2001:db8::17", "forwarded": "for=198.51.100.7"})
        assert gw.post("/webhooks/consignease", body, headers).status_code == 403


LOOPBACK = parse_networks(["loopback"])


@pytest.mark.parametrize(
    ("peer", "headers", "header", "client"),
    [
        # The audit's case: a client-written Forwarded next to the X-Forwarded-For the proxy appended to.
        (
            "127.0.0.1",
            {"forwarded": "for=10.1.2.3", "x-forwarded-for": "6.6.6.6"},
            "x-forwarded-for",
            "6.6.6.6",
        ),
        ("127.0.0.1", {"forwarded": "for=10.1.2.3"}, "x-forwarded-for", "127.0.0.1"),
        ("127.0.0.1", {"forwarded": "for=10.1.2.3", "x-forwarded-for": "6.6.6.6"}, "forwarded", "10.1.2.3"),
        ("127.0.0.1", {"x-forwarded-for": "6.6.6.6"}, "forwarded", "127.0.0.1"),
        (
            "127.0.0.1",
            {"forwarded": 'for=1.1.1.1, for="[2001:db8::1]:80";proto=https'},
            "forwarded",
            "2001:db8::1",
        ),
        ("127.0.0.1", {"forwarded": "for=1.1.1.1, for=127.0.0.2"}, "forwarded", "1.1.1.1"),  # proxies skipped
        ("127.0.0.1", {"x-forwarded-for": "1.1.1.1, 6.6.6.6, 127.0.0.9"}, "x-forwarded-for", "6.6.6.6"),
        ("127.0.0.1", {"x-forwarded-for": "1.1.1.1, bogus"}, "x-forwarded-for", "127.0.0.1"),
        ("10.9.9.9", {"x-forwarded-for": "1.1.1.1"}, "x-forwarded-for", "10.9.9.9"),  # peer not trusted
        # A dual-stack socket reports IPv4 peers as IPv4-mapped IPv6: still a trusted proxy.
        ("::ffff:127.0.0.1", {"x-forwarded-for": "6.6.6.6"}, "x-forwarded-for", "6.6.6.6"),
        ("::ffff:127.0.0.1", {"x-forwarded-for": "::ffff:10.1.2.3"}, "x-forwarded-for", "10.1.2.3"),
    ],
)
def test_client_address_walks_only_the_configured_header(
    peer: str, headers: dict[str, str], header: ForwardedHeader, client: str
) -> None:
    assert client_address(peer, headers, LOOPBACK, header) == ipaddress.ip_address(client)


def test_ipv4_mapped_ipv6_addresses_match_ipv4_entries_and_presets() -> None:
    mapped = parse_address("::ffff:127.0.0.1")
    assert mapped == ipaddress.IPv4Address("127.0.0.1")
    assert parse_address("[::ffff:10.1.2.3]:4711") == ipaddress.IPv4Address("10.1.2.3")
    assert parse_address("::1") == ipaddress.IPv6Address("::1")  # other IPv6 stays IPv6
    for entries, address, inside in [
        (["loopback"], "::ffff:127.0.0.1", True),
        (["10.0.0.0/8"], "::ffff:10.1.2.3", True),
        (["10.1.2.3"], "::ffff:10.1.2.3", True),
        (["svix"], "::ffff:44.228.126.217", True),
        (["10.0.0.0/8"], "::ffff:11.1.2.3", False),
    ]:
        found = parse_address(address)
        assert found is not None
        assert any(found in network for network in parse_networks(entries)) is inside, (entries, address)


def post_from(gw: RunningGateway, peer: str, path: str = "/webhooks/consignease") -> httpx.Response:
    """A request through the real ingress, as if its TCP peer were `peer` (the loopback socket cannot be)."""

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=gw.gateway.ingress, client=(peer, 4711))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            body, headers = svix_request()
            return await client.post(path, content=body, headers=headers)

    return asyncio.run_coroutine_threadsafe(post(), gw.loop).result(10)


def test_ipv4_mapped_peer_matches_an_ipv4_allowlist(tmp_path: Any) -> None:
    with RunningGateway(with_source(tmp_path, allow_ips=["10.0.0.0/8"])) as gw:
        assert post_from(gw, "::ffff:10.1.2.3").status_code == 200
        assert post_from(gw, "::ffff:11.1.2.3").status_code == 403


ALLOWLISTS = {
    "svix": ["svix"],
    "svix-eu": ["svix-eu"],
    "by-hand": ["52.215.16.239"],  # overriding the preset: the networks listed by hand
    "svix-and-more": ["svix", "203.0.113.0/24"],  # a preset and an address Svix added since
}


@pytest.fixture(scope="module")
def allowlisted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    config = gateway_config(tmp_path_factory.mktemp("allowlists"))
    template = config["sources"]["consignease"]
    for name, allow_ips in ALLOWLISTS.items():
        config["sources"][name] = {**template, "path": f"/webhooks/{name}", "allow_ips": allow_ips}
    with RunningGateway(config) as gw:
        yield gw


SVIX_US, SVIX_EU_V6 = "44.228.126.217", "2a05:d028:17:8000::1"


@pytest.mark.parametrize(
    ("source", "peer", "status"),
    [
        ("svix", SVIX_US, 200),
        ("svix", SVIX_EU_V6, 200),
        ("svix", "13.126.41.108", 200),  # India, a private region
        ("svix", "::ffff:44.228.126.217", 200),
        ("svix", "44.228.126.218", 403),  # the neighbour of a Svix address
        ("svix", "127.0.0.1", 403),
        ("svix", "2a05:d028:17:8100::1", 403),  # just outside the EU /56
        ("svix-eu", SVIX_US, 403),  # one region only
        ("svix-eu", SVIX_EU_V6, 200),
        ("by-hand", "52.215.16.239", 200),
        ("by-hand", SVIX_US, 403),
        ("svix-and-more", "203.0.113.9", 200),
        ("svix-and-more", SVIX_US, 200),
    ],
)
def test_svix_preset(allowlisted: RunningGateway, source: str, peer: str, status: int) -> None:
    response = post_from(allowlisted, peer, f"/webhooks/{source}")
    assert response.status_code == status, response.text
    if status == 403:
        assert response.json()["error"] == "ip_denied"


def test_svix_preset_is_every_region_of_the_published_list() -> None:
    # https://docs.svix.com/receiving/source-ips: US, EU, and the private regions AU, CA and IN.
    regions = ("us", "eu", "au", "ca", "in")
    assert set(PRESETS["svix"]) == {network for region in regions for network in PRESETS[f"svix-{region}"]}
    assert len(PRESETS["svix"]) == 20
    assert "2600:1f24:64:8000::/56" in PRESETS["svix-us"]


def test_forwarded_header_setting() -> None:
    from gateway.config import ConfigError, parse_config

    assert parse_config("sources: {}").listen.forwarded_header == "x-forwarded-for"
    assert parse_config("listen: {forwarded_header: forwarded}").listen.forwarded_header == "forwarded"
    with pytest.raises(ConfigError) as error:
        parse_config("listen: {forwarded_header: x-real-ip}")
    assert "listen.forwarded_header" in str(error.value)


def test_invalid_allowlist_is_a_config_error(tmp_path: Any) -> None:
    from gateway.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as error:
        parse_config("sources: {a: {path: /a, provider: svix, allow_ips: [10.0.0.0/33]}}")
    assert "sources.a.allow_ips" in str(error.value)


def test_every_bad_network_of_a_list_is_named_by_its_index() -> None:
    from gateway.config import ConfigError, parse_config

    # Only the first bad entry was reported, without its place; the next one a round of `check` later, and a
    # number in the list hid them all.
    text = (
        "listen: {trusted_proxies: [10.0.0.1, nope, 7]}\n"
        "sources: {a: {path: /a, provider: svix, allow_ips: [10.0.0.0/33, svix, 1.2.3.4, svix-mars]}}"
    )
    with pytest.raises(ConfigError) as error:
        parse_config(text)
    presets = ", ".join(sorted(PRESETS))
    assert error.value.errors == [
        f"listen.trusted_proxies[1]: 'nope' is neither an address, a CIDR nor a preset ({presets})",
        "listen.trusted_proxies[2]: a number, not text: quote it",
        f"sources.a.allow_ips[0]: '10.0.0.0/33' is neither an address, a CIDR nor a preset ({presets})",
        f"sources.a.allow_ips[3]: 'svix-mars' is neither an address, a CIDR nor a preset ({presets})",
    ]


def test_log_only_accepts_and_marks_unverified(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="hookyard.ingress")
    with RunningGateway(with_source(tmp_path, verify="log-only")) as gw:
        body, headers = svix_request(msg_id="msg_unverified", secret="whsec_" + "A" * 43 + "=")
        response = gw.post("/webhooks/consignease", body, headers)
        assert response.json() == {"id": "msg_unverified", "status": "accepted"}
        detail = asyncio.run_coroutine_threadsafe(
            gw.gateway.storage.get_event("msg_unverified"), gw.loop
        ).result()
        assert detail[0].event.verified is False
        # Anyone can send more of them: every one is kept and counted, and the log says so once a minute.
        for number in range(2):
            body, headers = svix_request(msg_id=f"msg_unverified_{number}", secret="whsec_" + "A" * 43 + "=")
            assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        assert (
            gw.metric("hookyard_webhooks_unverified_total", source="consignease", reason="invalid_signature")
            == 3
        )
        [logged] = [
            record
            for record in caplog.records
            if record.getMessage() == "accepting unverified webhook (verify: log-only)"
        ]
        assert logged.levelno == logging.WARNING
        assert (logged.__dict__["source"], logged.__dict__["reason"]) == ("consignease", "invalid_signature")
        assert logged.__dict__["suppressed"] == 0
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
    config = gateway_config(tmp_path, limits={"max_concurrent_requests": 2, "read_timeout": "30s"})
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
            # At once, not queued for a slot until a stalled request's 30 s read timeout ends it.
            assert time.monotonic() - started < 5
            assert gw.client.get(gw.ops_url + "/healthz").status_code == 200
        finally:
            for sock in stalled:
                sock.close()
        wait_until(lambda: gw.gateway.ingress.in_flight == 0)
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200


def test_a_connection_past_listen_max_connections_is_refused_503_and_closed(tmp_path: Any) -> None:
    config = gateway_config(tmp_path, listen={"max_connections": 2}, reload={"watch": False})
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(config))
    with RunningGateway(path) as gw:
        host, port = gw.url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(2)]
        try:
            wait_until(lambda: gw.metric("hookyard_webhook_connections") == 2)
            assert gw.metric("hookyard_webhook_max_connections") == 2
            # A third is answered at once, before it sends anything, and closed.
            with socket.create_connection((host, int(port)), timeout=5) as third:
                answer = read_response(third)
                assert third.recv(1) == b""
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503 ")
            assert b"\r\nretry-after: 5\r\n" in head and b"\r\nconnection: close\r\n" in head
            assert json.loads(body)["error"] == "too_many_connections"
            # A sender's client sees the same answer to its webhook.
            with httpx.Client(timeout=5) as sender:
                body, headers = svix_request(msg_id="msg_refused")
                refused = sender.post(gw.url + "/webhooks/consignease", content=body, headers=headers)
            assert (refused.status_code, refused.json()["error"]) == (503, "too_many_connections")
            assert refused.headers["retry-after"] == "5"
            assert (
                gw.metric("hookyard_webhook_rejections_total", source="", reason="too_many_connections") == 2
            )
            # The ops listener is not the webhook listener's: it still answers.
            assert gw.client.get(gw.ops_url + "/healthz").status_code == 200
            assert gw.client.get(gw.ops_url + "/readyz").status_code == 200
            assert gw.metric("hookyard_webhook_connections") == 2  # the refused ones hold no slot
        finally:
            idle.pop().close()
        # A connection that closes frees its slot.
        wait_until(lambda: gw.metric("hookyard_webhook_connections") == 1)
        body, headers = svix_request(msg_id="msg_after_a_slot_freed")
        accepted = gw.post("/webhooks/consignease", body, headers)
        assert (accepted.status_code, accepted.json()["status"]) == (200, "accepted")
        # Full again (the client keeps its connection open); a reload raising the limit applies at once.
        assert gw.metric("hookyard_webhook_connections") == 2
        path.write_text(yaml.safe_dump({**config, "listen": {"max_connections": 3}}))
        assert asyncio.run_coroutine_threadsafe(gw.gateway.reload(), gw.loop).result(10)
        with httpx.Client(timeout=5) as sender:
            body, headers = svix_request(msg_id="msg_after_reload")
            assert (
                sender.post(gw.url + "/webhooks/consignease", content=body, headers=headers).status_code
                == 200
            )
        for sock in idle:
            sock.close()


def test_clients_past_listen_max_connections_that_sent_their_request_read_the_503(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Closed with the request unread, the connection was reset (RST) and the client lost the 503: nearly
    # every one of these clients read ECONNRESET instead.
    config = gateway_config(tmp_path, listen={"max_connections": 2})
    with RunningGateway(config) as gw:
        address = ("127.0.0.1", int(gw.url.rsplit(":", 1)[1]))
        idle = [socket.create_connection(address, timeout=5) for _ in range(2)]
        refused: list[socket.socket] = []
        try:
            wait_until(lambda: gw.metric("hookyard_webhook_connections") == 2)
            files = open_files()
            body, headers = svix_request(msg_id="msg_refused")
            small = raw_request("/webhooks/consignease", body, headers)
            # One past the socket buffers: its sender has to be read to finish sending.
            large = raw_request("/webhooks/consignease", body + b" " * 4_000_000, headers)

            def send_then_read(request: bytes) -> bytes:
                with socket.create_connection(address, timeout=10) as sock:
                    sock.sendall(request)
                    return read_response(sock)

            with ThreadPoolExecutor(max_workers=50) as pool:
                answers = list(pool.map(send_then_read, [small] * 190 + [large] * 10))
            for answer in answers:
                assert answer.startswith(b"HTTP/1.1 503 "), answer[:100]
                assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "too_many_connections"
            wait_until(lambda: open_files() == files)  # the refused connections closed as their clients did
            # A client that never closes holds its refused connection for a second at most.
            refused = [socket.create_connection(address, timeout=5) for _ in range(10)]
            assert all(read_response(sock).startswith(b"HTTP/1.1 503 ") for sock in refused)
            # Only the clients' sockets: the gateway's closed after the second, or they would stay for good.
            wait_until(lambda: open_files() - files == len(refused))
            # And at most LINGERING_AT_MOST of them at once (their file descriptors are in FILES_RESERVED),
            # however long they would linger: past that, the oldest is closed.
            monkeypatch.setattr(protocol, "_LINGER", 60.0)
            refused += [socket.create_connection(address, timeout=5) for _ in range(100)]
            assert all(read_response(sock).startswith(b"HTTP/1.1 503 ") for sock in refused[10:])
            wait_until(lambda: open_files() - files == len(refused) + LINGERING_AT_MOST)
            assert gw.metric("hookyard_webhook_connections") == 2
        finally:
            for sock in idle + refused:
                sock.close()


def test_connections_lingering_after_their_answer_are_closed_as_the_gateway_stops(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The event loop ends with the gateway: a connection still lingering then was never closed, its
    # descriptor held until the garbage collector found it (with a ResourceWarning).
    monkeypatch.setattr(protocol, "_LINGER", 60.0)
    config = gateway_config(tmp_path, listen={"max_connections": 1})
    gc.collect()
    files = open_files()
    clients: list[socket.socket] = []
    try:
        with RunningGateway(config) as gw:
            address = ("127.0.0.1", int(gw.url.rsplit(":", 1)[1]))
            clients.append(socket.create_connection(address, timeout=5))
            wait_until(lambda: gw.metric("hookyard_webhook_connections") == 1)
            serving = open_files()
            clients += [socket.create_connection(address, timeout=5) for _ in range(3)]
            assert all(read_response(sock).startswith(b"HTTP/1.1 503 ") for sock in clients[1:])
            assert open_files() - serving == 3 + 3  # the clients' sockets, and the gateway's, lingering
        assert open_files() - files == len(clients)  # only the clients' sockets are left
    finally:
        for sock in clients:
            sock.close()


def test_https_connections_lingering_after_their_answer_are_closed_as_the_gateway_stops(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Closing a TLS connection waits for the client's close_notify (a second at most): those still
    # lingering as the listener stopped were left waiting for it, open past the event loop's end.
    monkeypatch.setattr(protocol, "_LINGER", 60.0)
    cert, key = self_signed(tmp_path, "listener")
    config = gateway_config(tmp_path, listen={"tls": {"cert": str(cert), "key": str(key)}})
    verify = ssl.create_default_context(cafile=cert)
    gc.collect()
    files = open_files()
    clients: list[ssl.SSLSocket] = []
    try:
        with RunningGateway(config, scheme="https") as gw:
            address = ("127.0.0.1", int(gw.url.rsplit(":", 1)[1]))
            for number in range(3):
                client = verify.wrap_socket(
                    socket.create_connection(address, timeout=5), server_hostname="127.0.0.1"
                )
                clients.append(client)
                body, headers = svix_request(msg_id=f"msg_lingering_{number}")
                client.sendall(raw_request("/webhooks/consignease", body, {**headers, "connection": "close"}))
                assert read_response(client).startswith(b"HTTP/1.1 200 ")
            wait_until(lambda: gw.metric("hookyard_webhook_connections") == 0)
        assert open_files() - files == len(clients)  # only the clients' sockets are left
    finally:
        for client in clients:
            client.close()


def raw_request(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nhost: hookyard\r\ncontent-length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return head.encode() + b"\r\n" + body


def test_tls_connections_count_against_listen_max_connections_from_their_handshake(tmp_path: Any) -> None:
    # asyncio's own TLS server hands a connection over only once its handshake is done: clients that
    # connect and never send a ClientHello were not counted, and each held a file descriptor for 60 s.
    cert, key = self_signed(tmp_path, "listener")
    config = gateway_config(
        tmp_path,
        listen={"max_connections": 3, "tls": {"cert": str(cert), "key": str(key)}},
        # Long enough that what comes before the silent ones' handshake timeout fits in it on a busy machine.
        limits={"read_timeout": "6s"},
    )
    verify = ssl.create_default_context(cafile=cert)
    with RunningGateway(config, scheme="https") as gw:
        address = ("127.0.0.1", int(gw.url.rsplit(":", 1)[1]))
        opened = time.monotonic()
        silent = [socket.create_connection(address, timeout=10) for _ in range(3)]
        flood: list[socket.socket] = []
        try:
            wait_until(lambda: gw.metric("hookyard_webhook_connections") == 3)
            # Past the limit, each is closed as soon as it is accepted (an answer needs a handshake).
            flood = [socket.create_connection(address, timeout=5) for _ in range(50)]
            assert all(closed_by_the_server(sock) for sock in flood)
            with httpx.Client(verify=verify, timeout=5) as sender, pytest.raises(httpx.TransportError):
                sender.post(gw.url + "/webhooks/consignease", content=b"{}")
            assert time.monotonic() - opened < 6  # not by a handshake's timeout
            assert (
                gw.metric("hookyard_webhook_rejections_total", source="", reason="too_many_connections") == 51
            )
            # The silent ones have limits.read_timeout for their handshake, then they are closed.
            assert all(closed_by_the_server(sock) for sock in silent)
            assert time.monotonic() - opened >= 6
            wait_until(lambda: gw.metric("hookyard_webhook_connections") == 0)
        finally:
            for sock in silent + flood:
                sock.close()
        body, headers = svix_request(msg_id="msg_after_the_handshakes")
        with httpx.Client(verify=verify, timeout=5) as sender:
            accepted = sender.post(gw.url + "/webhooks/consignease", content=body, headers=headers)
        assert (accepted.status_code, accepted.json()["status"]) == (200, "accepted")


def closed_by_the_server(sock: socket.socket) -> bool:
    """The server closed the connection (without a word): False if it is still open at the socket's
    timeout."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_flood_of_connections_under_a_low_open_file_limit_leaves_the_ops_listener_answering(
    tmp_path: Any,
) -> None:
    # 264 open files at most, hard limit included: listen.max_connections (1024) is lowered to fit, with
    # 64 + 64 (refused connections as they linger) + 2 x delivery.concurrency kept for the rest. Without a
    # limit, the listener would take all 264 and the ops listener's accept() would fail with EMFILE.
    ingress, ops = free_port(), free_port()
    config = gateway_config(
        tmp_path,
        listen={"host": "127.0.0.1", "port": ingress},
        ops={"host": "127.0.0.1", "port": ops},
        delivery={"concurrency": 8},
    )
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(config))
    ops_url = f"http://127.0.0.1:{ops}"
    process = GatewayProcess(path, ops_url, open_files=264).start()
    flood: list[socket.socket] = []
    try:
        with httpx.Client(timeout=3) as client:
            assert (
                metric_value(client.get(ops_url + "/metrics").text, "hookyard_webhook_max_connections") == 120
            )
            for _ in range(250):
                flood.append(socket.create_connection(("127.0.0.1", ingress), timeout=5))

            def scraped(name: str, **labels: str) -> float:
                return metric_value(client.get(ops_url + "/metrics").text, name, **labels)

            wait_until(
                lambda: scraped("hookyard_webhook_rejections_total", reason="too_many_connections") == 130
            )
            assert scraped("hookyard_webhook_connections") == 120
            assert client.get(ops_url + "/healthz").status_code == 200
            assert client.get(ops_url + "/readyz").status_code == 200  # the store still writes
    finally:
        for sock in flood:
            sock.close()
        process.kill()
    assert "listen.max_connections lowered from 1024 to 120" in process.log_path.read_text()


def test_the_open_file_limit_is_raised_for_listen_max_connections_or_the_limit_lowered_to_fit() -> None:
    # In a process of its own: a hard limit, once lowered, cannot be raised again.
    code = """
import logging, resource, sys
from gateway.app import fit_connections
logging.basicConfig(stream=sys.stdout, format="%(levelname)s %(message)s", level=logging.INFO)
resource.setrlimit(resource.RLIMIT_NOFILE, (300, 2000))
print(fit_connections(1024, 192), resource.getrlimit(resource.RLIMIT_NOFILE))
print(fit_connections(100, 192), resource.getrlimit(resource.RLIMIT_NOFILE))
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
print(fit_connections(1024, 192), resource.getrlimit(resource.RLIMIT_NOFILE))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
    )
    lines = result.stdout.splitlines()
    assert lines == [
        "INFO open-file limit raised from 300 to 1216 for listen.max_connections",
        "1024 (1216, 2000)",
        "100 (1216, 2000)",  # fits already: left as it is
        "WARNING listen.max_connections lowered from 1024 to 64: the open-file limit is 256 (hard limit 256), "
        "and 192 of them are kept for the store, the ops listener and deliveries; raise the limit "
        "(ulimit -n, LimitNOFILE=, the container's nofile ulimit) or lower listen.max_connections",
        "64 (256, 256)",
    ], result.stderr


def test_listen_max_connections_is_a_positive_integer() -> None:
    from gateway.config import ConfigError, parse_config

    assert parse_config("sources: {}").listen.max_connections == 1024
    assert parse_config('listen: {max_connections: "50"}').listen.max_connections == 50
    for bad in ("0", "-1", "2.5", "many"):
        with pytest.raises(ConfigError) as error:
            parse_config(f"listen: {{max_connections: {bad}}}")
        assert str(error.value).startswith("listen.max_connections: "), bad
