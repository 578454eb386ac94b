"""Reading delivery receipts (SPEC R3.7): TLVs first, then the text, and never a receipt dropped
when it names its message and some state."""

from __future__ import annotations

import pytest

from gateway.sms.receipts import DeliveryState, Receipt, UnreadableReceipt, parse_receipt

TEXT = b"id:%s sub:001 dlvrd:000 submit date:2611241000 done date:2611241001 stat:%s err:%s text:"


@pytest.mark.parametrize(
    ("short_message", "tlvs", "expected"),
    [
        (TEXT % (b"a0001", b"DELIVRD", b"000"), {}, Receipt("a0001", DeliveryState.DELIVERED, "000")),
        (TEXT % (b"a0001", b"UNDELIV", b"001"), {}, Receipt("a0001", DeliveryState.UNDELIVERABLE, "001")),
        (TEXT % (b"a0001", b"UNDELIVERED", b"001"), {}, Receipt("a0001", DeliveryState.UNDELIVERABLE, "001")),
        (TEXT % (b"a0001", b"undeliv", b"001"), {}, Receipt("a0001", DeliveryState.UNDELIVERABLE, "001")),
        # A carrier's code relayed from CMPP: not delivered, and the code is the reason.
        (TEXT % (b"77", b"MK:0005", b"000"), {}, Receipt("77", DeliveryState.UNDELIVERABLE, "MK:0005")),
        (b"id:77 stat:DB:0141", {}, Receipt("77", DeliveryState.UNDELIVERABLE, "DB:0141")),
        # A word no table lists: kept (not final), not dropped.
        (b"id:77 stat:WEIRDO err:000", {}, Receipt("77", DeliveryState.UNKNOWN, "WEIRDO")),
        # The TLVs win over the text.
        (
            TEXT % (b"x", b"DELIVRD", b"000"),
            {"receipted_message_id": b"0A1B\x00", "message_state": 5},
            Receipt("0A1B", DeliveryState.UNDELIVERABLE, "000"),
        ),
    ],
)
def test_receipts_are_read(short_message: bytes, tlvs: dict[str, object], expected: Receipt) -> None:
    assert parse_receipt(short_message, **tlvs) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("short_message", "words"),
    [(b"sub:001 stat:DELIVRD", "no message id"), (b"id:a0001 sub:001 err:000", "no state")],
)
def test_a_receipt_without_id_or_state_is_unreadable(short_message: bytes, words: str) -> None:
    with pytest.raises(UnreadableReceipt, match=words):
        parse_receipt(short_message)


def test_unknown_is_not_final_and_a_carrier_code_is_a_failure() -> None:
    assert not DeliveryState.UNKNOWN.is_final
    assert parse_receipt(b"id:1 stat:MK:0005").state.is_failure
