"""Outgoing SMS texts, UCS-2 parts and reassembly of incoming parts (gateway.sms.text, SPEC R3.1, R3.7a).

The part layout is checked byte by byte against 3GPP TS 23.040 (UDH IEI 00 and 08), and the
round trip encode → reassemble is checked for any text, emoji included, in any arrival order.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.rating import KeyMap
from gateway.sms.text import (
    ESM_CLASS_UDHI,
    MATTER_NAME_MAX,
    Concatenation,
    Duplicate,
    IncomingMessage,
    IncomingPart,
    IncompleteMessage,
    Reassembler,
    Waiting,
    deadline_phrase,
    decode_payload,
    default_rating_notice_text,
    encode_ucs2_parts,
    invitation_text,
    next_reference,
    reminder_text,
    reply_menu,
    served_phrase,
    signed,
    split_udh,
    ucs2_units,
)
from gateway.workdays import SHANGHAI

CLOSES = datetime(2026, 2, 26, 18, 30, tzinfo=SHANGHAI)
T0 = datetime(2026, 2, 10, 9, 0, tzinfo=SHANGHAI)
PHONE = "8613800138000"
EMOJI = "😀"  # U+1F600: a surrogate pair in UTF-16

# --- texts (SPEC R3.1, R3.3, R3.4) ---------------------------------------------------------------


def test_invitation_has_signature_subject_menu_deadline_and_opt_out() -> None:
    text = invitation_text(signature="【12345热线】", matter_name="不动产登记", closes_at=CLOSES)
    assert text == (
        "【12345热线】您办理的“不动产登记”事项已办结，请您评价：回复1非常满意，2满意，3基本满意，4不满意，"
        "5非常不满意。请于2月26日18:30前回复，逾期默认“基本满意”。回复TD退订"
    )
    assert len(encode_ucs2_parts(text, 0)) == 2


def test_invitation_for_a_hotline_call() -> None:
    text = invitation_text(signature="12345热线", matter_name=None, closes_at=CLOSES)
    assert text.startswith("【12345热线】您的12345热线来电已办结，请您评价：回复1非常满意")


def test_reminder_is_worded_as_a_reminder() -> None:
    text = reminder_text(signature="【12345热线】", matter_name="不动产登记", closes_at=CLOSES)
    assert text == (
        "【12345热线】温馨提醒：您办理的“不动产登记”事项已办结，期待您的评价：回复1非常满意，2满意，3基本满意，"
        "4不满意，5非常不满意。请于2月26日18:30前回复。回复TD退订"
    )


def test_default_rating_notice_names_the_default_level() -> None:
    assert default_rating_notice_text(signature="【12345热线】", matter_name=None) == (
        "【12345热线】您的12345热线来电的评价期已结束，系统已按“基本满意”记录。感谢您的支持！回复TD退订"
    )


def test_menu_follows_the_configured_key_map() -> None:
    assert reply_menu() == "回复1非常满意，2满意，3基本满意，4不满意，5非常不满意"
    reversed_menu = KeyMap.from_config({"1": 1, "2": 2, "3": 3, "4": 4, "5": 5})
    assert reply_menu(reversed_menu) == "回复1非常不满意，2不满意，3基本满意，4满意，5非常满意"


@pytest.mark.parametrize(
    ("signature", "expected"),
    [
        ("【12345热线】", "【12345热线】正文"),
        ("12345热线", "【12345热线】正文"),
        ("", "正文"),
        (" 【政务服务】 ", "【政务服务】正文"),
    ],
)
def test_signature_is_always_bracketed(signature: str, expected: str) -> None:
    assert signed(signature, "正文") == expected


def test_a_long_matter_name_is_shortened_so_the_invitation_stays_short() -> None:
    long_name = "企业投资项目备案（含变更）及相关事项的办理与咨询服务的一件事联办"
    phrase = served_phrase(long_name)
    assert phrase == f"您办理的“{long_name[: MATTER_NAME_MAX - 1]}…”事项"
    text = invitation_text(signature="【12345热线】", matter_name=long_name, closes_at=CLOSES)
    assert len(encode_ucs2_parts(text, 0)) == 2


@pytest.mark.parametrize(
    ("items", "theme", "expected"),
    [
        (1, False, "您办理的“营业执照”事项"),
        (3, False, "您办理的“营业执照”事项（批量3件）"),
        (3, True, "您办理的“一件事”主题服务（含“营业执照”等3个事项）"),
        (1, True, "您办理的“一件事”主题服务（含“营业执照”）"),
    ],
)
def test_a_batch_or_a_theme_is_named_as_one_service(items: int, theme: bool, expected: str) -> None:
    """SPEC R1.6: the citizen is asked once for the whole batch or theme."""
    assert served_phrase("营业执照", items=items, theme=theme) == expected


def test_a_theme_is_asked_for_its_overall_rating_within_three_parts() -> None:
    long_name = "企业投资项目备案（含变更）及相关事项的办理与咨询服务的一件事联办"
    text = invitation_text(signature="【12345热线】", matter_name=long_name, closes_at=CLOSES, items=12, theme=True)
    assert "请您对整体服务评价" in text and "等12个事项" in text
    assert len(encode_ucs2_parts(text, 0)) <= 3
    reminder = reminder_text(signature="【12345热线】", matter_name="营业执照", closes_at=CLOSES, items=2, theme=True)
    assert "期待您的整体评价" in reminder


def test_deadline_is_shanghai_wall_clock() -> None:
    assert deadline_phrase(datetime(2026, 2, 26, 10, 30, tzinfo=SHANGHAI) - timedelta(hours=8)) == "2月26日02:30"
    with pytest.raises(ValueError, match="timezone"):
        deadline_phrase(datetime(2026, 2, 26, 18, 30))


# --- encoding (SPEC R3.1) -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "parts"),
    [(0, 1), (1, 1), (70, 1), (71, 2), (134, 2), (135, 3), (201, 3), (202, 4)],
)
def test_part_counts(length: int, parts: int) -> None:
    encoded = encode_ucs2_parts("评" * length, reference=7)
    assert len(encoded) == parts
    assert all(len(part.short_message) <= 140 for part in encoded)
    assert all(part.data_coding == 8 for part in encoded)


def test_single_part_has_no_udh() -> None:
    (part,) = encode_ucs2_parts("【12345热线】谢谢", reference=9)
    assert part.udh == b""
    assert part.esm_class == 0
    assert part.short_message == "【12345热线】谢谢".encode("utf-16-be")


def test_udh_bytes_of_concatenated_parts() -> None:
    parts = encode_ucs2_parts("评" * 135, reference=0xA7)
    assert [part.udh.hex() for part in parts] == ["050003a70301", "050003a70302", "050003a70303"]
    assert all(part.esm_class == ESM_CLASS_UDHI for part in parts)
    assert parts[0].short_message == bytes.fromhex("050003a70301") + ("评" * 67).encode("utf-16-be")
    assert [len(part.payload) for part in parts] == [134, 134, 2]


def test_sixteen_bit_reference_uses_iei_08_and_66_units() -> None:
    parts = encode_ucs2_parts("评" * 133, reference=0x1234, sixteen_bit=True)
    assert [part.udh.hex() for part in parts] == ["06080412340301", "06080412340302", "06080412340303"]
    assert [len(part.payload) for part in parts] == [132, 132, 2]


@pytest.mark.parametrize(
    ("text", "part_units"),
    [
        (EMOJI * 35, [70]),  # 70 code units: still one part
        ("a" * 69 + EMOJI, [67, 4]),  # 71 units: the emoji is not split at 67
        ("a" * 66 + EMOJI + "b" * 5, [66, 7]),  # the pair would straddle 67|68: it moves whole
        ("a" * 65 + EMOJI + "b" * 10, [67, 10]),  # the pair fits exactly at 66-67
        (EMOJI * 40, [66, 14]),  # 33 emoji fill 66 units; the 34th does not fit in 67
    ],
)
def test_emoji_is_never_split_across_parts(text: str, part_units: list[int]) -> None:
    parts = encode_ucs2_parts(text, reference=1)
    assert [len(part.payload) // 2 for part in parts] == part_units
    for part in parts:
        part.payload.decode("utf-16-be")  # raises on half a surrogate pair
        assert not 0xD800 <= int.from_bytes(part.payload[-2:], "big") <= 0xDBFF


def test_text_that_cannot_be_sent() -> None:
    with pytest.raises(ValueError, match="lone surrogate"):
        encode_ucs2_parts("评价\ud83d", reference=1)
    with pytest.raises(ValueError, match="at most 255"):
        encode_ucs2_parts("评" * (255 * 67 + 1), reference=1)
    with pytest.raises(ValueError, match="does not fit 8 bits"):
        encode_ucs2_parts("评" * 71, reference=256)


@pytest.mark.parametrize(
    ("previous", "sixteen_bit", "expected"),
    [(None, False, 0), (0, False, 1), (254, False, 255), (255, False, 0), (255, True, 256), (65535, True, 0)],
)
def test_next_reference_wraps(previous: int | None, sixteen_bit: bool, expected: int) -> None:
    assert next_reference(previous, sixteen_bit=sixteen_bit) == expected


# --- reading incoming parts (SPEC R3.5, R3.7a) --------------------------------------------------


@pytest.mark.parametrize(
    ("short_message", "concatenation", "payload"),
    [
        (bytes.fromhex("0500030c0201") + b"\x00\x31", Concatenation(12, 2, 1), b"\x00\x31"),
        (bytes.fromhex("06080401020302") + b"\x00\x32", Concatenation(0x0102, 3, 2, 16), b"\x00\x32"),
        # a port-addressing element first, then the concatenation
        (bytes.fromhex("0b05040b8423f00003070201") + b"x", Concatenation(7, 2, 1), b"x"),
        (bytes.fromhex("0401020304") + b"x", None, b"x"),  # another element only
        (bytes.fromhex("0500030c") + b"x", None, bytes.fromhex("0500030c") + b"x"),  # header cut short
        (bytes.fromhex("0500030c0203") + b"x", None, b"x"),  # part 3 of 2
        (b"", None, b""),
    ],
)
def test_split_udh(short_message: bytes, concatenation: Concatenation | None, payload: bytes) -> None:
    assert split_udh(short_message) == (concatenation, payload)


def test_incoming_part_from_udh_or_sar_tlvs() -> None:
    by_udh = IncomingPart.from_pdu(PHONE, bytes.fromhex("050003050201") + b"\x00\x34", esm_class=0x40, data_coding=8)
    assert by_udh == IncomingPart(PHONE, b"\x00\x34", 8, Concatenation(5, 2, 1))
    by_sar = IncomingPart.from_pdu(
        PHONE, b"\x00\x34", esm_class=0, data_coding=8, sar_msg_ref_num=300, sar_total_segments=2, sar_segment_seqnum=2
    )
    assert by_sar.concatenation == Concatenation(300, 2, 2, 16)
    one_of_one = IncomingPart.from_pdu(PHONE, bytes.fromhex("050003050101") + b"1", esm_class=0x40, data_coding=0)
    assert one_of_one.concatenation is None
    no_udhi = IncomingPart.from_pdu(PHONE, bytes.fromhex("0500030502"), esm_class=0, data_coding=0)
    assert no_udhi.payload == bytes.fromhex("0500030502")


@pytest.mark.parametrize(
    ("payload", "data_coding", "text"),
    [
        (b"1", 0, "1"),
        (b"TD", 0, "TD"),
        (b"4 tai man", 0, "4 tai man"),
        (b"\x00\x02\x11", 0, "@$_"),  # GSM basic table below 0x20
        (b"\x1b\x65\x1b\x3c", 0, "€["),  # GSM extension table
        (b"caf\xe9", 0, "café"),  # Latin-1 above 0x7F
        ("４ 态度不好".encode("gbk"), 0, "４ 态度不好"),  # GBK labelled 0 by a Chinese SMSC
        ("满意".encode(), 0, "满意"),  # UTF-8 labelled 0
        (b"1", 1, "1"),  # IA5
        ("满意".encode("utf-16-be"), 8, "满意"),
        (f"1{EMOJI}".encode("utf-16-be"), 8, f"1{EMOJI}"),
        (b"\xfe\xff" + "满意".encode("utf-16-be"), 8, "满意"),  # byte order mark
        (b"\xff\xfe" + "满意".encode("utf-16-le"), 8, "满意"),  # little-endian, marked
        ("满".encode("utf-16-be") + b"\x61", 8, "满\ufffd"),  # odd length
        (b"\xd8\x3d\x00\x31", 8, "\ufffd1"),  # half an emoji
        ("é".encode("latin-1"), 3, "é"),
        ("４ 态度不好".encode("gbk"), 15, "４ 态度不好"),
        ("满意".encode(), 15, "满意"),  # UTF-8 under the GBK label
        (b"\xff\xff\x81", 15, "\ufffd\ufffd\ufffd"),
        ("满意".encode("gbk"), 4, "满意"),  # binary
        ("满意".encode("utf-16-be"), 0x18, "满意"),  # GSM DCS: UCS-2 with a message class
        (b"1", 0xF0, "1"),  # GSM DCS: 7-bit, class 0
        ("Привет".encode("iso8859_5"), 6, "Привет"),
    ],
)
def test_decode_payload(payload: bytes, data_coding: int, text: str) -> None:
    assert decode_payload(payload, data_coding) == text


@given(st.binary(max_size=300), st.integers(min_value=0, max_value=255))
@settings(max_examples=300, deadline=None)
def test_decode_never_raises(payload: bytes, data_coding: int) -> None:
    assert isinstance(decode_payload(payload, data_coding), str)


def ucs2_parts(sender: str, text: str, reference: int) -> list[IncomingPart]:
    return [
        IncomingPart.from_pdu(sender, part.short_message, esm_class=part.esm_class, data_coding=part.data_coding)
        for part in encode_ucs2_parts(text, reference)
    ]


LONG_REPLY = "4 " + "窗口工作人员态度不好，" * 12  # 134 characters: 2 parts
OTHER_LONG_REPLY = "5" + LONG_REPLY[1:]  # as long, different bytes


def test_single_part_message_is_complete_at_once() -> None:
    reassembler = Reassembler()
    (part,) = ucs2_parts(PHONE, "1", 3)
    assert reassembler.add(part, T0) == IncomingMessage(PHONE, "1")


def test_parts_out_of_order_are_reassembled() -> None:
    reassembler = Reassembler()
    text = LONG_REPLY + "排队两小时"
    first, second, third = ucs2_parts(PHONE, text, 200)
    assert reassembler.add(third, T0) == Waiting(PHONE, 1, 3)
    assert reassembler.add(first, T0 + timedelta(seconds=1)) == Waiting(PHONE, 2, 3)
    assert reassembler.add(second, T0 + timedelta(seconds=2)) == IncomingMessage(PHONE, text, 3)
    assert reassembler.pending == 0


def test_emoji_cut_in_half_by_the_sender_still_decodes() -> None:
    """smpplib's make_parts cuts every 134 bytes, through a surrogate pair (LIBRARIES.md)."""
    text = "谢" * 66 + EMOJI + "好"
    data = text.encode("utf-16-be")
    halves = [data[:134], data[134:]]
    reassembler = Reassembler()
    results = [
        reassembler.add(IncomingPart(PHONE, half, 8, Concatenation(9, 2, number)), T0)
        for number, half in enumerate(halves, start=1)
    ]
    assert results[-1] == IncomingMessage(PHONE, text, 2)


def test_exact_repeats_are_duplicates_before_and_after_completion() -> None:
    """SPEC R3.7a: an SMSC re-delivering a part is counted once."""
    reassembler = Reassembler()
    first, second = ucs2_parts(PHONE, LONG_REPLY, 17)
    assert isinstance(reassembler.add(first, T0), Waiting)
    assert reassembler.add(first, T0) == Duplicate(PHONE, Concatenation(17, 2, 1))
    assert reassembler.add(second, T0) == IncomingMessage(PHONE, LONG_REPLY, 2)
    assert reassembler.add(second, T0 + timedelta(minutes=5)) == Duplicate(PHONE, Concatenation(17, 2, 2))
    assert reassembler.add(first, T0 + timedelta(minutes=5)) == Duplicate(PHONE, Concatenation(17, 2, 1))
    # long after, the same bytes are a new message again (the phone's counter went round)
    assert isinstance(reassembler.add(first, T0 + timedelta(hours=1)), Waiting)


def test_sets_are_kept_apart_by_sender_reference_and_total() -> None:
    reassembler = Reassembler()
    mine = ucs2_parts(PHONE, LONG_REPLY, 17)
    theirs = ucs2_parts("8613900139000", OTHER_LONG_REPLY, 17)
    other_reference = ucs2_parts(PHONE, OTHER_LONG_REPLY, 18)
    for part in (mine[0], theirs[0], other_reference[0]):
        assert isinstance(reassembler.add(part, T0), Waiting)
    assert reassembler.pending == 3
    assert reassembler.add(theirs[1], T0) == IncomingMessage("8613900139000", OTHER_LONG_REPLY, 2)
    assert reassembler.add(mine[1], T0) == IncomingMessage(PHONE, LONG_REPLY, 2)


def test_incomplete_sets_expire_after_the_timeout() -> None:
    reassembler = Reassembler(timeout=timedelta(minutes=30))
    first, second = ucs2_parts(PHONE, LONG_REPLY, 40)
    assert isinstance(reassembler.add(first, T0), Waiting)
    assert reassembler.expire(T0 + timedelta(minutes=29, seconds=59)) == []
    (expired,) = reassembler.expire(T0 + timedelta(minutes=30))
    assert expired == IncompleteMessage(PHONE, 40, 2, (1,), LONG_REPLY[:67])
    assert reassembler.expire(T0 + timedelta(minutes=31)) == []
    assert reassembler.add(second, T0 + timedelta(minutes=31)) == Waiting(PHONE, 1, 2)


def test_a_reused_reference_gives_up_the_old_set() -> None:
    reassembler = Reassembler()
    old_first, _ = ucs2_parts(PHONE, LONG_REPLY, 5)
    new_first, new_second = ucs2_parts(PHONE, OTHER_LONG_REPLY, 5)
    reassembler.add(old_first, T0)
    assert reassembler.add(new_first, T0 + timedelta(minutes=1)) == Waiting(PHONE, 1, 2)
    assert reassembler.add(new_second, T0 + timedelta(minutes=1)) == IncomingMessage(PHONE, OTHER_LONG_REPLY, 2)
    (given_up,) = reassembler.expire(T0 + timedelta(minutes=2))
    assert (given_up.reference, given_up.received, given_up.text) == (5, (1,), LONG_REPLY[:67])


def test_too_many_open_sets_give_up_the_oldest() -> None:
    reassembler = Reassembler(max_pending=2)
    for minute, reference in enumerate((1, 2, 3)):
        reassembler.add(ucs2_parts(PHONE, LONG_REPLY, reference)[0], T0 + timedelta(minutes=minute))
    assert reassembler.pending == 2
    assert [incomplete.reference for incomplete in reassembler.expire(T0 + timedelta(minutes=3))] == [1]


def test_a_restarted_reassembler_completes_from_stored_parts() -> None:
    """The adapter stores each part before acknowledging it and feeds them back after a restart."""
    first, second = ucs2_parts(PHONE, LONG_REPLY, 77)
    Reassembler().add(first, T0)  # the process that received part 1 is gone
    restarted = Reassembler()
    assert isinstance(restarted.add(first, T0 + timedelta(minutes=1)), Waiting)
    assert restarted.add(second, T0 + timedelta(minutes=1)) == IncomingMessage(PHONE, LONG_REPLY, 2)


def test_reassembler_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="timeout"):
        Reassembler(timeout=timedelta(0))


# --- the round trip -----------------------------------------------------------------------------

ANY_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",)) | st.sampled_from([EMOJI, "👍", "满", "意", "１"]), max_size=400
)


@given(ANY_TEXT, st.integers(min_value=0, max_value=255), st.randoms(use_true_random=False))
@settings(max_examples=200, deadline=None)
def test_encode_then_reassemble_gives_back_the_text(text: str, reference: int, shuffle: random.Random) -> None:
    parts = encode_ucs2_parts(text, reference)
    assert sum(ucs2_units(part.payload.decode("utf-16-be")) for part in parts) == ucs2_units(text)
    incoming = [
        IncomingPart.from_pdu(PHONE, part.short_message, esm_class=part.esm_class, data_coding=part.data_coding)
        for part in parts
    ]
    shuffle.shuffle(incoming)
    reassembler = Reassembler()
    results = [reassembler.add(part, T0) for part in incoming]
    assert results[-1] == IncomingMessage(PHONE, text, len(parts))
    assert all(isinstance(result, Waiting) for result in results[:-1])
