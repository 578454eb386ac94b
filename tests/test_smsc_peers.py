"""The SMS test peers do what they say: the node SMSC (npm ``smpp``) and the fault-injecting one.

A plain smpplib 2.2.4 client, all I/O in this thread, talks to each peer; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import sys
import time
from collections.abc import Iterator

import pytest
import smpplib.client
import smpplib.exceptions

from gateway.sms.text import encode_ucs2_parts, split_udh
from gateway.testing.node_smsc import NodeSmsc
from gateway.testing.smsc import (
    ESME_RBINDFAIL,
    ESME_RINVPASWD,
    ESME_RMSGQFUL,
    ESME_ROK,
    ESME_RTHROTTLED,
    ESME_RX_T_APPN,
    HEADER,
    INVALID_COMMAND_LENGTH,
    UNKNOWN_COMMAND_ID,
    Fault,
    Smsc,
    decode_pdu,
    encode_pdu,
    every,
    nth,
)

SERVICE_NUMBER = "10690012345"
PHONE = "13800138000"
LONG_INVITATION = (
    "【12345热线】您办理的“不动产登记”事项已办结，请您评价：回复1非常满意，2满意，3基本满意，4不满意，"
    "5非常不满意。请于2月24日18:30前回复，逾期默认“基本满意”。回复TD退订"
)

PEERS = {"node": NodeSmsc, "python": Smsc}


@pytest.fixture(params=sorted(PEERS))
def peer(request: pytest.FixtureRequest) -> Iterator[NodeSmsc | Smsc]:
    with PEERS[request.param](receipt_delay=0.05) as smsc:
        yield smsc


class Esme:
    """smpplib driven from one thread: what arrives is kept, errors are not raised."""

    def __init__(self, port: int, *, timeout: float = 0.5) -> None:
        self.client = smpplib.client.Client("127.0.0.1", port, timeout=timeout, allow_unknown_opt_params=True)
        self.responses: list = []
        self.received: list = []
        self.client.set_message_sent_handler(lambda pdu: self.responses.append(pdu))
        self.client.set_message_received_handler(lambda pdu: self.received.append(pdu))
        self.client.set_error_pdu_handler(lambda pdu: None)  # the sent handler sees error responses too

    def bind(self, password: str = "secret") -> None:
        self.client.connect()
        self.client.bind_transceiver(system_id="gateway", password=password)

    def submit(self, short_message: bytes, *, esm_class: int = 0, registered_delivery: int = 0) -> int:
        pdu = self.client.send_message(
            source_addr=SERVICE_NUMBER,
            destination_addr=PHONE,
            short_message=short_message,
            esm_class=esm_class,
            data_coding=8,
            registered_delivery=registered_delivery,
        )
        return pdu.sequence

    def read_until(self, done, timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError("the peer did not send what was expected in time")
            self._read_once()

    def _read_once(self) -> None:
        with contextlib.suppress(TimeoutError):
            self.client.read_once(auto_send_enquire_link=False)

    def close(self) -> None:
        if self.client._socket is not None:
            self.client.disconnect()


@pytest.fixture
def esme_factory() -> Iterator:
    made: list[Esme] = []

    def make(port: int, **kwargs) -> Esme:
        esme = Esme(port, **kwargs)
        made.append(esme)
        return esme

    yield make
    for esme in made:
        esme.close()


# --- both peers --------------------------------------------------------------------------------


def test_long_chinese_invitation_arrives_as_udh_parts(peer, esme_factory) -> None:
    esme = esme_factory(peer.port)
    esme.bind()
    parts = encode_ucs2_parts(LONG_INVITATION, reference=42)
    assert len(parts) == 2
    for part in parts:
        esme.submit(part.short_message, esm_class=part.esm_class)
    esme.read_until(lambda: len(esme.responses) == 2)

    assert [pdu.status for pdu in esme.responses] == [ESME_ROK, ESME_ROK]
    records = peer.wait_for(lambda: len(peer.accepted()) == 2 and peer.accepted())
    assert [(r.concatenation.reference, r.concatenation.total, r.concatenation.sequence) for r in records] == [
        (42, 2, 1),
        (42, 2, 2),
    ]
    assert all(r.esm_class == 0x40 and r.data_coding == 8 and r.destination == PHONE for r in records)
    assert "".join(r.text for r in records) == LONG_INVITATION
    assert [r.message_id for r in records] == [pdu.message_id.decode() for pdu in esme.responses]
    assert len({r.message_id for r in records}) == 2
    assert peer.acknowledged_twice() == []


def test_receipt_is_sent_when_asked_for(peer, esme_factory) -> None:
    esme = esme_factory(peer.port)
    esme.bind()
    esme.submit("您好".encode("utf-16-be"), registered_delivery=1)
    esme.read_until(lambda: esme.responses and esme.received)

    message_id = esme.responses[0].message_id
    receipt = esme.received[0]
    assert receipt.esm_class == 0x04
    assert receipt.receipted_message_id == message_id
    assert receipt.message_state == 2
    assert receipt.short_message.startswith(b"id:" + message_id + b" sub:001 dlvrd:001 submit date:")
    assert b" stat:DELIVRD err:000 text:" in receipt.short_message
    delivery = peer.wait_for(lambda: [d for d in peer.deliveries() if d.status is not None])
    assert (delivery[0].kind, delivery[0].message_id, delivery[0].status) == ("receipt", message_id.decode(), 0)


def test_receipt_with_a_given_state_on_request(peer, esme_factory) -> None:
    esme = esme_factory(peer.port)
    esme.bind()
    peer.send_receipt("a1b2", "UNDELIV", source=PHONE, destination=SERVICE_NUMBER, err="001")
    esme.read_until(lambda: esme.received)
    receipt = esme.received[0]
    assert (receipt.receipted_message_id, receipt.message_state) == (b"a1b2", 5)
    assert b"stat:UNDELIV err:001" in receipt.short_message


def test_multipart_mo_reply_arrives_with_its_udh(peer, esme_factory) -> None:
    esme = esme_factory(peer.port)
    esme.bind()
    udh = bytes([5, 0, 3, 9, 2, 1])
    sequence = peer.send_mo(PHONE, SERVICE_NUMBER + "0001", "4 窗口态度", udh=udh)
    peer.send_mo(PHONE, SERVICE_NUMBER + "0001", "不好", udh=bytes([5, 0, 3, 9, 2, 2]))
    esme.read_until(lambda: len(esme.received) == 2)

    first = esme.received[0]
    assert (first.sequence, first.esm_class, first.data_coding) == (sequence, 0x40, 8)
    assert first.source_addr == PHONE.encode() and first.destination_addr == (SERVICE_NUMBER + "0001").encode()
    concatenation, payload = split_udh(first.short_message)
    assert (concatenation.reference, concatenation.total, concatenation.sequence) == (9, 2, 1)
    assert payload.decode("utf-16-be") == "4 窗口态度"
    deliveries = peer.wait_for(lambda: all(d.status == 0 for d in peer.deliveries()) and peer.deliveries())
    assert [d.kind for d in deliveries] == ["mo", "mo"]


def test_raw_mo_payload_is_sent_as_given(peer, esme_factory) -> None:
    esme = esme_factory(peer.port)
    esme.bind()
    peer.send_mo(PHONE, SERVICE_NUMBER, payload="满意".encode("gbk"), data_coding=15)
    esme.read_until(lambda: esme.received)
    assert (esme.received[0].short_message, esme.received[0].data_coding) == ("满意".encode("gbk"), 15)


def test_wrong_password_is_refused(peer, esme_factory) -> None:
    esme = esme_factory(peer.port)
    with pytest.raises(smpplib.exceptions.PDUError) as refused:
        esme.bind(password="wrong")
    assert refused.value.args[1] == ESME_RINVPASWD


def test_enquire_link_is_answered(peer, esme_factory) -> None:
    esme = esme_factory(peer.port)
    esme.bind()
    esme.client.send_pdu(smpplib.smpp.make_pdu("enquire_link", client=esme.client))
    assert esme.client.read_pdu().command == "enquire_link_resp"


def test_smsc_unbind_and_close(peer, esme_factory) -> None:
    esme = esme_factory(peer.port)
    esme.bind()
    peer.unbind()
    assert esme.client.read_pdu().command == "unbind"
    esme.close()
    second = esme_factory(peer.port)
    second.bind()
    peer.close_connection()
    with pytest.raises(smpplib.exceptions.ConnectionError):
        second.client.read_pdu()


@pytest.mark.parametrize("name", sorted(PEERS))
def test_hex_message_ids_reported_in_decimal_receipts(name: str, esme_factory) -> None:
    with PEERS[name](message_id_format="hex", receipt_id_format="decimal") as smsc:
        esme = esme_factory(smsc.port)
        esme.bind()
        esme.submit(b"\x00A", registered_delivery=1)
        esme.read_until(lambda: esme.responses and esme.received)
        message_id = esme.responses[0].message_id
        assert esme.received[0].receipted_message_id == message_id
        assert f"id:{int(message_id, 16):010d} ".encode() in esme.received[0].short_message


@pytest.mark.parametrize("name", sorted(PEERS))
def test_mo_answered_with_an_error_is_delivered_again(name: str, esme_factory) -> None:
    with PEERS[name](redeliver_delay=0.05, redeliver_times=1) as smsc:
        esme = esme_factory(smsc.port)
        esme.bind()
        answers = iter([ESME_RX_T_APPN, ESME_ROK])
        esme.client.set_message_received_handler(lambda pdu: esme.received.append(pdu) or next(answers))
        smsc.send_mo(PHONE, SERVICE_NUMBER, "5")
        esme.read_until(lambda: len(esme.received) == 2)
        smsc.wait_for(lambda: len(smsc.deliveries()) == 2 and smsc.deliveries()[1].status is not None)
        assert [(d.attempt, d.status) for d in smsc.deliveries()] == [(1, ESME_RX_T_APPN), (2, ESME_ROK)]
        assert esme.received[0].short_message == esme.received[1].short_message == "5".encode("utf-16-be")


# --- the fault-injecting SMSC -------------------------------------------------------------------


def test_disconnect_after_n_pdus_leaves_the_last_submit_unanswered(esme_factory) -> None:
    with Smsc(fault=Fault(disconnect_after_pdus=3)) as smsc:
        esme = esme_factory(smsc.port)
        esme.bind()  # PDU 1
        for text in ("一", "二", "三"):  # PDUs 2 and 3; the third may never be read
            esme.submit(text.encode("utf-16-be"))
        with pytest.raises(smpplib.exceptions.ConnectionError):
            esme.read_until(lambda: len(esme.responses) == 3)
        assert [pdu.status for pdu in esme.responses] == [ESME_ROK]
        assert [(r.text, r.status) for r in smsc.submits()] == [("一", ESME_ROK), ("二", None)]

        again = esme_factory(smsc.port)  # disconnect_times=1: the next connection is healthy
        again.bind()
        again.submit("二".encode("utf-16-be"))
        again.submit("三".encode("utf-16-be"))
        again.read_until(lambda: len(again.responses) == 2)
        assert [r.text for r in smsc.accepted()] == ["一", "二", "三"]
        assert smsc.acknowledged_twice() == []


def test_throttled_and_queue_full_answers_for_chosen_submits(esme_factory) -> None:
    with Smsc(fault=Fault(throttled=every(2), queue_full=nth(3))) as smsc:
        esme = esme_factory(smsc.port)
        esme.bind()
        for number in range(1, 6):
            esme.submit(str(number).encode("utf-16-be"))
        esme.read_until(lambda: len(esme.responses) == 5)
        expected = [ESME_ROK, ESME_RTHROTTLED, ESME_RMSGQFUL, ESME_RTHROTTLED, ESME_ROK]
        assert [pdu.status for pdu in esme.responses] == expected
        assert [r.status for r in smsc.submits()] == expected
        assert [r.text for r in smsc.accepted()] == ["1", "5"]


def test_unanswered_submit_gets_no_response(esme_factory) -> None:
    with Smsc(fault=Fault(unanswered=nth(2))) as smsc:
        esme = esme_factory(smsc.port, timeout=0.2)
        esme.bind()
        sequences = [esme.submit(str(number).encode("utf-16-be")) for number in range(1, 4)]
        esme.read_until(lambda: len(esme.responses) == 2)
        with pytest.raises(TimeoutError):
            esme.read_until(lambda: len(esme.responses) == 3, timeout=0.5)
        assert [pdu.sequence for pdu in esme.responses] == [sequences[0], sequences[2]]
        assert [r.status for r in smsc.submits()] == [ESME_ROK, None, ESME_ROK]


def test_slow_responses_come_after_the_delay(esme_factory) -> None:
    with Smsc(fault=Fault(response_delay=0.3, slow=nth(1))) as smsc:
        esme = esme_factory(smsc.port)
        esme.bind()
        started = time.monotonic()
        esme.submit(b"\x00A")
        esme.submit(b"\x00B")
        esme.read_until(lambda: len(esme.responses) == 2)
        assert time.monotonic() - started >= 0.3
        assert [pdu.message_id for pdu in esme.responses] == [b"a0001", b"a0000"]  # the fast one first


def test_refused_bind_then_accepted(esme_factory) -> None:
    with Smsc(fault=Fault(refused_binds=1)) as smsc:
        first = esme_factory(smsc.port)
        with pytest.raises(smpplib.exceptions.PDUError) as refused:
            first.bind()
        assert refused.value.args[1] == ESME_RBINDFAIL
        second = esme_factory(smsc.port)
        second.bind()
        assert smsc.binds == 1


def _raw_bind(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=2)
    sock.sendall(encode_pdu("bind_transceiver", 1, system_id="gateway", password="secret"))
    return sock


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _read_pdu(sock: socket.socket):
    header = _read_exactly(sock, 16)
    (length,) = struct.unpack(">L", header[:4])
    return decode_pdu(header + _read_exactly(sock, length - 16))


@pytest.mark.parametrize("garbage", [INVALID_COMMAND_LENGTH, UNKNOWN_COMMAND_ID], ids=["length", "command-id"])
def test_garbage_after_a_pdu(garbage: bytes) -> None:
    with Smsc(fault=Fault(garbage_after_pdus=1, garbage=garbage)) as smsc, _raw_bind(smsc.port) as sock:
        assert _read_pdu(sock).command == "bind_transceiver_resp"
        assert _read_exactly(sock, len(garbage)) == garbage


def test_smpplib_cannot_read_an_unknown_command_id(esme_factory) -> None:
    with Smsc(fault=Fault(garbage_after_pdus=1, garbage=UNKNOWN_COMMAND_ID)) as smsc:
        esme = esme_factory(smsc.port)
        esme.bind()
        with pytest.raises(Exception):  # noqa: B017 - smpplib raises its UnknownCommandError
            esme.client.read_pdu()


def test_unbind_from_the_smsc_then_close_on_unbind_resp() -> None:
    with Smsc(fault=Fault(unbind_after_pdus=1)) as smsc, _raw_bind(smsc.port) as sock:
        assert _read_pdu(sock).command == "bind_transceiver_resp"
        unbind = _read_pdu(sock)
        assert unbind.command == "unbind"
        sock.sendall(encode_pdu("unbind_resp", unbind.sequence))
        assert sock.recv(16) == b""


def test_close_in_the_middle_of_a_response(esme_factory) -> None:
    with Smsc(fault=Fault(close_mid_pdu_after_pdus=2)) as smsc:
        esme = esme_factory(smsc.port)
        esme.bind()
        esme.submit(b"\x00A")
        with pytest.raises(smpplib.exceptions.ConnectionError):
            esme.read_until(lambda: esme.responses)
        assert [r.status for r in smsc.submits()] == [ESME_ROK]  # accepted by the SMSC, never acknowledged


def test_a_part_accepted_twice_is_reported(esme_factory) -> None:
    with Smsc() as smsc:
        esme = esme_factory(smsc.port)
        esme.bind()
        part = encode_ucs2_parts(LONG_INVITATION, reference=1)[0]
        esme.submit(part.short_message, esm_class=part.esm_class)
        esme.submit(part.short_message, esm_class=part.esm_class)
        esme.read_until(lambda: len(esme.responses) == 2)
        assert [r.sequence for r in smsc.acknowledged_twice()] == [esme.responses[1].sequence]


def test_codec_round_trip_of_a_receipt() -> None:
    data = encode_pdu(
        "deliver_sm",
        7,
        source_addr=PHONE,
        esm_class=4,
        short_message=b"id:1",
        receipted_message_id="1",
        message_state=2,
    )
    pdu = decode_pdu(data)
    assert HEADER.unpack_from(data)[0] == len(data)
    assert (pdu.command, pdu.sequence, pdu.fields["source_addr"], pdu.fields["short_message"]) == (
        "deliver_sm",
        7,
        PHONE,
        b"id:1",
    )
    assert pdu.optional == {"receipted_message_id": "1", "message_state": 2}


# --- the SMS benchmark's rate check ---------------------------------------------------------------


def _bench_sms():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "sms.py"
    if "bench_sms" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_sms", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_sms"] = module  # dataclasses look their module up while it loads
        spec.loader.exec_module(module)
    return sys.modules["bench_sms"]


@pytest.mark.parametrize(
    ("send_times", "duration", "achieved", "deviation"),
    [
        ([i / 100 for i in range(6001)], None, 100.0, 0.0),  # 100/s held for a minute
        ([i / 98 for i in range(5881)], None, 98.0, -0.02),  # 2 % slow: at the limit
        ([i / 200 for i in range(6001)], 60.0, 100.0, 0.0),  # too fast, but only 6,000 were due
        ([i / 100 for i in range(6001)] + [70.0, 71.0], 60.0, 100.0, 0.0),  # late sends outside the window
    ],
)
def test_rate_report_measures_the_rate_held(send_times, duration, achieved, deviation) -> None:
    report = _bench_sms().rate_report(send_times, 100.0, duration)
    assert report.achieved == pytest.approx(achieved, rel=1e-3)
    assert report.deviation == pytest.approx(deviation, abs=1e-3)
