"""Where an endpoint may point: the URL's shape, and addresses vetted when registered and at each send.

An endpoint URL is ``http`` or ``https`` with a host and no credentials. Its host must resolve
only to global addresses: loopback, private (RFC 1918, unique-local), link-local (cloud metadata
services live there), shared, reserved, multicast and unspecified addresses are refused, unless
they fall in a network the operator allows (``ATRIUM_WEBHOOK_ALLOWED_NETWORKS``). A name that
resolves to several addresses must have every one allowed.

The check runs when an endpoint is registered (a clear error for the admin) and again before every
attempt, and the attempt connects to the very address that was checked (``Target``): a name that
re-resolves to an internal address later (DNS rebinding) is refused, not followed. Redirects are
never followed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit, urlunsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_URL = 2000


class AddressRefused(ValueError):
    """The URL, or an address its host resolves to, is not one an endpoint may point at."""


def parse_url(url: str) -> SplitResult:
    """The URL split, when it is one an endpoint may have; ``AddressRefused`` saying why otherwise."""
    if len(url) > MAX_URL or any(c.isspace() or ord(c) < 32 for c in url):
        raise AddressRefused(f"must be a URL of at most {MAX_URL} characters without spaces")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise AddressRefused("must be an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise AddressRefused("must not carry credentials (user:password@)")
    try:
        port = parts.port
    except ValueError:
        raise AddressRefused("has an invalid port") from None
    if not parts.hostname or port == 0:
        raise AddressRefused("must name a host")
    return parts


def networks(allowed: Sequence[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in allowed)


def refusal(address: IPAddress, allowed: Sequence[IPNetwork]) -> str | None:
    """Why ``address`` may not be sent to (None when it may)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in network for network in allowed):
        return None
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_private:
        return "a private address"
    if address.is_multicast or address.is_unspecified or address.is_reserved or not address.is_global:
        return "not a public address"
    return None


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to now (an IP literal is itself); ``AddressRefused`` when none."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise AddressRefused(f"host {host!r} does not resolve ({exc})") from None
    found: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    if not found:
        raise AddressRefused(f"host {host!r} does not resolve")
    return found


@dataclass(frozen=True)
class Target:
    """Where one attempt goes: ``url`` names the vetted address; ``host`` is the Host header and,
    for https, the name the certificate must carry (``sni_hostname``)."""

    url: str
    host: str
    server_name: str


def default_port(parts: SplitResult) -> int:
    return parts.port or (443 if parts.scheme == "https" else 80)


async def vet(url: str, allowed: Sequence[IPNetwork]) -> Target:
    """The ``Target`` of ``url`` when every address its host resolves to now is allowed;
    ``AddressRefused`` naming the address otherwise."""
    parts = parse_url(url)
    host = parts.hostname
    assert host is not None
    addresses = await resolve(host, default_port(parts))
    for address in addresses:
        reason = refusal(address, allowed)
        if reason is not None:
            raise AddressRefused(f"host {host!r} resolves to {address}, {reason}")
    address = addresses[0]
    literal = f"[{address}]" if address.version == 6 else str(address)
    netloc = literal if parts.port is None else f"{literal}:{parts.port}"
    shown_host = f"[{host}]" if ":" in host else host
    return Target(url=urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")),
                  host=shown_host if parts.port is None else f"{shown_host}:{parts.port}", server_name=host)
