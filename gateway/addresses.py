"""Who sent a request: the client address behind trusted proxies, and allowlists of networks.

Presets name the published source addresses of providers. Svix's list comes from its documentation page
"Static Source IP Addresses" (https://docs.svix.com/receiving/source-ips); a provider may change it, so a
source can always list networks itself instead of, or next to, a preset.

Behind proxies only one forwarding header is believed, the one the proxies write (`listen.forwarded_header`).
Proxies such as nginx and AWS ALB append to X-Forwarded-For and pass any other header through untouched, so
a client could otherwise write its own `Forwarded: for=...` and be believed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Literal

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# The forwarding header that trusted proxies write: X-Forwarded-For (nginx, ALB, most) or RFC 7239 Forwarded.
ForwardedHeader = Literal["x-forwarded-for", "forwarded"]

_SVIX_REGIONS: dict[str, tuple[str, ...]] = {
    "us": ("44.228.126.217", "50.112.21.217", "52.24.126.164", "54.148.139.208", "2600:1f24:64:8000::/56"),
    "eu": ("52.215.16.239", "54.216.8.72", "63.33.109.123", "2a05:d028:17:8000::/56"),
    "au": ("13.239.204.236", "54.66.246.217", "54.252.65.96", "2406:da2c:13:4000::/56"),
    "ca": ("52.60.44.49", "3.98.68.230", "3.96.105.27", "2600:1f21:1c:4000::/56"),
    "in": ("13.126.41.108", "15.207.218.84", "65.2.133.31"),
}

PRESETS: dict[str, tuple[str, ...]] = {
    "svix": tuple(network for region in _SVIX_REGIONS.values() for network in region),
    **{f"svix-{region}": networks for region, networks in _SVIX_REGIONS.items()},
    "loopback": ("127.0.0.0/8", "::1/128"),
    "private": ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"),
}


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs, single addresses and preset names -> networks; ValueError names the bad entry."""
    networks: list[Network] = []
    for entry in entries:
        for item in PRESETS.get(entry, (entry,)):
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                presets = ", ".join(sorted(PRESETS))
                raise ValueError(
                    f"{entry!r} is neither an address, a CIDR nor a preset ({presets})"
                ) from None
    return tuple(networks)


def parse_address(text: str) -> Address | None:
    text = text.strip().strip('"')
    if text.startswith("["):  # [v6]:port, as in Forwarded
        text = text[1 : text.find("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; they must match IPv4 networks and presets.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def contains(networks: tuple[Network, ...], address: Address) -> bool:
    return any(address in network for network in networks)


def client_address(
    peer: str | None,
    headers: Mapping[str, str],
    trusted: tuple[Network, ...],
    header: ForwardedHeader = "x-forwarded-for",
) -> Address | None:
    """The address that sent the request. The forwarding header is believed only from trusted proxies, and
    only hop by hop: the rightmost address that is not itself a trusted proxy is the client, because every
    address left of it could have been written by the client. Only `header` is read: the other one is
    whatever the client sent, passed through by the proxy."""
    address = parse_address(peer) if peer else None
    if address is None or not trusted or not contains(trusted, address):
        return address
    for hop in reversed(_forwarded_for(headers, header)):
        hop_address = parse_address(hop)
        if hop_address is None:
            return address  # a garbled hop: stop at the last address we could trust
        address = hop_address
        if not contains(trusted, address):
            return address
    return address


def _forwarded_for(headers: Mapping[str, str], header: ForwardedHeader) -> list[str]:
    value = headers.get(header, "")
    if header == "x-forwarded-for":
        return [hop.strip() for hop in value.split(",") if hop.strip()]
    hops = []
    for element in value.split(","):
        for pair in element.split(";"):
            name, _, found = pair.strip().partition("=")
            if name.lower() == "for":
                hops.append(found)
    return hops
