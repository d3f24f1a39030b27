"""authz.core.tunnel: an egress tunnel's destination is resolved off the event loop,
refused when any answer is not public, and pinned to a checked address; bounded in time
and in waiting resolutions."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from typing import Any

import pytest

from authz.core.errors import AddressNotAllowed, DestinationUnresolved
from authz.core.tunnel import MAX_ANSWERS, MAX_PENDING, TunnelResolver, is_public


def _answers(*addresses: str) -> list[tuple[Any, ...]]:
    """getaddrinfo-shaped answers for ``addresses``."""
    out: list[tuple[Any, ...]] = []
    for text in addresses:
        address = ipaddress.ip_address(text)
        if address.version == 4:
            out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (text, 443)))
        else:
            out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (text, 443, 0, 0)))
    return out


def _resolver(*addresses: str, **kwargs: Any) -> TunnelResolver:
    return TunnelResolver(resolve=lambda host, port: _answers(*addresses), **kwargs)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.215.14", True),
        ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", True),
        ("127.0.0.1", False),
        ("127.8.9.10", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("64:ff9b::a9fe:a9fe", False),
        ("64:ff9b::5db8:d70e", True),
    ],
    ids=lambda v: str(v),
)
def test_is_public(address: str, public: bool) -> None:
    assert is_public(ipaddress.ip_address(address)) is public


async def test_a_public_name_is_pinned_to_a_checked_address_ipv4_first() -> None:
    resolver = _resolver("2606:2800:21f:cb07:6820:80da:af6b:8b2c", "93.184.215.14")
    assert await resolver.address("example.com", 443, 1.0) == "93.184.215.14:443"
    ipv6_only = _resolver("2606:2800:21f:cb07:6820:80da:af6b:8b2c")
    assert (
        await ipv6_only.address("example.com", 8443, 1.0)
        == "[2606:2800:21f:cb07:6820:80da:af6b:8b2c]:8443"
    )


@pytest.mark.parametrize(
    "addresses",
    [
        ("127.0.0.1",),
        ("93.184.215.14", "127.0.0.1"),
        ("169.254.169.254",),
        ("10.0.0.1", "93.184.215.14"),
        ("::1",),
        ("::ffff:10.0.0.1",),
    ],
    ids=["loopback", "one-of-two-loopback", "metadata", "private-first", "v6-loopback", "mapped"],
)
async def test_any_non_public_answer_refuses_the_name(addresses: tuple[str, ...]) -> None:
    with pytest.raises(AddressNotAllowed, match=r"'rebind\.example'"):
        await _resolver(*addresses).address("rebind.example", 443, 1.0)


async def test_too_many_answers_refuse_the_name() -> None:
    many = [f"93.184.{i // 250}.{i % 250 + 1}" for i in range(MAX_ANSWERS + 1)]
    with pytest.raises(AddressNotAllowed, match="more than"):
        await _resolver(*many).address("many.example", 443, 1.0)


async def test_an_ip_literal_is_never_resolved() -> None:
    def explode(host: str, port: int) -> list[tuple[Any, ...]]:
        raise AssertionError("must not resolve")

    with pytest.raises(AddressNotAllowed):
        await TunnelResolver(resolve=explode).address("127.0.0.1", 443, 1.0)


@pytest.mark.parametrize(
    "error",
    [socket.gaierror(socket.EAI_NONAME, "Name or service not known"), UnicodeError("label")],
    ids=["nxdomain", "idna"],
)
async def test_a_name_that_does_not_resolve_is_unresolved(error: Exception) -> None:
    def fail(host: str, port: int) -> list[tuple[Any, ...]]:
        raise error

    with pytest.raises(DestinationUnresolved):
        await TunnelResolver(resolve=fail).address("nope.example", 443, 1.0)
    with pytest.raises(DestinationUnresolved, match="no address"):
        await _resolver().address("empty.example", 443, 1.0)


async def test_resolution_runs_off_the_event_loop_and_times_out() -> None:
    release = threading.Event()
    loop_thread = threading.get_ident()
    seen: list[int] = []

    def slow(host: str, port: int) -> list[tuple[Any, ...]]:
        seen.append(threading.get_ident())
        release.wait(5)
        return _answers("93.184.215.14")

    resolver = TunnelResolver(resolve=slow, timeout_s=0.05)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    with pytest.raises(DestinationUnresolved, match="no answer in time"):
        await resolver.address("slow.example", 443, 1.0)
    task.cancel()
    release.set()
    assert seen
    assert seen[0] != loop_thread
    assert ticks > 1  # the loop kept running while the name was being resolved
    resolver.close()


async def test_the_budget_bounds_the_wait_below_the_timeout() -> None:
    release = threading.Event()
    resolver = TunnelResolver(
        resolve=lambda h, p: (release.wait(5), _answers("93.184.215.14"))[1], timeout_s=10
    )
    with pytest.raises(DestinationUnresolved):
        await resolver.address("slow.example", 443, 0.02)
    release.set()
    resolver.close()


async def test_waiting_resolutions_are_bounded() -> None:
    release = threading.Event()
    resolver = TunnelResolver(
        resolve=lambda h, p: (release.wait(5), _answers("93.184.215.14"))[1], timeout_s=5
    )
    waiting = [
        asyncio.create_task(resolver.address(f"slow{i}.example", 443, 5.0))
        for i in range(MAX_PENDING)
    ]
    await asyncio.sleep(0.05)
    with pytest.raises(DestinationUnresolved, match="too many resolutions waiting"):
        await resolver.address("one-more.example", 443, 5.0)
    release.set()
    assert await asyncio.gather(*waiting) == ["93.184.215.14:443"] * MAX_PENDING
    # Given up waits free their place: a queued resolution is cancelled with its waiter.
    assert await resolver.address("again.example", 443, 5.0) == "93.184.215.14:443"
    resolver.close()


async def test_static_targets_are_used_as_is_only_for_the_exact_host_and_port() -> None:
    resolver = TunnelResolver(
        static={"allowed.test:443": "127.0.0.1:40001"},
        resolve=lambda host, port: _answers("127.0.0.1"),
    )
    assert await resolver.address("allowed.test", 443, 1.0) == "127.0.0.1:40001"
    # Another port of the same name, or another name, is resolved and checked.
    with pytest.raises(AddressNotAllowed):
        await resolver.address("allowed.test", 8443, 1.0)
    with pytest.raises(AddressNotAllowed):
        await resolver.address("other.test", 443, 1.0)
