"""The gateway's SMPP 3.4 client on smpplib: one I/O thread per link, results handed to the reactor.

::

    reactor thread                              I/O thread (one per link)
    ──────────────                              ─────────────────────────
    SmppClient.submit(part) ──► command queue ─► pending (FIFO) ─► Pacer + Window ─► submit_sm
                                + wake-up byte                     (gateway.sms.link)
    Deferred fires ◄──────── callFromThread ◄── events of one loop iteration, as one list
    on_deliver(DeliverSm) ◄─ (batched)      ◄── deliver_sm
    ack after it is stored ► command queue  ─► deliver_sm_resp, written ahead of queued submits

smpplib 2.2.4 has no send lock, an unlocked sequence counter, and sends ``enquire_link`` from
whichever thread reads (LIBRARIES.md); so every socket of a link is read and written by its one
I/O thread, with ``select`` over the sockets and a socketpair that wakes it for new commands.
That thread also resolves the host name (a slow resolver holds up the link, never the reactor)
and connects without blocking, over IPv6 or IPv4, trying the addresses in turn as
``socket.create_connection`` does (smpplib's own socket is IPv4 only). smpplib numbers the
requests and builds and parses the PDUs, except the three on the hot path (``submit_sm``, its
answer, ``deliver_sm``), which :mod:`gateway.sms.pdu` does in a few µs, held to smpplib's bytes
by tests. smpplib's blocking read loop is not used: the thread frames PDUs itself (a garbled
length winds the connection down instead of hanging it), answers ``deliver_sm`` only once the
gateway has stored it (SPEC R3.7a), answers the SMSC's ``unbind`` (smpplib never does) and keeps
its own window of outstanding submits, because after a dropped link smpplib does not know which
went unanswered.

Every submit's Deferred fires exactly once: with the SMSC's message_id, or with
:class:`SubmitRejected`, :class:`SubmitOutcomeUnknown` (:class:`SubmitTimedOut` when the link
stayed up) or :class:`NotSubmitted`. Throttling (``ESME_RTHROTTLED``, ``ESME_RMSGQFUL``, also
as a ``generic_nack``) never reaches the caller: the same part is sent again after a pause, at a
lower pace (issue 4: slow down, never drop). ``ESME_RINVBNDSTS`` (the SMSC lost the session)
rebinds and sends the part again.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import queue
import random
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import smpplib.client
import smpplib.command
import smpplib.consts
import smpplib.smpp
from twisted.application.service import Service
from twisted.internet import defer
from twisted.python.failure import Failure

from gateway.config import SmppConfig
from gateway.sms.link import (
    ESME_RMSGQFUL,
    THROTTLING_STATUSES,
    Backoff,
    Outstanding,
    Pacer,
    Window,
    is_permanent,
)
from gateway.sms.pdu import (
    DATA_SM,
    DELIVER_SM,
    HEADER_LENGTH,
    DeliverSm,
    FramingError,
    Header,
    PduDecodeError,
    PduFramer,
    decode_incoming,
    encode_submit_sm,
    read_header,
)

log = logging.getLogger("gateway.sms.smpp")

ESME_ROK = 0x00
ESME_RINVCMDLEN = 0x02
ESME_RINVCMDID = 0x03
ESME_RX_T_APPN = 0x64
ESME_RINVBNDSTS = 0x04
#: A part's pause after its destination's queue was full grows no further than 2**this times.
MAX_QUEUE_FULL_DOUBLINGS = 16
GENERIC_NACK = 0x80000000
SUBMIT_SM_RESP = 0x80000004

STATUS_NAMES: dict[int, str] = {
    value: name[len("SMPP_") :]
    for name, value in vars(smpplib.consts).items()
    if name.startswith("SMPP_ESME_") and isinstance(value, int)
}


def status_name(status: int) -> str:
    """``ESME_RTHROTTLED`` for 0x58; the hex code for a status SMPP 3.4 does not name."""
    return STATUS_NAMES.get(status, f"0x{status:08X}")


# ---------------------------------------------------------------------------------------------
# What the gateway hands in and gets back
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubmitPart:
    """One short message to submit (one part of an invitation, SPEC R3.1)."""

    destination: str  # citizen's number as digits
    source: str  # source_addr + extension code (SPEC R3.6)
    short_message: bytes  # UDH + UCS2 payload, from gateway.sms.text.Part.short_message
    esm_class: int  # 0x40 when a UDH is present
    data_coding: int = 8
    registered_delivery: int = 1
    urgent: bool = False  # an answer to a citizen's own message: ahead of bulk (SPEC R3.7a)


class SubmitRejected(Exception):
    """The SMSC answered the submit with an error status other than throttling."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.name = status_name(status)
        self.permanent = is_permanent(status)
        kind = "permanently" if self.permanent else "for now"
        super().__init__(f"the SMSC refused the message {kind}: {self.name} (0x{status:08X})")


class SubmitOutcomeUnknown(Exception):
    """The submit was written to the socket, but no answer came: the link dropped or it timed out.

    The SMSC may or may not have accepted it; sending it again may deliver it twice.
    """


class SubmitTimedOut(SubmitOutcomeUnknown):
    """No answer within the response timeout on a link that stays up: a slow or overloaded SMSC.

    Sending again at once would likely deliver it twice and load the SMSC more; the gateway
    counts it as a failed attempt instead, retried after ``retry_delay`` (bounded, SPEC R3.7).
    """


class NotSubmitted(Exception):
    """The submit was never written (the client is stopping); it is safe to send again."""


# ---------------------------------------------------------------------------------------------
# smpplib, wrapped
# ---------------------------------------------------------------------------------------------


class _Sequence:
    """Sequence numbers 1, 2, … 0x7FFFFFFF, 1, … (smpplib's own generator starts at 2)."""

    def __init__(self) -> None:
        self.sequence = 0

    def next_sequence(self) -> int:
        self.sequence = self.sequence % 0x7FFFFFFF + 1
        return self.sequence


class _NoSequence:
    """Parsing client: smpplib takes a sequence number for every PDU it parses; this gives 0."""

    sequence = 0

    def next_sequence(self) -> int:
        return 0


_PARSING = _NoSequence()


class _Client(smpplib.client.Client):  # type: ignore[misc]
    """One smpplib client per TCP connection, used by the I/O thread alone.

    It numbers the requests; the thread creates the socket (smpplib's is IPv4 only) and does the
    connecting, reading and writing.
    """

    def __init__(self, host: str, port: int, timeout: float) -> None:
        super().__init__(
            host,
            port,
            timeout=timeout,
            sequence_generator=_Sequence(),
            allow_unknown_opt_params=True,
            logger_name="gateway.sms.smpplib",
        )

    def __del__(self) -> None:  # the thread closes the socket itself
        pass


def _parse(raw: bytes) -> Any:
    return smpplib.smpp.parse_pdu(raw, client=_PARSING, allow_unknown_opt_params=True)


@functools.cache
def _response_template(command: str) -> bytes:
    pdu = smpplib.smpp.make_pdu(command, client=_PARSING)
    pdu.sequence = 0
    return bytes(pdu.generate())


def _response(command: str, sequence: int, status: int = ESME_ROK) -> bytes:
    """An answer PDU as smpplib builds it, with its status and sequence number written in.

    Built once per command and patched, as one is written for every receipt (smpplib takes
    about 20 µs to build each).
    """
    template = _response_template(command)
    return template[:8] + struct.pack(">LL", status, sequence) + template[16:]


# ---------------------------------------------------------------------------------------------
# The I/O thread
# ---------------------------------------------------------------------------------------------


#: One address of the SMSC as getaddrinfo gives it: family, socket type, protocol, socket address.
_Address = tuple[socket.AddressFamily, socket.SocketKind, int, Any]


def _host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets (``[::1]:2775``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class _Queued:
    token: int
    part: SubmitPart
    queue_full: int = 0  # times the SMSC answered ESME_RMSGQFUL for it
    not_before: float = 0.0  # after a queue full: not sent again before then (the link's clock)


@dataclass
class _Connection:
    """One TCP connection and its bind: a transceiver, or the transmitter or receiver of a pair."""

    ident: int
    role: str  # "transceiver" | "transmitter" | "receiver"
    client: _Client
    sock: socket.socket
    phase: str = "connecting"  # connecting → binding → bound → unbinding
    deadline: float = 0.0  # for connecting, binding, unbinding
    bind_sequence: int = 0
    out: bytearray = field(default_factory=bytearray)
    framer: PduFramer = field(default_factory=PduFramer)
    last_received: float = 0.0
    enquire_deadline: float | None = None
    address: str = ""  # the address being connected to, as [::1]:2775 or 192.0.2.1:2775
    addresses: list[_Address] = field(default_factory=list)  # those left to try if that connect fails
    resolved: int = 1  # how many addresses the host name gave

    @property
    def sends(self) -> bool:
        return self.role in ("transceiver", "transmitter")


class LinkDropped(Exception):
    """The connection cannot go on; the reason is worded for the log and ``state()``."""


class _Link:
    """The I/O loop of one SMPP link: connects, binds, paces submits, reads, reconnects."""

    def __init__(
        self,
        config: SmppConfig,
        emit: Callable[[list[tuple[Any, ...]]], None],
        clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self.config = config
        self._emit = emit
        self._clock = clock
        self.commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._woken = False
        self.pacer = Pacer(
            config.rate,
            throttle_delay=config.throttle_delay,
            throttle_max_delay=config.throttle_max_delay,
            recovery=config.throttle_recovery,
        )
        self.window: Window[_Queued] = Window(config.window, config.response_timeout)
        # The delays go back to the minimum only after the link stayed bound this long (see Backoff):
        # at least the longest reconnect delay, and at least long enough for an enquire_link to be due,
        # so that a link that cannot carry even the keep-alive does not count as up.
        self.backoff = Backoff(
            config.reconnect_min_delay,
            config.reconnect_max_delay,
            rng,
            stable_after=max(config.reconnect_max_delay, config.enquire_link_interval),
        )
        self.pending: deque[_Queued] = deque()
        self.urgent: deque[_Queued] = deque()  # answers to citizens, sent before the pending bulk
        self.retry: deque[_Queued] = deque()  # throttled parts, sent again before the pending ones
        self.later: list[_Queued] = []  # parts whose destination's queue was full, each with its own pause
        # Submits unanswered in time, held until a probe (enquire_link) says whether the link is alive.
        self.suspects: dict[int, Outstanding[_Queued]] = {}  # by sequence: a late answer still counts
        self.connections: list[_Connection] = []
        self._next_ident = 0
        self._reconnect_at = 0.0
        self._events: list[tuple[Any, ...]] = []
        self._stopping = False
        self._stop_deadline = 0.0
        self._done = False
        self._draining: str | None = None
        self._drain_deadline = 0.0
        # read by SmppClient.state() from the reactor thread (plain attribute reads)
        self.bound = False
        self.phase = "disconnected"
        self.submitted_total = 0
        self.errors_total = 0
        self.throttled_total = 0
        self.reconnects = 0
        self.last_error: str | None = None

    # -- from the reactor thread -------------------------------------------------------------------

    def command(self, *command: Any) -> None:
        self.commands.put(command)
        if not self._woken:
            self._woken = True
            # full (the thread is far behind, and will wake anyway) or closed (stopped)
            with contextlib.suppress(OSError):
                self._wake_w.send(b"w")

    # -- the loop -----------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self._done:
                try:
                    self._iterate()
                except Exception as error:  # a bug or a surprise: log it, drop the link, go on
                    log.exception("event=smpp.loop_error error=%s", type(error).__name__)
                    self._drop(f"internal error: {type(error).__name__}: {error}")
                self._flush_events()
        finally:
            self._finish()

    def _iterate(self) -> None:
        now = self._clock()
        readable, writable = self._wait(now)
        now = self._clock()
        if self._wake_r in readable:
            self._drain_wake()
        self._take_commands(now)
        for conn in list(self.connections):
            if conn not in self.connections:
                continue
            try:
                if conn.sock in writable:
                    if conn.phase == "connecting":
                        self._connected(conn, now)
                    else:
                        self._write(conn)
                if conn.sock in readable and conn in self.connections:
                    self._read(conn, now)
            except LinkDropped as error:
                self._drop(str(error))
        try:
            self._timers(now)
            self._send_submits(now)
            for conn in self.connections:
                if conn.out:
                    self._write(conn)
        except LinkDropped as error:
            self._drop(str(error))
        self._check_stopped(now)

    def _wait(self, now: float) -> tuple[list[Any], list[Any]]:
        wake_at = self._next_wakeup(now)
        timeout = min(max(0.0, wake_at - now), 1.0)
        reads: list[Any] = [self._wake_r]
        writes: list[Any] = []
        for conn in self.connections:
            if conn.phase == "connecting":
                writes.append(conn.sock)
            else:
                reads.append(conn.sock)
                if conn.out:
                    writes.append(conn.sock)
        readable, writable, _ = select.select(reads, writes, [], timeout)
        return readable, writable

    def _next_wakeup(self, now: float) -> float:
        times: list[float] = [now + 1.0]
        if not self.connections and not self._stopping:
            times.append(self._reconnect_at)
        for conn in self.connections:
            if conn.phase in ("connecting", "binding", "unbinding"):
                times.append(conn.deadline)
            if conn.phase == "bound":
                times.append(conn.enquire_deadline or conn.last_received + self.config.enquire_link_interval)
        deadline = self.window.next_deadline()
        if deadline is not None:
            times.append(deadline)
        if (self.pending or self.urgent or self.retry) and self.bound and self.window.has_room and not self._stopping:
            times.append(self.pacer.next_send_at(now))
        if self.later:
            times.append(min(queued.not_before for queued in self.later))
        if self._stopping:
            times.append(self._stop_deadline)
        if self._draining is not None:
            times.append(self._drain_deadline)
        return min(times)

    def _drain_wake(self) -> None:
        """Empty the wake-up socket, then let the reactor wake us again; commands are taken after.

        In this order no wake-up is lost: a command put while the socket is drained finds the
        flag still set and sends nothing, but is taken just after; one put after the flag is
        cleared sends a byte. Clearing first lost one: a byte sent between the clearing and the
        draining was swallowed with the flag left set, and the next command waited for select's
        one-second timeout.
        """
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        self._woken = False

    # -- commands from the reactor ------------------------------------------------------------------

    def _take_commands(self, now: float) -> None:
        while True:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return
            kind = command[0]
            if kind == "submit":
                if self._stopping:
                    self._events.append(("not_submitted", command[1]))
                else:
                    self._queue(_Queued(command[1], command[2]))
            elif kind == "ack":
                self._ack(command[1], command[2], command[3], command[4])
            elif kind == "stop":
                self._begin_stop(now)
            elif kind == "withdraw_bulk":
                self._withdraw_bulk()

    def _queue(self, queued: _Queued) -> None:
        (self.urgent if queued.part.urgent else self.pending).append(queued)

    def _withdraw_bulk(self) -> None:
        """Give back the bulk parts not written yet: they wait in the store, not here (SPEC R3.2)."""
        for waiting in (self.retry, self.pending):
            kept = [queued for queued in waiting if queued.part.urgent]
            for queued in waiting:
                if not queued.part.urgent:
                    self._events.append(("not_submitted", queued.token))
            waiting.clear()
            waiting.extend(kept)
        for queued in self.later:
            if not queued.part.urgent:
                self._events.append(("not_submitted", queued.token))
        self.later = [queued for queued in self.later if queued.part.urgent]

    def _ack(self, ident: int, sequence: int, status: int, response: str) -> None:
        """deliver_sm_resp once the gateway has stored the message (SPEC R3.7a), ahead of submits."""
        for conn in self.connections:
            if conn.ident == ident and conn.phase in ("bound", "unbinding"):
                conn.out += _response(response, sequence, status)
                return
        # That connection is gone: the SMSC delivers the message again on the next one.

    def _begin_stop(self, now: float) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._stop_deadline = now + self.config.response_timeout
        for waiting in (self.retry, self.urgent, self.pending):
            while waiting:
                self._events.append(("not_submitted", waiting.popleft().token))
        for queued in self.later:
            self._events.append(("not_submitted", queued.token))
        self.later = []

    def _check_stopped(self, now: float) -> None:
        if not self._stopping:
            return
        if len(self.window) and now < self._stop_deadline and (self.bound or self._draining is not None):
            return
        for entry in self.window.drain():
            self._unknown(entry.item.token, "the client stopped before the SMSC answered")
        unbinding = [c for c in self.connections if c.phase == "unbinding"]
        for conn in self.connections:
            if conn.phase == "bound":
                pdu = smpplib.smpp.make_pdu("unbind", client=conn.client)
                conn.out += pdu.generate()
                conn.phase = "unbinding"
                conn.deadline = now + min(self.config.response_timeout, 2.0)
                unbinding.append(conn)
        if unbinding and now < max(c.deadline for c in unbinding):
            return
        self._close_all()
        self._done = True

    # -- connecting and binding ---------------------------------------------------------------------

    def _timers(self, now: float) -> None:
        if not self.connections and not self._stopping and now >= self._reconnect_at:
            self._connect(now)
        if self._draining is not None and (not len(self.window) or now >= self._drain_deadline):
            raise LinkDropped(self._draining)
        for conn in list(self.connections):
            if conn.phase == "connecting" and now >= conn.deadline:
                self._connect_failed(conn, "no answer", now)
            if conn.phase == "binding" and now >= conn.deadline:
                raise LinkDropped(f"the SMSC did not answer the {conn.role} bind within the response timeout")
            if conn.phase == "unbinding" and now >= conn.deadline:
                conn.phase = "closing"
            if conn.phase == "bound":
                if conn.enquire_deadline is not None and now >= conn.enquire_deadline:
                    raise LinkDropped("the SMSC stopped answering (no enquire_link_resp)")
                if conn.enquire_deadline is None and now - conn.last_received >= self.config.enquire_link_interval:
                    conn.out += smpplib.smpp.make_pdu("enquire_link", client=conn.client).generate()
                    conn.enquire_deadline = now + self.config.response_timeout
        for entry in self.window.expired(now):
            self.errors_total += 1
            if self.bound and self._draining is None:
                self.suspects[entry.sequence] = entry
            else:
                self._unknown(entry.item.token, "no submit_sm_resp, and the link is going down")
        if self.suspects:
            self._probe(now)
        if self.later:
            due = [queued for queued in self.later if queued.not_before <= now]
            if due:
                self.later = [queued for queued in self.later if queued.not_before > now]
                for queued in due:
                    self._queue(queued)

    def _probe(self, now: float) -> None:
        """Ask the SMSC whether the link is alive: its answer makes the unanswered submits slow, not lost.

        A half-open link would otherwise be noticed only at the next keep-alive, after every
        submit in the window had timed out as if the SMSC were merely slow.
        """
        conn = next((c for c in self.connections if c.sends and c.phase == "bound"), None)
        if conn is None:
            return
        if conn.enquire_deadline is None:
            conn.out += smpplib.smpp.make_pdu("enquire_link", client=conn.client).generate()
            conn.enquire_deadline = now + self.config.response_timeout

    def _link_alive(self) -> None:
        for entry in self.suspects.values():
            self._events.append(("timed_out", entry.item.token, "no submit_sm_resp within the response timeout"))
        self.suspects = {}

    def _connect(self, now: float) -> None:
        """Start connecting each connection of the link to the first address of the SMSC that takes it.

        The host name is resolved here, on the link's I/O thread like the connect itself, so that a
        slow resolver holds up this link only, never the reactor.
        """
        roles = ["transceiver"] if self.config.bind_mode == "transceiver" else ["transmitter", "receiver"]
        self.phase = "connecting"
        try:
            addresses = self._resolve()
        except OSError as error:  # e.g. the host name does not resolve
            raise LinkDropped(f"cannot connect to {self._where()}: {error}") from None
        for role in roles:
            client = _Client(self.config.host, self.config.port, self.config.response_timeout)
            sock, address, left = self._open(addresses, len(addresses))
            self._next_ident += 1
            conn = _Connection(self._next_ident, role, client, sock, deadline=now + self.config.response_timeout)
            conn.address, conn.addresses, conn.resolved = address, left, len(addresses)
            self.connections.append(conn)

    def _where(self) -> str:
        return _host_port(self.config.host, self.config.port)

    def _resolve(self) -> list[_Address]:
        """The SMSC's addresses, IPv6 and IPv4, in the order getaddrinfo prefers them (RFC 6724)."""
        found = socket.getaddrinfo(self.config.host, self.config.port, socket.AF_UNSPEC, socket.SOCK_STREAM)
        if not found:
            raise OSError(f"no address for {self.config.host}")
        return [(family, kind, proto, sockaddr) for family, kind, proto, _, sockaddr in found]

    def _open(self, addresses: list[_Address], resolved: int) -> tuple[socket.socket, str, list[_Address]]:
        """A non-blocking connect to the first of ``addresses`` that does not fail at once.

        Returns the socket, the address it connects to and the addresses left to try after it, in
        the order ``socket.create_connection`` tries them; LinkDropped if every one failed at once.
        ``addresses`` is never empty.
        """
        while True:
            (family, kind, proto, sockaddr), addresses = addresses[0], addresses[1:]
            address = _host_port(sockaddr[0], sockaddr[1])
            sock: socket.socket | None = None
            try:
                sock = socket.socket(family, kind, proto)  # EAFNOSUPPORT where IPv6 is disabled
                sock.setblocking(False)
                code = sock.connect_ex(sockaddr)
            except OSError as error:
                code = error.errno or 0
                reason = errno.errorcode.get(code, str(error))
            else:
                if code in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
                    return sock, address, addresses
                reason = errno.errorcode.get(code, str(code))
            if sock is not None:
                sock.close()
            if not addresses:
                raise LinkDropped(self._cannot_connect(reason, address, resolved))
            log.info("event=smpp.connect_failed address=%s error=%s addresses_left=%d", address, reason, len(addresses))

    def _cannot_connect(self, reason: str, address: str, resolved: int) -> str:
        if resolved > 1:
            reason = f"{reason} at {address}, the last of {resolved} addresses"
        return f"cannot connect to {self._where()}: {reason}"

    def _connect_failed(self, conn: _Connection, reason: str, now: float) -> None:
        """The connect to ``conn.address`` failed: go on with the next address, or drop the link."""
        if not conn.addresses:
            raise LinkDropped(self._cannot_connect(reason, conn.address, conn.resolved))
        log.info(
            "event=smpp.connect_failed address=%s error=%s addresses_left=%d", conn.address, reason, len(conn.addresses)
        )
        conn.sock.close()
        conn.sock, conn.address, conn.addresses = self._open(conn.addresses, conn.resolved)
        conn.deadline = now + self.config.response_timeout

    def _connected(self, conn: _Connection, now: float) -> None:
        code = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._connect_failed(conn, errno.errorcode.get(code, str(code)), now)
            return
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.client._socket = conn.sock
        conn.client.state = smpplib.consts.SMPP_CLIENT_STATE_OPEN
        command = f"bind_{conn.role}"
        pdu = smpplib.smpp.make_pdu(
            command,
            client=conn.client,
            system_id=self.config.system_id,
            password=self.config.password,
            system_type=self.config.system_type,
            addr_ton=0,
            addr_npi=0,
            address_range="",
        )
        conn.bind_sequence = pdu.sequence
        conn.out += pdu.generate()
        conn.phase = "binding"
        conn.deadline = now + self.config.response_timeout
        conn.last_received = now
        self.phase = "binding"

    def _bind_answered(self, conn: _Connection, header: Header, now: float) -> None:
        if header.status != ESME_ROK:
            name = status_name(header.status)
            self.backoff.attempts = max(self.backoff.attempts, 3)  # do not hammer an SMSC refusing us
            hint = (
                "check [smpp] system_id and password"
                if header.status in (0x0E, 0x0F, 0x0D)
                else "check [smpp] system_type and bind_mode"
            )
            log.error(
                "event=smpp.bind_refused role=%s status=%s system_id=%s host=%s port=%s: the SMSC refused the bind; %s",
                conn.role,
                name,
                self.config.system_id,
                self.config.host,
                self.config.port,
                hint,
            )
            raise LinkDropped(f"the SMSC refused the {conn.role} bind: {name}; {hint}")
        conn.phase = "bound"
        conn.client.state = smpplib.consts.STATE_SETTERS[f"bind_{conn.role}_resp"]
        conn.last_received = now
        if all(c.phase == "bound" for c in self.connections):
            self.bound = True
            self.phase = "bound"
            self.backoff.bound(now)  # the delays are reset only if the link stays up (a flapping SMSC)
            log.info(
                "event=smpp.bound mode=%s host=%s port=%s system_id=%s",
                self.config.bind_mode,
                self.config.host,
                self.config.port,
                self.config.system_id,
            )
            self._events.append(("bound",))

    # -- writing --------------------------------------------------------------------------------------

    def _send_submits(self, now: float) -> None:
        if not self.bound or self._stopping or self._draining is not None:
            return
        conn = next(c for c in self.connections if c.sends)
        config = self.config
        pacer, window, pending, urgent, retry = self.pacer, self.window, self.pending, self.urgent, self.retry
        while (retry or urgent or pending) and window.has_room and pacer.ready(now):
            queued = retry.popleft() if retry else urgent.popleft() if urgent else pending.popleft()
            part = queued.part
            sequence = conn.client.next_sequence()
            try:
                raw = encode_submit_sm(
                    sequence,
                    source_addr_ton=config.source_addr_ton,
                    source_addr_npi=config.source_addr_npi,
                    source_addr=part.source,
                    dest_addr_ton=config.dest_addr_ton,
                    dest_addr_npi=config.dest_addr_npi,
                    destination_addr=part.destination,
                    esm_class=part.esm_class,
                    registered_delivery=part.registered_delivery,
                    data_coding=part.data_coding,
                    short_message=part.short_message,
                )
            except (ValueError, UnicodeEncodeError) as error:  # the caller's mistake, said plainly
                self._events.append(("rejected_locally", queued.token, str(error)))
                continue
            conn.out += raw
            window.open(sequence, queued, now)
            pacer.sent(now)

    def _write(self, conn: _Connection) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            return
        except OSError as error:
            raise LinkDropped(f"the connection to the SMSC broke while writing: {error.strerror or error}") from None
        del conn.out[:sent]

    # -- reading --------------------------------------------------------------------------------------

    def _read(self, conn: _Connection, now: float) -> None:
        try:
            data = conn.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError as error:
            raise LinkDropped(f"the connection to the SMSC broke: {error.strerror or error}") from None
        if not data:
            if conn.phase == "unbinding":
                conn.phase = "closing"
                return
            raise LinkDropped("the SMSC closed the connection")
        garbled: str | None = None
        try:
            pdus = conn.framer.feed(data)
        except FramingError as error:
            pdus, garbled = error.pdus, f"garbled data from the SMSC: {error}"
        conn.last_received = now
        for raw in pdus:
            self._handle(conn, raw, now)
        if garbled is not None:
            self.errors_total += 1
            log.warning("event=smpp.garbled_stream in_flight=%d", len(self.window))
            if not conn.sends or not len(self.window) or conn not in self.connections:
                raise LinkDropped(garbled)
            # Answers written after the garbage are still worth reading: each one read is a part
            # that will not be sent twice. Wind the link down, then reconnect.
            self._begin_drain(garbled, now)
            window = self.window
            for raw in conn.framer.resync(
                lambda h: (
                    h.command_id == SUBMIT_SM_RESP
                    and h.length <= HEADER_LENGTH + 65
                    and (h.sequence in window or h.sequence in self.suspects)
                )
            ):
                self._handle(conn, raw, now)

    def _handle(self, conn: _Connection, raw: bytes, now: float) -> None:
        header = read_header(raw)
        if header.command_id == SUBMIT_SM_RESP:
            if conn.sends:  # the receiver of a pair numbers its own requests from 1 too
                self._submit_answered(header, raw, now)  # the hot path: read without smpplib
            return
        if conn.phase == "binding" and header.sequence == conn.bind_sequence and header.is_response:
            self._bind_answered(conn, header, now)
            return
        if header.command_id in (DELIVER_SM, DATA_SM):
            self._incoming(conn, header, raw)
            return
        try:
            pdu = _parse(raw)
        except Exception as error:
            self.errors_total += 1
            if header.is_response:
                log.warning("event=smpp.garbled_pdu command_id=0x%08X error=%s", header.command_id, error)
            else:
                unknown = isinstance(error, smpplib.exceptions.UnknownCommandError)
                status = ESME_RINVCMDID if unknown else ESME_RINVCMDLEN
                log.warning(
                    "event=smpp.garbled_pdu command_id=0x%08X answer=generic_nack status=%s",
                    header.command_id,
                    status_name(status),
                )
                conn.out += _response("generic_nack", header.sequence, status)
            return
        command = pdu.command
        if command == "enquire_link":
            conn.out += _response("enquire_link_resp", header.sequence)
        elif command == "enquire_link_resp":
            conn.enquire_deadline = None
            if conn.sends:
                self._link_alive()
        elif command == "unbind":
            conn.out += _response("unbind_resp", header.sequence)
            self._write(conn)
            log.warning("event=smpp.unbound_by_smsc role=%s in_flight=%d", conn.role, len(self.window))
            if not conn.sends or not len(self.window):
                raise LinkDropped("the SMSC unbound")
            self._begin_drain("the SMSC unbound", now)  # its answers to what is in flight may follow
        elif command == "unbind_resp":
            conn.phase = "closing"
        elif command == "generic_nack":
            self._generic_nack(conn, header)
        elif command == "alert_notification":
            pass
        elif pdu.is_request():
            conn.out += _response("generic_nack", header.sequence, ESME_RINVCMDID)
        else:
            log.info("event=smpp.unexpected_pdu command=%s", command)

    def _incoming(self, conn: _Connection, header: Header, raw: bytes) -> None:
        """A reply or receipt: handed to the gateway, answered once it is stored (SPEC R3.7a)."""
        if conn.phase == "draining":
            return  # it can no longer be acknowledged: the SMSC delivers it again after the reconnect
        response = "deliver_sm_resp" if header.command_id == DELIVER_SM else "data_sm_resp"
        try:
            message = decode_incoming(raw)
        except PduDecodeError as error:
            self.errors_total += 1
            log.warning("event=smpp.garbled_pdu command=%s error=%r answer=generic_nack", response[:-5], str(error))
            conn.out += _response("generic_nack", header.sequence, ESME_RINVCMDLEN)
            return
        self._events.append(("deliver", conn.ident, header.sequence, message, response))

    def _submit_answered(self, header: Header, raw: bytes, now: float) -> None:
        # A submit that timed out is still answered until the probe decides (SPEC R3.7: an
        # acknowledgement taken is a part never sent again).
        entry = self.window.close(header.sequence) or self.suspects.pop(header.sequence, None)
        if entry is None:
            log.warning("event=smpp.late_submit_resp status=%s", status_name(header.status))
            return
        token = entry.item.token
        status = header.status
        if status == ESME_ROK:
            message_id = raw[16:].split(b"\x00", 1)[0].decode("latin-1")
            self.submitted_total += 1
            self._events.append(("ok", token, message_id))
        elif status in THROTTLING_STATUSES:
            self._throttled(entry, status, now)
        elif status == ESME_RINVBNDSTS:
            # The SMSC lost our session (a failover): the part was not taken. It goes again
            # first, on a new bind; one that keeps saying so is a link that keeps dropping, and
            # the reconnects back off as for any other drop.
            self.errors_total += 1
            self.retry.append(entry.item)
            if self._draining is None:
                self._begin_drain("the SMSC answered ESME_RINVBNDSTS: it no longer knows this bind", now)
        else:
            self.errors_total += 1
            self._events.append(("rejected", token, status))

    def _throttled(self, entry: Any, status: int, now: float) -> None:
        """Slow the link down (SPEC R3.7: a throttled re-send never loses the mapping).

        ``ESME_RTHROTTLED`` is about the link: the same part goes again first, when the pause
        ends. ``ESME_RMSGQFUL`` is often one destination's full queue: the part goes again after
        those waiting, so that one handset's queue cannot hold the head of the link at every
        pause. Neither is dropped, nor counted as a failed attempt.
        """
        self.throttled_total += 1
        before = self.pacer.pace(now)
        resume = now
        queued = entry.item
        if status == ESME_RMSGQFUL:
            queued.queue_full += 1
            pause = self.config.throttle_delay * 2 ** min(queued.queue_full - 1, MAX_QUEUE_FULL_DOUBLINGS)
            queued.not_before = now + min(pause, self.config.throttle_max_delay)
        if queued.queue_full <= 1:  # the same part full again is its destination, not the link
            resume = self.pacer.throttled(now, entry.sent_at)
        if self._stopping:
            self._events.append(("not_submitted", queued.token))
        elif status == ESME_RMSGQFUL:
            self.later.append(queued)  # after its own pause, behind the others
        else:
            self.retry.append(entry.item)  # the same part goes again, before the queue, in order
        after = self.pacer.pace(now)
        (log.info if after < before else log.debug)(
            "event=smpp.throttled status=%s pace=%.2f resume_in=%.2f",
            status_name(status),
            after,
            max(0.0, resume - now),
        )

    def _generic_nack(self, conn: _Connection, header: Header) -> None:
        if conn.phase == "binding" and header.sequence == conn.bind_sequence:
            raise LinkDropped(f"the SMSC refused the bind with generic_nack {status_name(header.status)}")
        log.warning("event=smpp.generic_nack status=%s", status_name(header.status))
        # Only the sending connection's requests are in the window: the receiver of a pair numbers
        # its own (enquire_link) from 1 too, and a nack of one of those is no submit's answer.
        entry = None
        if header.sequence and conn.sends:
            entry = self.window.close(header.sequence) or self.suspects.pop(header.sequence, None)
        if entry is not None and header.status in THROTTLING_STATUSES:  # some SMSCs throttle this way
            self._throttled(entry, header.status, self._clock())
        elif entry is not None:
            self.errors_total += 1
            self._events.append(("rejected", entry.item.token, header.status or ESME_RINVCMDID))

    # -- dropping and stopping ------------------------------------------------------------------------

    def _begin_drain(self, reason: str, now: float) -> None:
        """Send nothing more on this link; read answers to what is in flight, then reconnect."""
        if self._draining is not None:
            return
        self._draining = reason
        self._drain_deadline = now + self.config.response_timeout
        for conn in self.connections:
            if conn.phase == "bound":
                conn.phase = "draining"
        if self.bound:
            self.bound = False
            self._events.append(("unbound", reason))
        self.phase = "draining"
        log.warning("event=smpp.draining reason=%r in_flight=%d", reason, len(self.window))

    def _unknown(self, token: int, reason: str) -> None:
        self._events.append(("unknown", token, reason))

    def _drop(self, reason: str) -> None:
        """Close the link; what was in flight has an unknown outcome; reconnect after a backoff."""
        self._harvest_answers(self._clock())
        was_bound = self.bound
        if self._draining is not None and reason != self._draining:
            reason = f"{self._draining}; then {reason}"
        self._draining = None
        self.last_error = reason
        lost = self.window.drain()
        for entry in lost:
            self._unknown(entry.item.token, f"the link dropped before the SMSC answered ({reason})")
        for entry in self.suspects.values():
            self._unknown(entry.item.token, f"no submit_sm_resp, then the link dropped ({reason})")
        self.suspects = {}
        self._close_all()
        if self._stopping:
            self._done = True
            return
        now = self._clock()
        delay = self.backoff.dropped(now)
        self._reconnect_at = now + delay
        self.reconnects += 1
        self.phase = "backoff"
        log.warning("event=smpp.link_down reason=%r in_flight_lost=%d reconnect_in=%.2f", reason, len(lost), delay)
        if was_bound:
            self._events.append(("unbound", reason))

    def _harvest_answers(self, now: float) -> None:
        """Before dropping the link, take the submit answers already in the sockets (SPEC R3.7).

        An SMSC that closes or resets the connection may have answered parts just before. A send
        that fails on the reset (the loop writes before it reads) would drop the link with those
        answers unread, and parts the SMSC acknowledged would be sent again. The kernel still
        hands out what arrived before a reset, so each answer read here is a part not sent twice.
        Nothing else is taken: a message delivered now can no longer be acknowledged, and the
        SMSC delivers it again after the reconnect.
        """
        for conn in self.connections:
            if conn.phase == "connecting" or not conn.sends:
                continue
            for _ in range(64):  # at most 16 MiB: a peer that keeps sending cannot hold the drop up
                try:
                    data = conn.sock.recv(262144, socket.MSG_DONTWAIT)
                except OSError:  # nothing more to read (EAGAIN), or the reset itself
                    break
                if not data:
                    break
                try:
                    pdus, garbled = conn.framer.feed(data), False
                except FramingError as error:
                    pdus, garbled = error.pdus, True
                for raw in pdus:
                    header = read_header(raw)
                    if header.command_id == SUBMIT_SM_RESP:
                        self._submit_answered(header, raw, now)
                if garbled:
                    break

    def _close_all(self) -> None:
        for conn in self.connections:
            try:
                if conn.out and conn.phase != "connecting":
                    conn.sock.send(conn.out)
            except OSError:
                pass
            conn.sock.close()
            conn.client._socket = None
            conn.client.state = smpplib.consts.SMPP_CLIENT_STATE_CLOSED
        self.connections = []
        self.bound = False
        self.phase = "disconnected"

    def _flush_events(self) -> None:
        if self._events:
            events, self._events = self._events, []
            self._emit(events)

    def _finish(self) -> None:
        """However the loop ended, every submit it holds is resolved, and the reactor is told."""
        for entry in self.window.drain():
            self._unknown(entry.item.token, "the client stopped before the SMSC answered")
        for waiting in (self.retry, self.urgent, self.pending):
            while waiting:
                self._events.append(("not_submitted", waiting.popleft().token))
        for queued in self.later:
            self._events.append(("not_submitted", queued.token))
        self.later = []
        for entry in self.suspects.values():
            self._unknown(entry.item.token, "the client stopped before the SMSC answered")
        self.suspects = {}
        while True:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "submit":
                self._events.append(("not_submitted", command[1]))
        self._close_all()
        self.phase = "stopped"
        self._events.append(("stopped",))
        self._flush_events()
        self._wake_r.close()
        self._wake_w.close()


# ---------------------------------------------------------------------------------------------
# The Twisted service
# ---------------------------------------------------------------------------------------------


class SmppClient(Service):
    """The gateway's SMPP client: a Twisted service that owns one link and its I/O thread."""

    def __init__(
        self,
        config: SmppConfig,
        reactor: Any,
        on_deliver: Callable[[DeliverSm], defer.Deferred[None]],
        *,
        clock_for_tests: Callable[[], float] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._reactor = reactor
        self._on_deliver = on_deliver
        self._clock = clock_for_tests or time.monotonic
        self._rng = rng or random.Random()
        self._next_token = 0
        self._waiting: dict[int, defer.Deferred[str]] = {}
        self._bound_waiters: list[defer.Deferred[None]] = []
        self._stopped_waiters: list[defer.Deferred[None]] = []
        self._bound = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._link = self._new_link()

    def _new_link(self) -> _Link:
        return _Link(self.config, self._from_thread, self._clock, self._rng)

    # -- the API ----------------------------------------------------------------------------------

    def submit(self, part: SubmitPart) -> defer.Deferred[str]:
        """Send one part; fires with the SMSC's message_id, or fails (see the module docstring).

        May be called at any time: before the link is bound the part waits in the queue. A part
        that cannot be encoded (an address over 20 characters, a short message over 254 octets)
        fails with ValueError without being sent.
        """
        if self._stopping:
            return defer.fail(NotSubmitted("the SMPP client is stopping; send the part again later"))
        self._next_token += 1
        token = self._next_token
        waiting: defer.Deferred[str] = defer.Deferred()
        self._waiting[token] = waiting
        self._link.command("submit", token, part)
        return waiting

    def withdraw_bulk(self) -> None:
        """Bulk parts not written yet fail with :class:`NotSubmitted`, to be claimed again later.

        The quiet hours (SPEC R3.2) are checked when messages are claimed; parts that waited here
        for a link that was down or throttled must not go out after they begin.
        """
        if not self._stopping:
            self._link.command("withdraw_bulk")

    def when_bound(self) -> defer.Deferred[None]:
        if self._bound:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._bound_waiters.append(waiter)
        return waiter

    def state(self) -> dict[str, Any]:
        link = self._link
        return {
            "bound": link.bound,
            "phase": link.phase,
            "bind_mode": self.config.bind_mode,
            "window_in_use": len(link.window),
            "window": self.config.window,
            "rate": self.config.rate,
            "pace": round(link.pacer.pace(self._clock()), 3),
            "queued": max(0, len(self._waiting) - len(link.window)),
            "submitted_total": link.submitted_total,
            "errors_total": link.errors_total,
            "throttled_total": link.throttled_total,
            "reconnects": link.reconnects,
            "last_error": link.last_error,
        }

    # -- Service ----------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._thread is not None:
            return
        if self._link.phase == "stopped":
            self._link = self._new_link()  # started again after a stop: afresh
        self._stopping = False
        self._thread = threading.Thread(target=self._link.run, name="smpp-link", daemon=True)
        self._thread.start()

    def stopService(self) -> defer.Deferred[None]:
        """Unbind politely and end the I/O thread, without blocking the reactor.

        Queued parts fail with :class:`NotSubmitted`; parts in flight get their answer, or
        :class:`SubmitOutcomeUnknown` after the response timeout.
        """
        super().stopService()
        self._stopping = True
        if self._link.phase == "stopped":
            return defer.succeed(None)
        if self._thread is None:
            self._link._finish()
            return defer.succeed(None)
        stopped: defer.Deferred[None] = defer.Deferred()
        self._stopped_waiters.append(stopped)
        self._link.command("stop")
        return stopped

    # -- from the I/O thread ----------------------------------------------------------------------

    def _from_thread(self, events: list[tuple[Any, ...]]) -> None:
        if self._thread is None or threading.current_thread() is not self._thread:
            self._handle_events(events)  # the thread never started: already on the reactor
        else:
            self._reactor.callFromThread(self._handle_events, events)

    def _handle_events(self, events: list[tuple[Any, ...]]) -> None:
        for event in events:
            kind = event[0]
            if kind == "ok":
                self._resolve(event[1], event[2])
            elif kind == "rejected":
                self._fail(event[1], SubmitRejected(event[2]))
            elif kind == "unknown":
                self._fail(event[1], SubmitOutcomeUnknown(event[2]))
            elif kind == "timed_out":
                self._fail(event[1], SubmitTimedOut(event[2]))
            elif kind == "not_submitted":
                self._fail(event[1], NotSubmitted("the SMPP client stopped before sending the part"))
            elif kind == "rejected_locally":
                self._fail(event[1], ValueError(f"the part cannot be encoded as a submit_sm: {event[2]}"))
            elif kind == "deliver":
                self._deliver(event[1], event[2], event[3], event[4])
            elif kind == "bound":
                self._bound = True
                waiters, self._bound_waiters = self._bound_waiters, []
                for waiter in waiters:
                    waiter.callback(None)
            elif kind == "unbound":
                self._bound = False
            elif kind == "stopped":
                self._stopped()

    def _resolve(self, token: int, message_id: str) -> None:
        waiting = self._waiting.pop(token, None)
        if waiting is not None:
            waiting.callback(message_id)

    def _fail(self, token: int, error: Exception) -> None:
        waiting = self._waiting.pop(token, None)
        if waiting is not None:
            waiting.errback(Failure(error))

    def _deliver(self, ident: int, sequence: int, message: DeliverSm, response: str) -> None:
        link = self._link

        def stored(_: object) -> None:
            link.command("ack", ident, sequence, ESME_ROK, response)

        def not_stored(failure: Failure) -> None:
            log.error(
                "event=smpp.deliver_not_stored error=%s answer=ESME_RX_T_APPN: the SMSC will deliver it again",
                failure.type.__name__ if failure.type else "?",
            )
            link.command("ack", ident, sequence, ESME_RX_T_APPN, response)

        defer.maybeDeferred(self._on_deliver, message).addCallbacks(stored, not_stored)

    def _stopped(self) -> None:
        self._bound = False
        for token in list(self._waiting):  # nothing should be left; never leave a caller hanging
            self._fail(token, SubmitOutcomeUnknown("the SMPP client stopped"))
        waiters, self._bound_waiters = self._bound_waiters, []
        for waiter in waiters:
            waiter.errback(Failure(NotSubmitted("the SMPP client stopped before it was bound")))
        thread = self._thread
        self._thread = None

        def joined() -> None:
            if thread is not None and thread.is_alive():
                self._reactor.callLater(0.005, joined)
                return
            stopped, self._stopped_waiters = self._stopped_waiters, []
            for waiter in stopped:
                waiter.callback(None)

        joined()
