"""Which address a request came from: the TCP peer, or what trusted proxies say it was.

``X-Forwarded-For`` is written by whoever sends the request, so it is believed only as far as
it was written by proxies the operator trusts (``GATEWAY["TRUSTED_PROXIES"]``, parsed once in
the settings). The list is read from the right, the end the nearest proxy appended to: trusted
hops are skipped, and the first address that is not a trusted proxy is the client. Everything
left of it was written by that client and is ignored.

The ASGI server's own proxy-header handling must be off (uvicorn ``--no-proxy-headers``, daphne
without ``--proxy-headers``): it would rewrite ``scope["client"]`` by its own rules, and the
gateway would take a forwarded address for the TCP peer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

from django.conf import settings

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

_FORWARDED_FOR = b"x-forwarded-for"


def client_address(scope: dict) -> str | None:
    """The client's IP address for this request as text, or None when it cannot be known.

    None means: no peer address (a Unix socket), a peer that is not an IP address, or a trusted
    proxy that forwarded something unreadable. Callers that restrict by address must refuse
    None (``RequestChecks.check_client_address`` does). Costs one cached parse of the peer when
    the peer is not a trusted proxy; the header is only read when it is.
    """
    client = scope.get("client")
    peer = address_parse(client[0]) if client else None
    trusted = settings.GATEWAY["TRUSTED_PROXIES"]
    if peer is not None and trusted and is_trusted(peer, trusted):
        found = forwarded_client(peer, _forwarded_hops(scope.get("headers", ())), trusted)
        return str(found) if found is not None else None
    return str(peer) if peer is not None else None


def forwarded_client(peer: Address, hops: Sequence[str], trusted: Sequence[Network]) -> Address | None:
    """The client behind ``peer`` given the X-Forwarded-For ``hops`` (left to right), or None.

    Walks from the right: each trusted proxy is skipped, the first untrusted address is the
    client. An unreadable hop reached on the way makes the client unknown (None): the proxy that
    wrote it was trusted, and nothing further left can be believed. When every hop is a trusted
    proxy, the leftmost one is the furthest known. An untrusted ``peer`` is the client itself.
    """
    if not is_trusted(peer, trusted):
        return peer
    client = peer
    for hop in reversed(hops):
        address = address_parse(hop)
        if address is None:
            return None
        client = address
        if not is_trusted(address, trusted):
            break
    return client


def is_trusted(address: Address, trusted: Iterable[Network]) -> bool:
    return any(address in network for network in trusted)


@lru_cache(maxsize=4096)
def address_parse(text: str) -> Address | None:
    """An address as a server or a proxy writes it, or None if it is not one.

    Accepts ``1.2.3.4``, ``1.2.3.4:5678``, ``2001:db8::1``, ``[2001:db8::1]`` and
    ``[2001:db8::1]:443``; an IPv4-mapped IPv6 address (``::ffff:10.0.0.1``, from a dual-stack
    socket) becomes the IPv4 address, so IPv4 networks match it. Cached: the same few peers
    and proxies come back on every request.
    """
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.partition(":")[0]  # IPv4 with a port
    try:
        address = ip_address(text)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _forwarded_hops(headers: Iterable[tuple[bytes, bytes]]) -> list[str]:
    # Several X-Forwarded-For headers form one list, in the order they arrived (RFC 9110 5.3).
    hops: list[str] = []
    for name, value in headers:
        if name == _FORWARDED_FOR:
            hops.extend(value.decode("latin-1").split(","))
    return hops
