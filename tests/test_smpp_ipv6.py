"""The SMPP client over IPv6: an IPv6 literal, and a host name whose addresses are tried in turn.

The client used smpplib's socket, which is IPv4 only: ``host = "::1"`` or a name resolving to
IPv6 addresses never connected. It now resolves the name with getaddrinfo and tries the addresses
in order, as ``socket.create_connection`` does, without blocking (on its I/O thread, never the
reactor's). The peer is the project's fault-injecting SMSC, listening on ``::1``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import random
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gateway.config import load_config
from gateway.sms.smpp import LinkDropped, SmppClient, _Link
from gateway.testing.smsc import Smsc
from tests.test_smpp_client import Ticker, part, smpp_config, submit_all, until, with_client


def _no_ipv6_loopback() -> str | None:
    """Why IPv6 on loopback cannot be tested here, or None if it can."""
    if not socket.has_ipv6:
        return "this Python has no IPv6 support (socket.has_ipv6 is false)"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError as error:
        return f"no IPv6 loopback on this machine (binding ::1 failed: {error})"
    return None


NO_IPV6 = _no_ipv6_loopback()
needs_ipv6 = pytest.mark.skipif(NO_IPV6 is not None, reason=NO_IPV6 or "")


@contextlib.contextmanager
def refusing(family: socket.AddressFamily, address: str) -> Iterator[int]:
    """A port on ``address`` that refuses connections (bound, not listening) while the block runs."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        yield sock.getsockname()[1]


def stream(family: socket.AddressFamily, address: str, port: int) -> tuple[Any, ...]:
    sockaddr = (address, port, 0, 0) if family == socket.AF_INET6 else (address, port)
    return (family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)


Addresses = Callable[[int], list[tuple[Any, ...]]]


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> dict[str, Addresses]:
    """Names the test gives addresses to (as a DNS server would), from the port asked for; other
    names resolve as usual."""
    names: dict[str, Addresses] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        if host in names:
            return names[host](int(port))
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return names


@needs_ipv6
def test_the_client_binds_and_submits_to_an_smsc_on_an_ipv6_literal() -> None:
    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> None:
        outcomes, _ = await submit_all(reactor, client, [part(1), part(2)])
        assert len(outcomes.ids()) == 2
        assert {r.destination for r in smsc.accepted()} == {part(1).destination, part(2).destination}
        state = client.state()
        assert state["bound"] and state["reconnects"] == 0 and smsc.binds == 1

    with_client({"host": "::1"}, scenario, host="::1")


@needs_ipv6
def test_an_ipv6_literal_in_brackets_from_the_configuration_reaches_the_smsc() -> None:
    """``host = "[::1]"``, as URLs write it, is the address ``::1`` (it used to fail to resolve)."""
    host = load_config(None, environ={"GATEWAY_SMPP_HOST": "[::1]"}).smpp.host
    assert host == "::1"

    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> None:
        outcomes, _ = await submit_all(reactor, client, [part(1)])
        assert len(outcomes.ids()) == 1 and smsc.binds == 1

    with_client({"host": "::1"}, scenario, host=host)


@needs_ipv6
def test_a_host_name_is_connected_to_its_addresses_in_turn_reaching_the_ipv6_one(
    resolver: dict[str, Addresses], caplog: pytest.LogCaptureFixture
) -> None:
    """The name gives an IPv4 address that refuses, then the IPv6 one of the SMSC: the client goes
    on to the second within the same connect, as socket.create_connection does."""
    caplog.set_level(logging.INFO, logger="gateway.sms.smpp")
    with refusing(socket.AF_INET, "127.0.0.1") as closed:
        resolver["smsc.test"] = lambda port: [
            stream(socket.AF_INET, "127.0.0.1", closed),
            stream(socket.AF_INET6, "::1", port),
        ]

        async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> None:
            outcomes, _ = await submit_all(reactor, client, [part(1)])
            assert len(outcomes.ids()) == 1
            assert client.state()["bound"]
            assert client.state()["reconnects"] == 0  # the second address was tried without a drop
            assert smsc.binds == 2  # the transmitter and the receiver, each after the refused address

        with_client({"host": "::1"}, scenario, host="smsc.test", bind_mode="transmitter_receiver")
    skipped = [r.getMessage() for r in caplog.records if "event=smpp.connect_failed" in r.getMessage()]
    assert len(skipped) == 2 and all(f"address=127.0.0.1:{closed} " in m for m in skipped)


@needs_ipv6
def test_when_every_address_refuses_the_link_drops_with_the_last_error_and_retries(
    resolver: dict[str, Addresses],
) -> None:
    with refusing(socket.AF_INET6, "::1") as closed6, refusing(socket.AF_INET, "127.0.0.1") as closed4:
        resolver["smsc.test"] = lambda port: [
            stream(socket.AF_INET6, "::1", closed6),
            stream(socket.AF_INET, "127.0.0.1", closed4),
        ]

        async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> None:
            await until(reactor, lambda: client.state()["reconnects"] >= 2, 5, "two failed connects")
            state = client.state()
            assert not state["bound"] and smsc.binds == 0
            assert state["last_error"] == (
                f"cannot connect to smsc.test:{smsc.port}: ECONNREFUSED at 127.0.0.1:{closed4}, the last of 2 addresses"
            )

        with_client({"host": "::1"}, scenario, host="smsc.test")


# -- the connect's decisions, with a simulated clock (no IPv6 needed) --------------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_an_address_failing_at_once_or_not_answering_is_passed_over_for_the_next(
    resolver: dict[str, Addresses], monkeypatch: pytest.MonkeyPatch
) -> None:
    """IPv6 disabled in the kernel (EAFNOSUPPORT) fails at once: the next address at once. An
    address that does not answer is given up after the response timeout for the next, as
    socket.create_connection does with its timeout; after the last, the link drops."""
    clock = FakeClock()
    link = _Link(smpp_config(2775, host="smsc.test", response_timeout=2.0), lambda e: None, clock, random.Random(1))
    real = socket.socket

    class NoIpv6(real):  # type: ignore[misc, valid-type]
        def __init__(self, family: int = -1, *args: Any, **kwargs: Any) -> None:
            if family == socket.AF_INET6:
                raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
            super().__init__(family, *args, **kwargs)

    with socket.create_server(("127.0.0.1", 0)) as first, socket.create_server(("127.0.0.1", 0)) as second:
        ports = [first.getsockname()[1], second.getsockname()[1]]
        resolver["smsc.test"] = lambda port: [
            stream(socket.AF_INET6, "2001:db8::5", port),
            stream(socket.AF_INET, "127.0.0.1", ports[0]),
            stream(socket.AF_INET, "127.0.0.1", ports[1]),
        ]
        monkeypatch.setattr(socket, "socket", NoIpv6)
        try:
            link._connect(clock.now)
            (conn,) = link.connections
            assert conn.phase == "connecting" and conn.address == f"127.0.0.1:{ports[0]}"
            assert conn.deadline == clock.now + 2.0
            given_up = conn.sock
            clock.now += 1.9
            link._timers(clock.now)
            assert conn.address == f"127.0.0.1:{ports[0]}"  # still within its response timeout
            clock.now += 0.1
            link._timers(clock.now)
            assert conn.address == f"127.0.0.1:{ports[1]}" and conn.deadline == clock.now + 2.0
            assert given_up.fileno() == -1 and conn.sock is not given_up
            clock.now += 2.0
            with pytest.raises(LinkDropped) as dropped:
                link._timers(clock.now)
            assert str(dropped.value) == (
                f"cannot connect to smsc.test:2775: no answer at 127.0.0.1:{ports[1]}, the last of 3 addresses"
            )
        finally:
            link._close_all()
            link._wake_r.close()
            link._wake_w.close()


def test_an_ipv6_host_is_shown_in_brackets_when_it_cannot_be_reached(resolver: dict[str, Addresses]) -> None:
    link = _Link(smpp_config(2775, host="2001:db8::5"), lambda e: None, FakeClock(), random.Random(1))
    resolver["2001:db8::5"] = lambda port: []
    try:
        with pytest.raises(LinkDropped) as dropped:
            link._connect(1000.0)
        assert str(dropped.value).startswith("cannot connect to [2001:db8::5]:2775: ")
    finally:
        link._wake_r.close()
        link._wake_w.close()
