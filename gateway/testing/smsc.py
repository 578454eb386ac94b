"""The project's own fault-injecting SMSC, for tests of the SMPP client (issue 4, SPEC R3.7).

A plain threaded socket server on 127.0.0.1 speaking enough SMPP 3.4 to be an SMSC: binds
(transceiver, transmitter, receiver), ``submit_sm``, ``enquire_link``, ``unbind``, delivery
receipts and mobile-originated ``deliver_sm``. A :class:`Fault` makes it misbehave the ways real
SMSCs do: drop the link after N PDUs, answer ``ESME_RTHROTTLED`` / ``ESME_RMSGQFUL``, answer late
or never, refuse a bind, send garbage, unbind on its own, close in the middle of a PDU.

It records every ``submit_sm`` as a :class:`SubmitRecord` (parts read with
:func:`gateway.sms.text.split_udh`, text decoded, and whether and how it was answered), so a test
can assert that every accepted part arrived and none was acknowledged twice; and every
``deliver_sm`` it sent as a :class:`DeliveryRecord` with the status the client answered.

Its API matches :class:`gateway.testing.node_smsc.NodeSmsc` where they overlap, so a test can be
parametrised over both peers::

    with Smsc(fault=Fault(throttled=every(3))) as smsc:
        client.connect(smsc.host, smsc.port)
        ...
        smsc.wait_for(lambda: len(smsc.accepted()) == 10, timeout=5)

Manual use: ``python -m gateway.testing.smsc --port 2775`` prints what arrives as JSON lines.

The codec at the top is pure (bytes in, values out); everything with a socket is below it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import heapq
import itertools
import json
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from gateway.sms.text import ESM_CLASS_UDHI, Concatenation, decode_payload, split_udh

# ---------------------------------------------------------------------------------------------
# SMPP 3.4 codec (pure)
# ---------------------------------------------------------------------------------------------

COMMAND_IDS = {
    "generic_nack": 0x80000000,
    "bind_receiver": 0x00000001,
    "bind_receiver_resp": 0x80000001,
    "bind_transmitter": 0x00000002,
    "bind_transmitter_resp": 0x80000002,
    "query_sm": 0x00000003,
    "query_sm_resp": 0x80000003,
    "submit_sm": 0x00000004,
    "submit_sm_resp": 0x80000004,
    "deliver_sm": 0x00000005,
    "deliver_sm_resp": 0x80000005,
    "unbind": 0x00000006,
    "unbind_resp": 0x80000006,
    "bind_transceiver": 0x00000009,
    "bind_transceiver_resp": 0x80000009,
    "enquire_link": 0x00000015,
    "enquire_link_resp": 0x80000015,
}
COMMAND_NAMES = {value: name for name, value in COMMAND_IDS.items()}

ESME_ROK = 0x00
ESME_RINVCMDLEN = 0x02
ESME_RINVCMDID = 0x03
ESME_RINVBNDSTS = 0x04
ESME_RALYBND = 0x05
ESME_RSYSERR = 0x08
ESME_RBINDFAIL = 0x0D
ESME_RINVPASWD = 0x0E
ESME_RINVSYSID = 0x0F
ESME_RMSGQFUL = 0x14
ESME_RTHROTTLED = 0x58
ESME_RX_T_APPN = 0x64

HEADER = struct.Struct(">LLLL")
MAX_PDU_LENGTH = 65_536

#: message_state values (SMPP 3.4 §5.2.28) by the ``stat:`` word of the receipt text.
MESSAGE_STATES = {
    "ENROUTE": 1,
    "DELIVRD": 2,
    "EXPIRED": 3,
    "DELETED": 4,
    "UNDELIV": 5,
    "ACCEPTD": 6,
    "UNKNOWN": 7,
    "REJECTD": 8,
}

# Optional parameters read by name; others are kept under their tag in hex ("0x1403").
# The kind is "cstring", "octets", or the size in octets of an integer.
_TLVS: dict[int, tuple[str, str | int]] = {
    0x001E: ("receipted_message_id", "cstring"),
    0x0204: ("user_message_reference", 2),
    0x020A: ("source_port", 2),
    0x020B: ("destination_port", 2),
    0x020C: ("sar_msg_ref_num", 2),
    0x020E: ("sar_total_segments", 1),
    0x020F: ("sar_segment_seqnum", 1),
    0x0423: ("network_error_code", "octets"),
    0x0424: ("message_payload", "octets"),
    0x0427: ("message_state", 1),
}
_TLV_TAGS = {name: tag for tag, (name, _) in _TLVS.items()}

# The mandatory body of submit_sm and deliver_sm, in order (SMPP 3.4 §4.4.1, §4.6.1).
_SM_FIELDS = (
    ("service_type", "c"),
    ("source_addr_ton", "b"),
    ("source_addr_npi", "b"),
    ("source_addr", "c"),
    ("dest_addr_ton", "b"),
    ("dest_addr_npi", "b"),
    ("destination_addr", "c"),
    ("esm_class", "b"),
    ("protocol_id", "b"),
    ("priority_flag", "b"),
    ("schedule_delivery_time", "c"),
    ("validity_period", "c"),
    ("registered_delivery", "b"),
    ("replace_if_present_flag", "b"),
    ("data_coding", "b"),
    ("sm_default_msg_id", "b"),
)
_BIND_FIELDS = (
    ("system_id", "c"),
    ("password", "c"),
    ("system_type", "c"),
    ("interface_version", "b"),
    ("addr_ton", "b"),
    ("addr_npi", "b"),
    ("address_range", "c"),
)


class PduError(ValueError):
    """A PDU that cannot be read: the SMSC answers generic_nack or closes the link."""


@dataclass(frozen=True)
class Pdu:
    """One SMPP PDU: the header, the mandatory fields by name and the optional ones by name or tag."""

    command: str
    sequence: int
    status: int = ESME_ROK
    fields: dict[str, object] = field(default_factory=dict)
    optional: dict[str, object] = field(default_factory=dict)
    command_id: int = 0


def _cstring(data: bytes, position: int) -> tuple[str, int]:
    end = data.find(b"\0", position)
    if end < 0:
        raise PduError("a C-octet string has no terminating NUL")
    return data[position:end].decode("latin-1"), end + 1


def _read_fields(data: bytes, position: int, spec: tuple[tuple[str, str], ...]) -> tuple[dict[str, object], int]:
    values: dict[str, object] = {}
    for name, kind in spec:
        if kind == "c":
            values[name], position = _cstring(data, position)
        else:
            if position >= len(data):
                raise PduError(f"the PDU ends before {name}")
            values[name] = data[position]
            position += 1
    return values, position


def _read_tlvs(data: bytes, position: int) -> dict[str, object]:
    optional: dict[str, object] = {}
    while position + 4 <= len(data):
        tag, length = struct.unpack_from(">HH", data, position)
        value = data[position + 4 : position + 4 + length]
        if len(value) < length:
            raise PduError(f"optional parameter 0x{tag:04x} is cut short")
        name, kind = _TLVS.get(tag, (f"0x{tag:04x}", "octets"))
        if isinstance(kind, int):
            optional[name] = int.from_bytes(value, "big")
        elif kind == "cstring":
            optional[name] = value.rstrip(b"\0").decode("latin-1")
        else:
            optional[name] = bytes(value)
        position += 4 + length
    return optional


def decode_pdu(data: bytes) -> Pdu:
    """Read one whole PDU (``data`` is exactly ``command_length`` bytes)."""
    if len(data) < HEADER.size:
        raise PduError(f"a PDU has at least 16 octets, not {len(data)}")
    length, command_id, status, sequence = HEADER.unpack_from(data)
    if length != len(data):
        raise PduError(f"command_length says {length} octets but {len(data)} were given")
    command = COMMAND_NAMES.get(command_id, "unknown")
    fields: dict[str, object] = {}
    optional: dict[str, object] = {}
    body = data[HEADER.size :]
    if not body:
        return Pdu(command, sequence, status, fields, optional, command_id)
    if command in ("bind_transceiver", "bind_transmitter", "bind_receiver"):
        fields, _ = _read_fields(body, 0, _BIND_FIELDS)
    elif command in ("submit_sm", "deliver_sm"):
        fields, position = _read_fields(body, 0, _SM_FIELDS)
        if position >= len(body):
            raise PduError("the PDU ends before sm_length")
        sm_length = body[position]
        short_message = body[position + 1 : position + 1 + sm_length]
        if len(short_message) < sm_length:
            raise PduError("short_message is shorter than sm_length")
        fields["short_message"] = bytes(short_message)
        optional = _read_tlvs(body, position + 1 + sm_length)
    elif command in ("submit_sm_resp", "deliver_sm_resp") or command.startswith("bind_"):
        name = "system_id" if command.startswith("bind_") else "message_id"
        end = body.find(b"\0")
        fields[name] = body[: end if end >= 0 else len(body)].decode("latin-1")
        optional = _read_tlvs(body, end + 1) if end >= 0 else {}
    return Pdu(command, sequence, status, fields, optional, command_id)


def _encode_tlvs(optional: dict[str, object]) -> bytes:
    out = b""
    for name, value in optional.items():
        tag = _TLV_TAGS.get(name) or int(name, 16)
        kind = _TLVS.get(tag, (name, "octets"))[1]
        if isinstance(kind, int):
            raw = int(value).to_bytes(kind, "big")  # type: ignore[call-overload]
        elif kind == "cstring":
            raw = str(value).encode("latin-1") + b"\0"
        else:
            raw = bytes(value)  # type: ignore[arg-type]
        out += struct.pack(">HH", tag, len(raw)) + raw
    return out


def encode_pdu(command: str, sequence: int, status: int = ESME_ROK, **values: object) -> bytes:
    """The bytes of one PDU. ``values`` are the mandatory fields by name plus optional ones by name.

    An error response carries no body (SMPP 3.4 §3.3: the body of a failed response may be omitted).
    """
    body = b""
    if command in ("bind_transceiver", "bind_transmitter", "bind_receiver"):
        values.setdefault("interface_version", 0x34)
        for name, kind in _BIND_FIELDS:
            value = values.pop(name, "" if kind == "c" else 0)
            body += str(value).encode("latin-1") + b"\0" if kind == "c" else bytes([int(value)])  # type: ignore[call-overload]
    elif command in ("submit_sm", "deliver_sm"):
        for name, kind in _SM_FIELDS:
            value = values.pop(name, "" if kind == "c" else 0)
            body += str(value).encode("latin-1") + b"\0" if kind == "c" else bytes([int(value)])  # type: ignore[call-overload]
        short_message = bytes(values.pop("short_message", b""))  # type: ignore[arg-type]
        body += bytes([len(short_message)]) + short_message
    elif command == "unbind" or command.startswith("enquire_link") or command in ("unbind_resp", "generic_nack"):
        pass
    elif command.endswith("_resp") and status == ESME_ROK:
        name = "system_id" if command.startswith("bind_") else "message_id"
        body += str(values.pop(name, "")).encode("latin-1") + b"\0"
    body += _encode_tlvs(values)
    return HEADER.pack(HEADER.size + len(body), COMMAND_IDS[command], status, sequence) + body


def receipt_text(
    message_id: str,
    state: str,
    *,
    submitted: datetime,
    done: datetime,
    err: str = "000",
    text: str = "",
) -> str:
    """The de-facto standard receipt text (SMPP 3.4 Appendix B), e.g.
    ``id:a0000 sub:001 dlvrd:001 submit date:2611231901 done date:2611231901 stat:DELIVRD err:000 text:``.
    """
    delivered = "001" if state == "DELIVRD" else "000"
    return (
        f"id:{message_id} sub:001 dlvrd:{delivered} submit date:{submitted:%y%m%d%H%M} "
        f"done date:{done:%y%m%d%H%M} stat:{state} err:{err} text:{text[:20]}"
    )


#: Garbage an SMSC might send: a header whose command_length (3) is shorter than a header.
INVALID_COMMAND_LENGTH = struct.pack(">L", 3) + b"\x00\x00\x00"
#: A well-formed header with a command id no SMPP version defines.
UNKNOWN_COMMAND_ID = HEADER.pack(16, 0x000000FF, 0, 7)
#: Bytes that are not SMPP at all (an HTTP answer from a misconfigured port).
NOT_SMPP = b"HTTP/1.1 400 Bad Request\r\n\r\n"

# ---------------------------------------------------------------------------------------------
# Records and faults
# ---------------------------------------------------------------------------------------------


@dataclass
class SubmitRecord:
    """One ``submit_sm`` as the SMSC saw it, and what it answered (``status`` None: no answer)."""

    sequence: int
    source: str
    destination: str
    esm_class: int
    data_coding: int
    registered_delivery: int
    short_message: bytes
    optional: dict[str, object] = field(default_factory=dict)
    status: int | None = None
    message_id: str | None = None
    connection: int = 0
    number: int = 0  # 1-based, across the SMSC's life: what the fault selectors count

    @property
    def concatenation(self) -> Concatenation | None:
        if self.esm_class & ESM_CLASS_UDHI:
            return split_udh(self.short_message)[0]
        return None

    @property
    def payload(self) -> bytes:
        if self.esm_class & ESM_CLASS_UDHI:
            return split_udh(self.short_message)[1]
        if not self.short_message and isinstance(self.optional.get("message_payload"), bytes):
            return self.optional["message_payload"]  # type: ignore[return-value]
        return self.short_message

    @property
    def text(self) -> str:
        return decode_payload(self.payload, self.data_coding)

    @property
    def accepted(self) -> bool:
        return self.status == ESME_ROK

    @property
    def part_key(self) -> tuple[str, int | None, int, int, bytes]:
        """(destination, reference, total, part, payload): equal for a part sent twice."""
        concatenation = self.concatenation
        if concatenation is None:
            return (self.destination, None, 1, 1, self.payload)
        return (self.destination, concatenation.reference, concatenation.total, concatenation.sequence, self.payload)


@dataclass
class DeliveryRecord:
    """One ``deliver_sm`` the SMSC sent (an MO or a receipt) and the client's deliver_sm_resp."""

    sequence: int
    kind: str  # "mo" or "receipt"
    source: str
    destination: str
    short_message: bytes
    message_id: str | None = None  # receipted_message_id of a receipt
    status: int | None = None  # the client's deliver_sm_resp status, None until it answers
    connection: int = 0
    attempt: int = 1  # 2 and up: redelivered after the client answered an error (SPEC R3.7a)


#: Chooses submits: called with the submit's 1-based number across the SMSC's life and the
#: seconds since the SMSC started.
SubmitSelector = Callable[[int, float], bool]


def nth(*numbers: int) -> SubmitSelector:
    """The given submits (1-based), e.g. ``nth(3)`` or ``nth(2, 5)``."""
    chosen = frozenset(numbers)
    return lambda number, _elapsed: number in chosen


def every(n: int, *, first: int | None = None) -> SubmitSelector:
    """Every n-th submit (the n-th, 2n-th, …), or from ``first`` on every n-th after it."""
    start = n if first is None else first
    return lambda number, _elapsed: number >= start and (number - start) % n == 0


def during(start: float, end: float) -> SubmitSelector:
    """Submits arriving between ``start`` and ``end`` seconds after the SMSC started."""
    return lambda _number, elapsed: start <= elapsed < end


def always(_number: int, _elapsed: float) -> bool:
    return True


@dataclass(frozen=True)
class Fault:
    """How the SMSC misbehaves. The default is a well-behaved SMSC.

    PDU counts are per connection and include the bind; submit selectors count submits across
    the SMSC's life (see :data:`SubmitSelector`).
    """

    throttled: SubmitSelector | None = None  # answered ESME_RTHROTTLED
    queue_full: SubmitSelector | None = None  # answered ESME_RMSGQFUL
    unanswered: SubmitSelector | None = None  # never answered
    response_delay: float = 0.0  # seconds before answering a submit chosen by `slow`
    slow: SubmitSelector = always
    refused_binds: int = 0  # the first N binds are refused with ESME_RBINDFAIL
    disconnect_after_pdus: int | None = None  # the N-th PDU is not answered; the link is closed
    disconnect_times: int | None = 1  # on how many connections that happens (None: every one)
    garbage_after_pdus: int | None = None  # after answering the N-th PDU, send `garbage`
    garbage: bytes = INVALID_COMMAND_LENGTH
    unbind_after_pdus: int | None = None  # after answering the N-th PDU, send unbind
    close_mid_pdu_after_pdus: int | None = None  # half the answer to the N-th PDU, then close

    def submit_status(self, number: int, elapsed: float) -> int | None:
        """The answer to a submit: ESME_ROK, an error status, or None for no answer."""
        if self.unanswered and self.unanswered(number, elapsed):
            return None
        if self.throttled and self.throttled(number, elapsed):
            return ESME_RTHROTTLED
        if self.queue_full and self.queue_full(number, elapsed):
            return ESME_RMSGQFUL
        return ESME_ROK


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------


class _Timers:
    """One thread running callbacks at their time: delayed answers and receipts."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._counter = itertools.count()
        self._condition = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="smsc-timers", daemon=True)
        self._thread.start()

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        with self._condition:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._counter), callback))
            self._condition.notify()

    def stop(self) -> None:
        with self._condition:
            self._stopped = True
            self._condition.notify()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._condition.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                if self._stopped:
                    return
                _, _, callback = heapq.heappop(self._heap)
            callback()


class _Connection:
    def __init__(self, smsc: Smsc, sock: socket.socket, number: int) -> None:
        self.smsc = smsc
        self.sock = sock
        self.number = number
        self.mode: str | None = None  # "transceiver", "transmitter", "receiver" once bound
        self.received = 0
        self.closed = False
        self.disconnects = False  # whether Fault.disconnect_after_pdus applies to this connection
        self.unbind_sent = False
        self._sequence = itertools.count(1)
        self._lock = threading.Lock()

    @property
    def can_receive(self) -> bool:
        return not self.closed and self.mode in ("transceiver", "receiver")

    def next_sequence(self) -> int:
        return next(self._sequence)

    def send(self, data: bytes) -> None:
        with self._lock:
            if self.closed:
                return
            try:
                self.sock.sendall(data)
            except OSError:
                self._close_locked()

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()


class Smsc:
    """A fault-injecting SMSC on 127.0.0.1 (see the module docstring), used as a context manager.

    ``message_id_format`` is ``"hex"`` or ``"decimal"``; ``receipt_id_format`` (``"same"``,
    ``"hex"``, ``"decimal"``) is how the ``id:`` of a receipt's text writes that id, since some
    SMSCs answer in hex and report in zero-padded decimal. A submit with ``registered_delivery``
    asking for a receipt (bits 0-1 = 01) gets one after ``receipt_delay`` seconds, in state
    ``receipt_state``. With ``redeliver_delay`` set, a deliver_sm the client answers with an
    error (ESME_RX_T_APPN: "not stored, send it again", SPEC R3.7a) is sent again after that
    many seconds, up to ``redeliver_times`` more times, as a new :class:`DeliveryRecord` with
    ``attempt`` 2, 3, ….
    """

    def __init__(
        self,
        *,
        system_id: str = "gateway",
        password: str = "secret",
        fault: Fault | None = None,
        message_id_format: str = "hex",
        receipt_id_format: str = "same",
        receipt_delay: float = 0.0,
        receipt_state: str = "DELIVRD",
        host: str = "127.0.0.1",
        port: int = 0,
        redeliver_delay: float | None = None,
        redeliver_times: int = 3,
        on_record: Callable[[str, object], None] | None = None,
    ) -> None:
        if message_id_format not in ("hex", "decimal") or receipt_id_format not in ("same", "hex", "decimal"):
            raise ValueError("message_id_format is hex or decimal; receipt_id_format is same, hex or decimal.")
        if receipt_state not in MESSAGE_STATES:
            raise ValueError(f"receipt_state is one of {', '.join(MESSAGE_STATES)}, not {receipt_state!r}.")
        self.system_id = system_id
        self.password = password
        self.fault = fault or Fault()
        self.message_id_format = message_id_format
        self.receipt_id_format = receipt_id_format
        self.receipt_delay = receipt_delay
        self.receipt_state = receipt_state
        self.host = host
        self.port = port
        self.redeliver_delay = redeliver_delay
        self.redeliver_times = redeliver_times
        self._on_record = on_record
        self._sent_deliveries: dict[tuple[int, int], tuple[str, int, dict[str, object]]] = {}
        self._changed = threading.Condition(threading.RLock())
        self._submits: list[SubmitRecord] = []
        self._deliveries: list[DeliveryRecord] = []
        self._pdus: list[dict[str, object]] = []
        self._connections: list[_Connection] = []
        self._threads: list[threading.Thread] = []
        self._message_ids = itertools.count(0xA0000)
        self._binds = 0
        self._binds_refused = 0
        self._disconnects_done = 0
        self._started = 0.0
        self._listener: socket.socket | None = None
        self._timers: _Timers | None = None
        self._stopping = threading.Event()

    # --- life -----------------------------------------------------------------------------

    def __enter__(self) -> Smsc:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> Smsc:
        """Listen on ``host`` (an IPv6 literal such as ``::1`` listens on IPv6) and accept in a thread."""
        listener = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._started = time.monotonic()
        self._timers = _Timers()
        self._spawn(self._accept_loop, "smsc-accept")
        return self

    def stop(self) -> None:
        """Close every connection and the listener; returns within about a second."""
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
        for connection in self._connections_snapshot():
            connection.close()
        if self._timers is not None:
            self._timers.stop()
        for thread in self._threads:
            thread.join(timeout=2)

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _connections_snapshot(self) -> list[_Connection]:
        with self._changed:
            return list(self._connections)

    # --- what a test reads ----------------------------------------------------------------

    def submits(self) -> list[SubmitRecord]:
        """Every submit_sm received, in order (copies)."""
        with self._changed:
            return [dataclasses.replace(record) for record in self._submits]

    def accepted(self) -> list[SubmitRecord]:
        """The submits answered ESME_ROK."""
        return [record for record in self.submits() if record.accepted]

    def acknowledged_twice(self) -> list[SubmitRecord]:
        """Accepted submits whose part (destination, reference, total, part, payload) was accepted before."""
        seen: set[tuple[str, int | None, int, int, bytes]] = set()
        repeats = []
        for record in self.accepted():
            if record.part_key in seen:
                repeats.append(record)
            seen.add(record.part_key)
        return repeats

    def deliveries(self) -> list[DeliveryRecord]:
        """Every deliver_sm sent (MOs and receipts) with the client's answer."""
        with self._changed:
            return [dataclasses.replace(record) for record in self._deliveries]

    def pdus(self) -> list[dict[str, object]]:
        """Every PDU received: command, sequence, status, connection (and errors, as "error")."""
        with self._changed:
            return list(self._pdus)

    @property
    def binds(self) -> int:
        """How many binds succeeded."""
        return self._binds

    def wait_for(self, predicate: Callable[[], object], timeout: float = 5.0) -> object:
        """Wait until ``predicate()`` is truthy and return its value; TimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not (value := predicate()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"the SMSC did not see what was expected within {timeout} s")
                self._changed.wait(min(remaining, 0.1))
            return value

    # --- what a test does -----------------------------------------------------------------

    def send_mo(
        self,
        source: str,
        destination: str,
        text: str | None = None,
        *,
        payload: bytes | None = None,
        data_coding: int = 8,
        udh: bytes | None = None,
        esm_class: int | None = None,
    ) -> int:
        """Send a mobile-originated deliver_sm (UCS-2 ``text`` or raw ``payload``); its sequence number."""
        body = payload if payload is not None else (text or "").encode("utf-16-be")
        short_message = (udh or b"") + body
        if esm_class is None:
            esm_class = ESM_CLASS_UDHI if udh else 0
        return self._deliver(
            "mo",
            None,
            source_addr=source,
            destination_addr=destination,
            esm_class=esm_class,
            data_coding=data_coding,
            short_message=short_message,
        )

    def send_receipt(
        self,
        message_id: str,
        state: str = "DELIVRD",
        *,
        source: str = "",
        destination: str = "",
        err: str = "000",
        text: str = "",
        submitted: datetime | None = None,
    ) -> int:
        """Send a delivery receipt for ``message_id`` (TLVs and standard text); its sequence number."""
        if state not in MESSAGE_STATES:
            raise ValueError(f"A receipt state is one of {', '.join(MESSAGE_STATES)}, not {state!r}.")
        now = datetime.now(UTC)
        body = receipt_text(
            self._receipt_text_id(message_id), state, submitted=submitted or now, done=now, err=err, text=text
        )
        return self._deliver(
            "receipt",
            None,
            source_addr=source,
            destination_addr=destination,
            esm_class=0x04,
            data_coding=0,
            short_message=body.encode("ascii", "replace"),
            receipted_message_id=message_id,
            message_state=MESSAGE_STATES[state],
        )

    def unbind(self) -> None:
        """Send unbind on every open connection (the SMSC closes after unbind_resp, or after 1 s)."""
        for connection in self._connections_snapshot():
            self._send_unbind(connection)

    def close_connection(self, *, mid_pdu: bool = False) -> None:
        """Close every open connection, after half an enquire_link when ``mid_pdu``."""
        for connection in self._connections_snapshot():
            if mid_pdu:
                connection.send(encode_pdu("enquire_link", connection.next_sequence())[:10])
            connection.close()

    def send_raw(self, data: bytes) -> None:
        """Write ``data`` as it is on every open connection (garbage, a hand-made PDU)."""
        for connection in self._connections_snapshot():
            connection.send(data)

    # --- internals ------------------------------------------------------------------------

    def _elapsed(self) -> float:
        return time.monotonic() - self._started

    def _record(self, kind: str, value: object) -> None:
        with self._changed:
            self._changed.notify_all()
        if self._on_record is not None:
            self._on_record(kind, value)

    def _format_id(self, number: int, style: str) -> str:
        return f"{number:x}" if style == "hex" else str(number)

    def _receipt_text_id(self, message_id: str) -> str:
        if self.receipt_id_format == "same":
            return message_id
        try:
            number = int(message_id, 16 if self.message_id_format == "hex" else 10)
        except ValueError:
            return message_id
        return f"{number:010d}" if self.receipt_id_format == "decimal" else f"{number:x}"

    def _receiver(self, preferred: _Connection | None) -> _Connection | None:
        if preferred is not None and preferred.can_receive:
            return preferred
        receivers = [connection for connection in self._connections_snapshot() if connection.can_receive]
        return receivers[-1] if receivers else None

    def _deliver(self, kind: str, preferred: _Connection | None, attempt: int = 1, **values: object) -> int:
        connection = self._receiver(preferred)
        if connection is None:
            raise RuntimeError("No client is bound as receiver or transceiver to deliver to; bind one first.")
        sequence = connection.next_sequence()
        self._sent_deliveries[(connection.number, sequence)] = (kind, attempt, values)
        record = DeliveryRecord(
            sequence,
            kind,
            str(values["source_addr"]),
            str(values["destination_addr"]),
            bytes(values["short_message"]),  # type: ignore[arg-type]
            message_id=values.get("receipted_message_id"),  # type: ignore[arg-type]
            connection=connection.number,
            attempt=attempt,
        )
        with self._changed:
            self._deliveries.append(record)
        connection.send(encode_pdu("deliver_sm", sequence, **values))
        self._record("delivery", record)
        return sequence

    def _accept_loop(self) -> None:
        assert self._listener is not None
        numbers = itertools.count(1)
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(self, sock, next(numbers))
            with self._changed:
                times = self.fault.disconnect_times
                if self.fault.disconnect_after_pdus is not None and (times is None or self._disconnects_done < times):
                    connection.disconnects = True
                    self._disconnects_done += 1
                self._connections.append(connection)
            self._spawn(self._read_loop, f"smsc-connection-{connection.number}", connection)

    def _read_loop(self, connection: _Connection) -> None:
        connection.sock.settimeout(0.1)
        buffer = b""
        while not self._stopping.is_set() and not connection.closed:
            try:
                chunk = connection.sock.recv(65_536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            buffer += chunk
            while len(buffer) >= 4 and not connection.closed:
                (length,) = struct.unpack_from(">L", buffer)
                if not HEADER.size <= length <= MAX_PDU_LENGTH:
                    self._note(connection, {"error": f"invalid command_length {length}"})
                    connection.close()
                    break
                if len(buffer) < length:
                    break
                data, buffer = buffer[:length], buffer[length:]
                self._handle(connection, data)
        connection.close()
        self._note(connection, {"event": "closed"})

    def _note(self, connection: _Connection, entry: dict[str, object]) -> None:
        with self._changed:
            self._pdus.append({"connection": connection.number, **entry})
        self._record("pdu", entry)

    def _handle(self, connection: _Connection, data: bytes) -> None:
        try:
            pdu = decode_pdu(data)
        except PduError as error:
            (_, command_id, _, sequence) = HEADER.unpack_from(data)
            self._note(connection, {"error": str(error), "command_id": command_id, "sequence": sequence})
            connection.send(encode_pdu("generic_nack", sequence, ESME_RINVCMDLEN))
            return
        connection.received += 1
        count = connection.received
        self._note(connection, {"command": pdu.command, "sequence": pdu.sequence, "status": pdu.status, "count": count})
        fault = self.fault
        if connection.disconnects and count == fault.disconnect_after_pdus:
            if pdu.command == "submit_sm":
                self._record("submit", self._record_submit(connection, pdu))
            connection.close()
            return
        answer = self._answer(connection, pdu)
        if answer is None:
            return
        delay, response = answer
        if fault.close_mid_pdu_after_pdus == count and response:
            connection.send(response[: max(1, len(response) // 2)])
            connection.close()
            return
        if delay > 0:
            assert self._timers is not None
            self._timers.call_later(delay, lambda: self._send_after(connection, response, count))
        else:
            self._send_after(connection, response, count)

    def _send_after(self, connection: _Connection, response: bytes, count: int) -> None:
        if response:
            connection.send(response)
        fault = self.fault
        if fault.garbage_after_pdus == count:
            connection.send(fault.garbage)
        if fault.unbind_after_pdus == count:
            self._send_unbind(connection)

    def _send_unbind(self, connection: _Connection) -> None:
        if connection.closed:
            return
        connection.unbind_sent = True
        connection.send(encode_pdu("unbind", connection.next_sequence()))
        assert self._timers is not None
        self._timers.call_later(1.0, connection.close)  # smpplib never answers an SMSC's unbind

    def _answer(self, connection: _Connection, pdu: Pdu) -> tuple[float, bytes] | None:
        """What to send back for ``pdu`` and after how long; None for nothing."""
        command = pdu.command
        if command.startswith("bind_") and not command.endswith("_resp"):
            return 0.0, self._bind(connection, pdu)
        if command == "submit_sm":
            return self._submit(connection, pdu)
        if command == "enquire_link":
            return 0.0, encode_pdu("enquire_link_resp", pdu.sequence)
        if command == "unbind":
            connection.send(encode_pdu("unbind_resp", pdu.sequence))
            connection.close()
            return None
        if command == "unbind_resp":
            connection.close()
            return None
        if command == "deliver_sm_resp":
            with self._changed:
                for record in reversed(self._deliveries):
                    if record.connection == connection.number and record.sequence == pdu.sequence:
                        record.status = pdu.status
                        break
            self._record("deliver_sm_resp", pdu)
            self._maybe_redeliver(connection, pdu)
            return 0.0, b""
        if command in ("enquire_link_resp", "generic_nack"):
            return 0.0, b""
        return 0.0, encode_pdu("generic_nack", pdu.sequence, ESME_RINVCMDID)

    def _maybe_redeliver(self, connection: _Connection, pdu: Pdu) -> None:
        """An SMSC delivers again what the client answered with an error, such as ESME_RX_T_APPN."""
        sent = self._sent_deliveries.pop((connection.number, pdu.sequence), None)
        if sent is None or pdu.status == ESME_ROK or self.redeliver_delay is None:
            return
        kind, attempt, values = sent
        if attempt > self.redeliver_times:
            return
        assert self._timers is not None

        def again() -> None:
            if self._receiver(None) is not None:
                self._deliver(kind, None, attempt + 1, **values)

        self._timers.call_later(self.redeliver_delay, again)

    def _bind(self, connection: _Connection, pdu: Pdu) -> bytes:
        response = pdu.command + "_resp"
        if connection.mode is not None:
            return encode_pdu(response, pdu.sequence, ESME_RALYBND)
        if pdu.fields.get("system_id") != self.system_id:
            return encode_pdu(response, pdu.sequence, ESME_RINVSYSID)
        if pdu.fields.get("password") != self.password:
            return encode_pdu(response, pdu.sequence, ESME_RINVPASWD)
        with self._changed:
            if self._binds_refused < self.fault.refused_binds:
                self._binds_refused += 1
                return encode_pdu(response, pdu.sequence, ESME_RBINDFAIL)
            self._binds += 1
        connection.mode = pdu.command.removeprefix("bind_")
        return encode_pdu(response, pdu.sequence, system_id="hcp-test-smsc")

    def _submit(self, connection: _Connection, pdu: Pdu) -> tuple[float, bytes] | None:
        record = self._record_submit(connection, pdu)
        elapsed = self._elapsed()
        if connection.mode not in ("transceiver", "transmitter"):
            status: int | None = ESME_RINVBNDSTS
        else:
            status = self.fault.submit_status(record.number, elapsed)
        message_id = self._format_id(next(self._message_ids), self.message_id_format) if status == ESME_ROK else None
        with self._changed:
            record.status, record.message_id = status, message_id
        self._record("submit", record)
        if status is None:
            return None
        slow = self.fault.response_delay and self.fault.slow(record.number, elapsed)
        delay = self.fault.response_delay if slow else 0.0
        if message_id is not None and record.registered_delivery & 0x03 == 1:
            assert self._timers is not None
            self._timers.call_later(delay + self.receipt_delay, lambda: self._auto_receipt(connection, record))
        if message_id is None:
            return delay, encode_pdu("submit_sm_resp", pdu.sequence, status)
        return delay, encode_pdu("submit_sm_resp", pdu.sequence, message_id=message_id)

    def _auto_receipt(self, connection: _Connection, record: SubmitRecord) -> None:
        if self._receiver(connection) is None or record.message_id is None:
            return
        self.send_receipt(
            record.message_id,
            self.receipt_state,
            source=record.destination,
            destination=record.source,
            text=record.text.encode("ascii", "replace").decode("ascii"),
        )

    def _record_submit(self, connection: _Connection, pdu: Pdu) -> SubmitRecord:
        """Keep a submit (not yet answered) and give it the next number; the caller announces it."""
        fields = pdu.fields
        with self._changed:
            record = SubmitRecord(
                sequence=pdu.sequence,
                source=str(fields.get("source_addr", "")),
                destination=str(fields.get("destination_addr", "")),
                esm_class=int(fields.get("esm_class", 0)),  # type: ignore[call-overload]
                data_coding=int(fields.get("data_coding", 0)),  # type: ignore[call-overload]
                registered_delivery=int(fields.get("registered_delivery", 0)),  # type: ignore[call-overload]
                short_message=bytes(fields.get("short_message", b"")),  # type: ignore[call-overload]
                optional=dict(pdu.optional),
                connection=connection.number,
                number=len(self._submits) + 1,
            )
            self._submits.append(record)
        return record


# ---------------------------------------------------------------------------------------------
# python -m gateway.testing.smsc
# ---------------------------------------------------------------------------------------------


def _print_record(kind: str, value: object) -> None:
    if isinstance(value, SubmitRecord):
        concatenation = value.concatenation
        line: dict[str, object] = {
            "event": "submit_sm",
            "sequence": value.sequence,
            "source": value.source,
            "destination": value.destination,
            "esm_class": value.esm_class,
            "data_coding": value.data_coding,
            "registered_delivery": value.registered_delivery,
            "udh": None
            if concatenation is None
            else [concatenation.reference, concatenation.total, concatenation.sequence],
            "text": value.text,
            "status": value.status,
            "message_id": value.message_id,
        }
    elif isinstance(value, DeliveryRecord):
        line = {"event": "deliver_sm", "kind": value.kind, "sequence": value.sequence, "message_id": value.message_id}
    elif isinstance(value, Pdu):
        line = {"event": value.command, "sequence": value.sequence, "status": value.status}
    else:
        line = {"event": kind, **value} if isinstance(value, dict) else {"event": kind}
    print(json.dumps(line, ensure_ascii=False), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.testing.smsc", description="A test SMSC that prints what it receives as JSON lines."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2775)
    parser.add_argument("--system-id", default="gateway")
    parser.add_argument("--password", default="secret")
    parser.add_argument("--message-id-format", choices=("hex", "decimal"), default="hex")
    parser.add_argument("--receipt-delay", type=float, default=1.0, help="seconds before a requested receipt")
    parser.add_argument("--throttle-every", type=int, help="answer every n-th submit ESME_RTHROTTLED")
    args = parser.parse_args(argv)
    fault = Fault(throttled=every(args.throttle_every) if args.throttle_every else None)
    smsc = Smsc(
        system_id=args.system_id,
        password=args.password,
        fault=fault,
        message_id_format=args.message_id_format,
        receipt_delay=args.receipt_delay,
        host=args.host,
        port=args.port,
        on_record=_print_record,
    )
    with smsc:
        print(json.dumps({"event": "listening", "host": smsc.host, "port": smsc.port}), flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
