"""SMPP PDUs as bytes: framing, resync after garbage, submit_sm and deliver_sm held to smpplib's bytes."""

from __future__ import annotations

import struct
from typing import Any

import pytest
import smpplib.client
import smpplib.smpp

from gateway.sms.pdu import (
    DeliverSm,
    FramingError,
    PduDecodeError,
    PduFramer,
    decode_incoming,
    encode_submit_sm,
    read_header,
)
from gateway.testing.smsc import encode_pdu


def pdu(command_id: int, sequence: int, body: bytes = b"", status: int = 0) -> bytes:
    return struct.pack(">LLLL", 16 + len(body), command_id, status, sequence) + body


def test_framer_cuts_a_stream_into_pdus_whatever_the_chunks() -> None:
    stream = pdu(0x80000004, 2, b"abc\x00") + pdu(0x00000015, 3) + pdu(0x00000005, 4, b"x" * 300)
    for chunk_size in (1, 3, 16, 17, 1000):
        framer = PduFramer()
        out: list[bytes] = []
        for i in range(0, len(stream), chunk_size):
            out += framer.feed(stream[i : i + chunk_size])
        assert [read_header(p).sequence for p in out] == [2, 3, 4]
        assert b"".join(out) == stream
        assert framer.pending == 0


@pytest.mark.parametrize("length", [0, 4, 15, 1_000_000, 0xFFFFFFFF])
def test_framer_refuses_an_impossible_length(length: int) -> None:
    framer = PduFramer()
    with pytest.raises(FramingError, match="not SMPP"):
        framer.feed(struct.pack(">L", length) + b"\x00" * 12)


def test_after_garbage_the_framer_finds_the_next_plausible_answer() -> None:
    answer = pdu(0x80000004, 7, b"a0001\x00")
    stream = pdu(0x80000004, 6, b"a0000\x00") + b"\x00\x00\x00\x03\x00\x00\x00" + b"HTTP/1.1 400" + answer
    framer = PduFramer()
    with pytest.raises(FramingError) as caught:
        framer.feed(stream[:40])
    assert [read_header(p).sequence for p in caught.value.pdus] == [6]
    outstanding = {7}
    found = framer.resync(lambda h: h.command_id == 0x80000004 and h.sequence in outstanding)
    found += framer.feed(stream[40:])
    assert found == [answer]
    assert framer.feed(pdu(0x00000015, 8)) == [pdu(0x00000015, 8)]  # back in step


def test_resync_finds_nothing_in_noise_that_merely_looks_like_lengths() -> None:
    framer = PduFramer()
    with pytest.raises(FramingError):
        framer.feed(b"\x00\x00\x00\x02" + bytes(range(256)) * 4)
    assert framer.resync(lambda h: h.command_id == 0x80000004 and h.sequence in {1, 2, 3}) == []
    assert framer.pending < 16


SUBMITS = [
    # (source, destination, esm_class, registered_delivery, data_coding, short_message, tons/npis)
    ("106900123450001", "13800138000", 0, 1, 8, "您好".encode("utf-16-be"), (0, 0, 0, 1)),
    (
        "10690012345",
        "8613800138000",
        0x40,
        1,
        8,
        bytes([5, 0, 3, 42, 2, 1]) + "满意".encode("utf-16-be") * 33,
        (0, 0, 1, 1),
    ),
    ("12345678901234567890", "1", 0x40, 0, 0, b"TD", (5, 0, 2, 9)),
    ("1069", "13800138000", 0, 0, 0, b"", (0, 0, 0, 0)),
    ("1069", "13800138000", 3, 0x11, 0xF0, bytes(range(254)), (1, 1, 1, 1)),
]


@pytest.mark.parametrize("source,destination,esm_class,registered,coding,message,addressing", SUBMITS)
def test_submit_sm_is_encoded_byte_for_byte_as_smpplib_does(
    source: str, destination: str, esm_class: int, registered: int, coding: int, message: bytes, addressing: tuple
) -> None:
    s_ton, s_npi, d_ton, d_npi = addressing
    client = smpplib.client.Client("127.0.0.1", 1, allow_unknown_opt_params=True)
    reference = smpplib.smpp.make_pdu(
        "submit_sm",
        client=client,
        service_type="",
        source_addr_ton=s_ton,
        source_addr_npi=s_npi,
        source_addr=source,
        dest_addr_ton=d_ton,
        dest_addr_npi=d_npi,
        destination_addr=destination,
        esm_class=esm_class,
        registered_delivery=registered,
        data_coding=coding,
        short_message=message,
    )
    ours = encode_submit_sm(
        reference.sequence,
        source_addr_ton=s_ton,
        source_addr_npi=s_npi,
        source_addr=source,
        dest_addr_ton=d_ton,
        dest_addr_npi=d_npi,
        destination_addr=destination,
        esm_class=esm_class,
        registered_delivery=registered,
        data_coding=coding,
        short_message=message,
    )
    assert ours == reference.generate()
    parsed = smpplib.smpp.parse_pdu(ours, client=client, allow_unknown_opt_params=True)
    assert (parsed.short_message or b"") == message and parsed.destination_addr == destination.encode()


@pytest.mark.parametrize(
    "change",
    [{"short_message": b"x" * 255}, {"source_addr": "1" * 21}, {"destination_addr": "１３８"}],
)
def test_a_submit_sm_that_does_not_fit_is_refused_not_cut_short(change: dict) -> None:
    fields: dict = {
        "source_addr_ton": 0,
        "source_addr_npi": 0,
        "source_addr": "1069",
        "dest_addr_ton": 0,
        "dest_addr_npi": 1,
        "destination_addr": "13800138000",
        "esm_class": 0,
        "registered_delivery": 1,
        "data_coding": 8,
        "short_message": b"",
    }
    with pytest.raises(ValueError):
        encode_submit_sm(2, **(fields | change))


def test_a_response_header_says_it_is_one() -> None:
    assert read_header(pdu(0x80000004, 9, status=0x58)).is_response
    assert not read_header(pdu(0x00000005, 9)).is_response


RECEIPT_TEXT = b"id:a0001 sub:001 dlvrd:001 submit date:2402241830 done date:2402241831 stat:DELIVRD err:000 text:"
UDH_PART = bytes([5, 0, 3, 9, 2, 1]) + "4 排队".encode("utf-16-be")

#: (case, fields for the peer's encoder, what the gateway reads)
INCOMING: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "receipt with TLVs",
        {"esm_class": 4, "data_coding": 0, "short_message": RECEIPT_TEXT, "receipted_message_id": "a0001"}
        | {"message_state": 2},
        {"is_receipt": True, "receipted_message_id": "a0001", "message_state": 2, "short_message": RECEIPT_TEXT},
    ),
    (
        "receipt text only",
        {"esm_class": 4, "data_coding": 0, "short_message": RECEIPT_TEXT},
        {"is_receipt": True, "receipted_message_id": None, "message_state": None},
    ),
    (
        "intermediate notification",
        {"esm_class": 8, "data_coding": 0, "short_message": b"", "receipted_message_id": "0000012345"}
        | {"message_state": 1},
        {"is_receipt": True, "receipted_message_id": "0000012345", "message_state": 1},
    ),
    (
        "reply in UCS-2",
        {"esm_class": 0, "data_coding": 8, "short_message": "１ 很满意".encode("utf-16-be")},
        {"is_receipt": False, "data_coding": 8, "short_message": "１ 很满意".encode("utf-16-be")},
    ),
    (
        "reply part with UDH",
        {"esm_class": 0x40, "data_coding": 8, "short_message": UDH_PART},
        {"is_receipt": False, "esm_class": 0x40, "short_message": UDH_PART},
    ),
    (
        "reply part with sar TLVs",
        {"esm_class": 0, "data_coding": 8, "short_message": b"\x00\x35", "sar_msg_ref_num": 513}
        | {"sar_total_segments": 2, "sar_segment_seqnum": 2},
        {"sar_msg_ref_num": 513, "sar_total_segments": 2, "sar_segment_seqnum": 2},
    ),
    (
        "reply in message_payload",
        {"esm_class": 0, "data_coding": 8, "short_message": b"", "message_payload": "很满意".encode("utf-16-be")},
        {"short_message": "很满意".encode("utf-16-be")},
    ),
    (
        "GBK reply",
        {"esm_class": 0, "data_coding": 15, "short_message": "满意".encode("gbk")},
        {"data_coding": 15, "short_message": "满意".encode("gbk")},
    ),
]


@pytest.mark.parametrize(("case", "fields", "expected"), INCOMING, ids=[c[0] for c in INCOMING])
def test_deliver_sm_is_read_as_smpplib_reads_it(case: str, fields: dict[str, Any], expected: dict[str, Any]) -> None:
    raw = encode_pdu("deliver_sm", 77, source_addr="13800000001", destination_addr="106900123450042", **fields)
    ours = decode_incoming(raw)
    assert (ours.source_addr, ours.destination_addr) == ("13800000001", "106900123450042")
    for name, value in expected.items():
        assert getattr(ours, name) == value, name
    theirs = smpplib.smpp.parse_pdu(raw, client=smpplib.client.Client("x", 1, allow_unknown_opt_params=True))
    assert ours.esm_class == theirs.esm_class and ours.data_coding == theirs.data_coding
    assert ours.message_state == theirs.message_state
    assert ours.receipted_message_id == (theirs.receipted_message_id.decode() if theirs.receipted_message_id else None)
    assert ours.short_message == (theirs.short_message or theirs.message_payload or b"")
    assert (ours.sar_msg_ref_num, ours.sar_total_segments, ours.sar_segment_seqnum) == (
        theirs.sar_msg_ref_num,
        theirs.sar_total_segments,
        theirs.sar_segment_seqnum,
    )


def with_tlv(raw: bytes, tag: int, value: bytes) -> bytes:
    tlv = struct.pack(">HH", tag, len(value)) + value
    return struct.pack(">L", len(raw) + len(tlv)) + raw[4:] + tlv


def test_a_receipted_message_id_without_its_nul_keeps_its_last_character() -> None:
    base = encode_pdu("deliver_sm", 5, source_addr="138", destination_addr="1069", esm_class=4, short_message=b"")
    raw = with_tlv(base, 0x001E, b"a0001")  # some SMSCs leave the NUL out
    assert decode_incoming(raw).receipted_message_id == "a0001"
    theirs = smpplib.smpp.parse_pdu(raw, client=smpplib.client.Client("x", 1, allow_unknown_opt_params=True))
    assert theirs.receipted_message_id == b"a000"  # smpplib loses the "1": the receipt would match nothing


def test_data_sm_is_read_too_and_unknown_tlvs_are_skipped() -> None:
    body = b"\x00" + b"\x01\x01" + b"13800000001\x00" + b"\x00\x00" + b"1069001234500\x00" + bytes([0, 0, 8])
    raw = struct.pack(">LLLL", 16 + len(body), 0x00000103, 0, 9) + body
    raw = with_tlv(with_tlv(raw, 0x1403, b"vendor"), 0x0424, "5".encode("utf-16-be"))
    message = decode_incoming(raw)
    assert message == DeliverSm("13800000001", "1069001234500", 0, 8, "5".encode("utf-16-be"))


@pytest.mark.parametrize(
    "cut",
    [
        lambda raw: raw[:20],  # mandatory fields missing
        lambda raw: struct.pack(">L", len(raw) + 3) + raw[4:] + b"\x04\x24\x00",  # a TLV header cut short
        lambda raw: struct.pack(">L", len(raw) + 4) + raw[4:] + b"\x04\x24\x00\x09",  # a TLV value missing
    ],
)
def test_a_garbled_deliver_sm_is_refused_with_a_reason(cut: Any) -> None:
    raw = encode_pdu("deliver_sm", 5, source_addr="138", destination_addr="1069", short_message=b"\x00\x35")
    with pytest.raises(PduDecodeError):
        decode_incoming(cut(raw))


@pytest.mark.parametrize("esm_class", [0x04, 0x08, 0x10, 0x20, 0x24])
def test_notifications_of_every_kind_are_not_a_citizens_text(esm_class: int) -> None:
    """SMPP 3.4 5.2.12: 0x20 is an intermediate delivery notification, 0x08 an SME acknowledgement."""
    assert DeliverSm("13800138000", "10690012345", esm_class, 0, b"id:a1 stat:ENROUTE", "a1", 1).is_receipt


@pytest.mark.parametrize("esm_class", [0x00, 0x40, 0x80, 0x03])
def test_a_message_with_a_udh_or_a_reply_path_is_a_citizens_text(esm_class: int) -> None:
    assert not DeliverSm("13800138000", "10690012345", esm_class, 8, "好".encode("utf-16-be")).is_receipt
