"""The test helpers' own promises, where a broken one would make other tests flaky rather than fail."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.support import free_port, worker_ports


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
