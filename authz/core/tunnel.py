"""Egress tunnels: resolve the destination the policy allowed, refuse what is not public,
and pin the checked address for Envoy.

An egress CONNECT the policy allows names its destination by DNS name
(``authz.tunnel``, :class:`authz.core.decision.TunnelRef`). Envoy must not resolve that
name itself: the answer it got could differ from the one checked (DNS rebinding). So authz
resolves it (:class:`TunnelResolver`: ``getaddrinfo`` in a small thread pool of its own,
never on the event loop, within a timeout), refuses the tunnel when any answer is not a
public address (:func:`is_public`), and hands Envoy the first checked address as
``ip:port`` in :data:`authz.core.headers.TUNNEL_ADDRESS_HEADER`, which the egress Envoy's
ORIGINAL_DST cluster connects to
(https://www.envoyproxy.io/docs/envoy/latest/api-v3/config/cluster/v3/cluster.proto,
``Cluster.OriginalDstLbConfig.use_http_header``).

Test-only, off by default: ``static`` maps an exact ``host:port`` to an ``ip:port`` that
is used as is (no DNS, no public-address check), so a test can play an allowed host with
a local HTTPS server (``AUTHZ_EGRESS_TUNNEL_TEST_TARGETS``, README). Any other name is
resolved and checked as in production.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType
from typing import Any, Final

from authz.core.errors import AddressNotAllowed, DestinationUnresolved

__all__ = [
    "DEFAULT_RESOLVE_TIMEOUT_S",
    "MAX_ANSWERS",
    "MAX_PENDING",
    "RESOLVER_THREADS",
    "TunnelResolver",
    "format_address",
    "is_public",
]

# The longest authz waits for one name (within the decision budget, which may be less).
DEFAULT_RESOLVE_TIMEOUT_S: Final = 0.25
# Answers looked at per name: every one is checked (a private answer anywhere refuses
# the name); more than this many refuse it too (no real host needs them).
MAX_ANSWERS: Final = 32
# Resolutions at once (threads), and waiting for one: beyond, a tunnel is refused at once
# (destination_unresolved) rather than queued behind slow names without bound.
RESOLVER_THREADS: Final = 4
MAX_PENDING: Final = 64
# NAT64 (RFC 6052): an IPv6 address that embeds an IPv4 one, checked as that one.
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
_NO_STATIC: Final[Mapping[str, str]] = MappingProxyType({})

Resolve = Callable[[str, int], list[tuple[Any, ...]]]


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True when ``address`` is globally reachable per the IANA special-purpose registries
    (``ipaddress``'s ``is_global``: not loopback, RFC 1918 private, link-local (the cloud
    metadata address 169.254.169.254 included), shared 100.64/10, documentation,
    reserved or unspecified) and not multicast. An IPv4-mapped (``::ffff:a.b.c.d``) or
    NAT64 (``64:ff9b::/96``) IPv6 address is judged by the IPv4 address it carries."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return is_public(address.ipv4_mapped)
        if address in _NAT64:
            return is_public(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return address.is_global and not address.is_multicast


def format_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    """``ip:port`` as Envoy parses it (``[v6]:port`` for IPv6)."""
    if isinstance(address, ipaddress.IPv6Address):
        return f"[{address}]:{port}"
    return f"{address}:{port}"


def _getaddrinfo(host: str, port: int) -> list[tuple[Any, ...]]:
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)


class TunnelResolver:
    """Resolves and checks tunnel destinations (the module docstring).

    ``timeout_s``: the longest one resolution may take; ``static``: the test-only
    ``host:port`` -> ``ip:port`` map (empty by default); ``resolve`` is injectable for
    tests (``socket.getaddrinfo``'s signature and answer shape). Safe to share between
    concurrent calls; :meth:`close` stops its threads."""

    def __init__(
        self,
        *,
        timeout_s: float = DEFAULT_RESOLVE_TIMEOUT_S,
        static: Mapping[str, str] = _NO_STATIC,
        resolve: Resolve = _getaddrinfo,
    ) -> None:
        self._timeout_s = timeout_s
        self._static = dict(static)
        self._resolve = resolve
        self._pool = ThreadPoolExecutor(RESOLVER_THREADS, thread_name_prefix="authz-dns")
        self._pending = 0
        self._lock = threading.Lock()

    async def address(self, host: str, port: int, budget_s: float) -> str:
        """The checked ``ip:port`` to connect to for ``host``:``port``, within
        ``min(budget_s, timeout_s)`` seconds. Raises :class:`AddressNotAllowed` when
        ``host`` is an IP literal or any answer is not public (:func:`is_public`), or it
        has more than :data:`MAX_ANSWERS`; :class:`DestinationUnresolved` when it does not
        resolve, in time, or :data:`MAX_PENDING` resolutions are already waiting. Messages
        name the host, never an address from the answer."""
        pinned = self._static.get(f"{host}:{port}")
        if pinned is not None:
            return pinned
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:  # the policy refuses literals; never resolve around it
            raise AddressNotAllowed(f"tunnel to {host!r}: an IP literal")
        # Counted until the thread is done, not until the caller stops waiting: a name
        # that times out still holds its thread, and the queue behind it stays bounded.
        with self._lock:
            if self._pending >= MAX_PENDING:
                raise DestinationUnresolved(f"tunnel to {host!r}: too many resolutions waiting")
            self._pending += 1
        future = self._pool.submit(self._resolve, host, port)
        future.add_done_callback(self._done)
        try:
            answers = await asyncio.wait_for(
                asyncio.wrap_future(future), timeout=max(0.0, min(budget_s, self._timeout_s))
            )
        except TimeoutError:
            raise DestinationUnresolved(f"tunnel to {host!r}: no answer in time") from None
        except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
            raise DestinationUnresolved(f"tunnel to {host!r}: {exc}") from None
        return self._check(host, port, answers)

    def _done(self, _future: object) -> None:
        with self._lock:
            self._pending -= 1

    def _check(self, host: str, port: int, answers: list[tuple[Any, ...]]) -> str:
        if not answers:
            raise DestinationUnresolved(f"tunnel to {host!r}: no address")
        if len(answers) > MAX_ANSWERS:
            raise AddressNotAllowed(f"tunnel to {host!r}: more than {MAX_ANSWERS} answers")
        addresses = []
        for family, _type, _proto, _name, sockaddr in answers:
            if family not in (socket.AF_INET, socket.AF_INET6):
                raise AddressNotAllowed(f"tunnel to {host!r}: an answer of family {family}")
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if not is_public(address):
                raise AddressNotAllowed(f"tunnel to {host!r}: resolves to a non-public address")
            addresses.append(address)
        # IPv4 first (what most networks route), else the resolver's order.
        chosen = min(addresses, key=lambda a: a.version)
        return format_address(chosen, port)

    def close(self) -> None:
        """Stop the resolver threads (a resolution in flight finishes on its own)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
