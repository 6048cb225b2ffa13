"""The test helpers' own promises, where a broken one would make other tests flaky rather than fail."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from tests.support import free_port, raw_server, read_request, worker_ports


def ephemeral_ports() -> range:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return range(int(low), int(high) + 1)


@pytest.mark.skipif(not Path("/proc/sys/net/ipv4").exists(), reason="Linux's port ranges")
def test_free_port_gives_a_port_the_kernel_never_hands_out() -> None:
    # A port taken from binding port 0 and closed went back to the kernel, which could give it to any
    # socket binding port 0 or connecting out (another xdist worker's server, say) before the gateway
    # process bound it: the start failed with EADDRINUSE.
    ephemeral = ephemeral_ports()
    ports = [free_port() for _ in range(50)]
    assert not [port for port in ports if port in ephemeral]
    assert len(set(ports)) == 50  # not one given again soon, as to a server that restarts on its port
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_each_xdist_worker_has_ports_of_its_own() -> None:
    workers = [set(worker_ports(f"gw{index}")) for index in range(4)]
    assert set(worker_ports("")) == workers[0]  # without xdist
    assert all(len(ports) >= 500 for ports in workers)
    assert all(not ports & other for ports in workers for other in workers if other is not ports)


REQUEST_HEAD = b"POST /hook HTTP/1.1\r\nhost: 127.0.0.1\r\n"
SPLIT_REQUESTS = {
    "content-length": [REQUEST_HEAD + b"content-le", b"ngth: 11\r\n\r", b"\nhello", b" world"],
    "chunked": [
        REQUEST_HEAD + b"transfer-encoding: chunked\r\n\r\n5\r",
        b"\nhello\r\n6\r\n wo",
        b"rld\r\n0\r\n",
        b"\r\n",
    ],
}


def send_slowly(conn: socket.socket, pieces: list[bytes], sent_all: threading.Event | None = None) -> None:
    """Each piece a packet of its own, apart from the next by more than a loop's turn."""
    for number, piece in enumerate(pieces):
        time.sleep(0.05)
        if sent_all is not None and number == len(pieces) - 1:
            sent_all.set()
        conn.sendall(piece)


@pytest.mark.parametrize("framing", SPLIT_REQUESTS)
def test_read_request_reads_a_request_split_across_packets_whole(framing: str) -> None:
    pieces = SPLIT_REQUESTS[framing]
    server, client = socket.socketpair()
    with server, client:
        sender = threading.Thread(target=send_slowly, args=(client, pieces))
        sender.start()
        request = read_request(server)
        sender.join(5)
        assert request == b"".join(pieces)


@pytest.mark.parametrize("framing", SPLIT_REQUESTS)
def test_raw_server_answers_only_once_the_whole_request_is_in(framing: str) -> None:
    # It read the first packet alone: a request that a busy machine sent in several was answered before its
    # body came, which a test then took for the gateway's doing.
    sent_all = threading.Event()
    answered_after: list[bool] = []

    def answer(conn: socket.socket) -> None:
        answered_after.append(sent_all.is_set())
        conn.sendall(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")

    with raw_server(answer) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            send_slowly(client, SPLIT_REQUESTS[framing], sent_all)
            assert client.recv(4096).startswith(b"HTTP/1.1 204 ")
    assert answered_after == [True]
