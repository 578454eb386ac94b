"""Delivery receipts (SPEC R3.7): what an SMSC says became of a part, read the robust way.

Receipts are where SMS gateways most often go wrong, so this module is strict about order:
the ``receipted_message_id`` and ``message_state`` TLVs first, the ``id:… stat:…`` text only
when they are missing; message ids are compared in a normalised form (case, leading zeros)
and, because some SMSCs answer ``submit_sm_resp`` in hex but report receipts in decimal (or
the other way round), a receipt id is looked up under each reading. Pure code: no I/O.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


class DeliveryState(enum.StrEnum):
    """A part's final or intermediate state (SMPP 3.4 §5.2.28 message_state)."""

    ENROUTE = "enroute"
    DELIVERED = "delivered"
    EXPIRED = "expired"
    DELETED = "deleted"
    UNDELIVERABLE = "undeliverable"
    ACCEPTED = "accepted"
    UNKNOWN = "unknown"
    REJECTED = "rejected"

    @property
    def is_final(self) -> bool:
        return self not in (DeliveryState.ENROUTE, DeliveryState.ACCEPTED, DeliveryState.UNKNOWN)

    @property
    def is_failure(self) -> bool:
        return self in (
            DeliveryState.EXPIRED,
            DeliveryState.DELETED,
            DeliveryState.UNDELIVERABLE,
            DeliveryState.REJECTED,
        )


_BY_MESSAGE_STATE = {
    1: DeliveryState.ENROUTE,
    2: DeliveryState.DELIVERED,
    3: DeliveryState.EXPIRED,
    4: DeliveryState.DELETED,
    5: DeliveryState.UNDELIVERABLE,
    6: DeliveryState.ACCEPTED,
    7: DeliveryState.UNKNOWN,
    8: DeliveryState.REJECTED,
}

_BY_STAT_TEXT = {
    "ENROUTE": DeliveryState.ENROUTE,
    "DELIVRD": DeliveryState.DELIVERED,
    "DELIVERED": DeliveryState.DELIVERED,
    "EXPIRED": DeliveryState.EXPIRED,
    "DELETED": DeliveryState.DELETED,
    "UNDELIV": DeliveryState.UNDELIVERABLE,
    "UNDELIVERABLE": DeliveryState.UNDELIVERABLE,
    "UNDELIVERED": DeliveryState.UNDELIVERABLE,
    "ACCEPTD": DeliveryState.ACCEPTED,
    "ACCEPTED": DeliveryState.ACCEPTED,
    "UNKNOWN": DeliveryState.UNKNOWN,
    "REJECTD": DeliveryState.REJECTED,
    "REJECTED": DeliveryState.REJECTED,
}

_ID_FIELD = re.compile(rb"(?:^|\s)id:\s*([0-9A-Za-z\-_]{1,64})", re.IGNORECASE)
_STAT_FIELD = re.compile(rb"(?:^|\s)stat:\s*([A-Za-z]{2}:[0-9A-Za-z]{1,6}|[A-Za-z]{2,13})", re.IGNORECASE)
#: A Chinese carrier's gateway code relayed from CMPP (MK:0005, DB:0141, MA:0001): not delivered.
_CARRIER_CODE = re.compile(r"[A-Z]{2}:[0-9A-Z]{1,6}")
_ERR_FIELD = re.compile(rb"(?:^|\s)err:\s*([0-9A-Za-z]{1,8})", re.IGNORECASE)


class UnreadableReceipt(ValueError):
    """A receipt that names no message id or no state: stored for review, never guessed."""


@dataclass(frozen=True)
class Receipt:
    message_id: str  # as the SMSC wrote it
    state: DeliveryState
    error: str | None = None


def parse_receipt(
    short_message: bytes,
    *,
    receipted_message_id: str | bytes | None = None,
    message_state: int | None = None,
) -> Receipt:
    """Read a receipt ``deliver_sm``: the TLVs win over the text, each field on its own."""
    message_id = _text(receipted_message_id).strip().strip("\x00") if receipted_message_id else ""
    if not message_id:
        found = _ID_FIELD.search(short_message)
        message_id = found.group(1).decode("ascii") if found else ""
    state = _BY_MESSAGE_STATE.get(message_state) if message_state is not None else None
    stat = ""
    if state is None:
        found = _STAT_FIELD.search(short_message)
        stat = found.group(1).decode("ascii").upper() if found else ""
        if stat in _BY_STAT_TEXT:
            state = _BY_STAT_TEXT[stat]
        elif _CARRIER_CODE.fullmatch(stat):
            state = DeliveryState.UNDELIVERABLE
        elif stat:  # a word no table lists: kept as unknown (not final), with the word, not dropped
            state = DeliveryState.UNKNOWN
    if not message_id:
        raise UnreadableReceipt("the receipt names no message id (no receipted_message_id, no id: field)")
    if state is None:
        raise UnreadableReceipt("the receipt names no state (no message_state, no stat: field)")
    if stat and stat not in _BY_STAT_TEXT:  # the carrier's code or the unknown word says most
        return Receipt(message_id, state, stat)
    error = _ERR_FIELD.search(short_message)
    return Receipt(message_id, state, error.group(1).decode("ascii") if error else None)


def normalise_message_id(raw: str) -> str:
    """The form message ids are stored and compared in: trimmed, lower case, no leading zeros."""
    text = raw.strip().strip("\x00").lower()
    stripped = text.lstrip("0")
    return stripped or ("0" if text else "")


def candidate_ids(raw: str) -> list[str]:
    """Every stored form ``raw`` may match, the literal reading first (SPEC R3.7).

    A decimal receipt id may stand for a hex ``submit_sm_resp`` id and the reverse; an id made
    of digits only is read both ways.
    """
    literal = normalise_message_id(raw)
    candidates = [literal]
    if literal.isdigit() and len(literal) <= 20:
        candidates.append(format(int(literal), "x"))
    if literal and len(literal) <= 16 and all(c in "0123456789abcdef" for c in literal):
        candidates.append(str(int(literal, 16)))
    return list(dict.fromkeys(c for c in candidates if c))


def _text(value: str | bytes) -> str:
    return value.decode("ascii", errors="replace") if isinstance(value, bytes) else value
