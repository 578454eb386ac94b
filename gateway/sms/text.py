"""The words and bytes of SMS: outgoing texts, UCS-2 parts, incoming parts put back together.

Three jobs, in the order a message lives through them (SPEC R3.1, R3.5, R3.7a):

1. Composing the invitation, the reminder and the default-rating notice (Chinese, signed).
2. Encoding a text as UCS-2 short messages: one part of up to 70 UTF-16 code units, or
   concatenated parts of up to 67 units behind a 6-byte user data header (UDH). Unlike
   ``smpplib.gsm.make_parts``, a surrogate pair (an emoji) is never cut in two, and the
   concatenation reference is the caller's, so the store can keep one counter per phone and two
   long messages to one phone never share a reference (LIBRARIES.md).
3. Reading what arrives: the UDH of a ``deliver_sm``, the payload in whichever data coding the
   SMSC chose, and a :class:`Reassembler` that returns a multi-part reply once all its parts are
   in, counts an exact repeat once and gives up on incomplete sets after a timeout.

Pure code: no sockets, no clock; the time is always an argument.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from gateway.rating import DEFAULT_LEVEL, LEVEL_NAMES, KeyMap
from gateway.workdays import SHANGHAI

# ---------------------------------------------------------------------------------------------
# 1. Outgoing texts (SPEC R3.1, R3.3, R3.4)
# ---------------------------------------------------------------------------------------------

#: What was served, when the record is a hotline call rather than a named matter.
HOTLINE_CALL = "您的12345热线来电"
THEME_SERVICE = "您办理的“一件事”主题服务"
#: A matter name longer than this is shortened with "…", so an invitation stays within 2-3 parts.
MATTER_NAME_MAX = 30
OPT_OUT_WORDING = "回复TD退订"


def signed(signature: str, body: str) -> str:
    """Prefix ``body`` with the signature in 【】, which Chinese carriers require on every message.

    A signature configured without brackets (``12345热线``) gets them; an empty one adds nothing.
    """
    signature = signature.strip()
    if signature and not signature.startswith("【"):
        signature = f"【{signature}】"
    return f"{signature}{body}"


def reply_menu(key_map: KeyMap | None = None) -> str:
    """The reply menu in key order: ``回复1非常满意，2满意，3基本满意，4不满意，5非常不满意`` (SPEC R1.2)."""
    keys = (key_map or KeyMap.hotline_default()).keys
    choices = (f"{key}{LEVEL_NAMES[keys[key]]}" for key in sorted(keys) if key.isdigit())
    return "回复" + "，".join(choices)


def served_phrase(matter_name: str | None, *, items: int = 1, theme: bool = False) -> str:
    """What was served: ``您办理的“不动产登记”事项``, or ``您的12345热线来电`` for a call.

    A batch of ``items`` (批量业务) or a theme (主题式"一件事") is asked about once, as one
    service (SPEC R1.6), so the phrase names the whole: ``您办理的“营业执照”事项（批量3件）``,
    ``您办理的“一件事”主题服务（含“营业执照”等3个事项）``.
    """
    name = " ".join((matter_name or "").split())
    if len(name) > MATTER_NAME_MAX:
        name = name[: MATTER_NAME_MAX - 1] + "…"
    if theme:
        if not name:
            return THEME_SERVICE
        return f"{THEME_SERVICE}（含“{name}”等{items}个事项）" if items > 1 else f"{THEME_SERVICE}（含“{name}”）"
    if not name:
        return HOTLINE_CALL
    return f"您办理的“{name}”事项（批量{items}件）" if items > 1 else f"您办理的“{name}”事项"


def deadline_phrase(closes_at: datetime) -> str:
    """The end of the rating window in Shanghai wall-clock time, e.g. ``2月24日18:30``.

    The time is given because a window closes at the time of day the service was completed
    (SPEC R3.4): "before 24 February" alone would tell the citizen a day too little.
    """
    if closes_at.tzinfo is None:
        raise ValueError(f"The rating deadline {closes_at.isoformat()} has no timezone; pass an aware datetime.")
    local = closes_at.astimezone(SHANGHAI)
    return f"{local.month}月{local.day}日{local:%H:%M}"


def invitation_text(
    *,
    signature: str,
    matter_name: str | None,
    closes_at: datetime,
    key_map: KeyMap | None = None,
    items: int = 1,
    theme: bool = False,
) -> str:
    """The invitation (邀评短信, SPEC R3.1): signature, what was served, menu, deadline, opt-out.

    It also says which level is recorded if the citizen does not answer (SPEC R3.4), so that a
    default rating never comes as a surprise. A theme is asked for its overall rating (R1.6).
    """
    served = served_phrase(matter_name, items=items, theme=theme)
    return signed(
        signature,
        f"{served}已办结，请您{'对整体服务' if theme else ''}评价：{reply_menu(key_map)}。"
        f"请于{deadline_phrase(closes_at)}前回复，逾期默认“{LEVEL_NAMES[DEFAULT_LEVEL]}”。{OPT_OUT_WORDING}",
    )


def reminder_text(
    *,
    signature: str,
    matter_name: str | None,
    closes_at: datetime,
    key_map: KeyMap | None = None,
    items: int = 1,
    theme: bool = False,
) -> str:
    """The one reminder (SPEC R3.3), worded as a reminder so it is not taken for a repeat."""
    served = served_phrase(matter_name, items=items, theme=theme)
    return signed(
        signature,
        f"温馨提醒：{served}已办结，期待您的{'整体' if theme else ''}评价：{reply_menu(key_map)}。"
        f"请于{deadline_phrase(closes_at)}前回复。{OPT_OUT_WORDING}",
    )


def default_rating_notice_text(*, signature: str, matter_name: str | None) -> str:
    """Optional notice that the window closed and the default level was recorded (SPEC R3.4)."""
    return signed(
        signature,
        f"{served_phrase(matter_name)}的评价期已结束，系统已按“{LEVEL_NAMES[DEFAULT_LEVEL]}”记录。"
        f"感谢您的支持！{OPT_OUT_WORDING}",
    )


# ---------------------------------------------------------------------------------------------
# 2. UCS-2 parts (SPEC R3.1)
# ---------------------------------------------------------------------------------------------

#: SMPP data_coding values this module writes or reads by name.
DATA_CODING_DEFAULT = 0  # SMSC default alphabet (GSM 03.38 in practice)
DATA_CODING_LATIN1 = 3
DATA_CODING_UCS2 = 8
DATA_CODING_GBK = 15  # CMPP msg_fmt 15, passed through by some Chinese SMSCs
#: esm_class bit that says the short message starts with a user data header.
ESM_CLASS_UDHI = 0x40

SINGLE_PART_UNITS = 70  # 140 octets of UTF-16 code units
PART_UNITS_8BIT_REFERENCE = 67  # 140 - 6 octets of UDH, rounded down to whole units
PART_UNITS_16BIT_REFERENCE = 66  # 140 - 7 octets of UDH
MAX_PARTS = 255

_IEI_CONCAT_8BIT = 0x00
_IEI_CONCAT_16BIT = 0x08


@dataclass(frozen=True)
class Concatenation:
    """Where a part sits in a concatenated message (UDH IEI 00 or 08, or the SMPP sar_* TLVs)."""

    reference: int
    total: int
    sequence: int
    reference_bits: int = 8  # 8: IEI 00 (05 00 03 ref total seq); 16: IEI 08 (06 08 04 ref ref total seq)

    def __post_init__(self) -> None:
        if self.reference_bits not in (8, 16):
            raise ValueError(f"A concatenation reference has 8 or 16 bits, not {self.reference_bits}.")
        if not 0 <= self.reference < 1 << self.reference_bits:
            raise ValueError(
                f"Reference {self.reference} does not fit {self.reference_bits} bits "
                f"(0-{(1 << self.reference_bits) - 1}); take it from next_reference()."
            )
        if not 1 <= self.sequence <= self.total <= MAX_PARTS:
            raise ValueError(f"Part {self.sequence} of {self.total} is impossible: 1 <= part <= total <= 255.")

    @property
    def udh(self) -> bytes:
        if self.reference_bits == 8:
            return bytes([5, _IEI_CONCAT_8BIT, 3, self.reference, self.total, self.sequence])
        return bytes([6, _IEI_CONCAT_16BIT, 4, self.reference >> 8, self.reference & 0xFF, self.total, self.sequence])


@dataclass(frozen=True)
class Part:
    """One short message to submit: ``short_message`` with ``esm_class`` and ``data_coding``."""

    payload: bytes
    concatenation: Concatenation | None = None
    data_coding: int = DATA_CODING_UCS2

    @property
    def udh(self) -> bytes:
        return self.concatenation.udh if self.concatenation else b""

    @property
    def short_message(self) -> bytes:
        return self.udh + self.payload

    @property
    def esm_class(self) -> int:
        return ESM_CLASS_UDHI if self.concatenation else 0


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def ucs2_units(text: str) -> int:
    """How many UTF-16 code units ``text`` takes: 2 for a character beyond the BMP (most emoji)."""
    return len(text.encode("utf-16-be", "surrogatepass")) // 2


def encode_ucs2_parts(text: str, reference: int, *, sixteen_bit: bool = False) -> list[Part]:
    """Split ``text`` into UCS-2 (UTF-16-BE) short messages, data_coding 8 (SPEC R3.1).

    Up to 70 code units go in one part with no UDH. Longer texts go in parts of at most 67 units
    (66 with a 16-bit reference) behind a UDH ``05 00 03 ref total seq``; a part ends before a
    character that would not fit whole, so a surrogate pair is never split. ``reference`` is
    the caller's (see :func:`next_reference`); it is ignored for a single part.
    """
    if _LONE_SURROGATE.search(text):
        raise ValueError("The text holds a lone surrogate, which UCS-2 cannot carry; fix the text's source.")
    if ucs2_units(text) <= SINGLE_PART_UNITS:
        return [Part(text.encode("utf-16-be"))]
    limit = PART_UNITS_16BIT_REFERENCE if sixteen_bit else PART_UNITS_8BIT_REFERENCE
    chunks: list[str] = []
    current: list[str] = []
    units = 0
    for char in text:
        width = 2 if ord(char) > 0xFFFF else 1
        if units + width > limit:
            chunks.append("".join(current))
            current, units = [], 0
        current.append(char)
        units += width
    chunks.append("".join(current))
    if len(chunks) > MAX_PARTS:
        raise ValueError(f"The text needs {len(chunks)} parts; a concatenated SMS has at most {MAX_PARTS}. Shorten it.")
    bits = 16 if sixteen_bit else 8
    return [
        Part(chunk.encode("utf-16-be"), Concatenation(reference, len(chunks), number, bits))
        for number, chunk in enumerate(chunks, start=1)
    ]


def next_reference(previous: int | None, *, sixteen_bit: bool = False) -> int:
    """The reference after ``previous`` for the same phone (wrapping), 0 for the first message.

    Kept per phone by the store, a counter cannot repeat until 256 (or 65,536) long messages
    later, where smpplib's random choice collides after a handful.
    """
    modulus = 1 << (16 if sixteen_bit else 8)
    return 0 if previous is None else (previous + 1) % modulus


# ---------------------------------------------------------------------------------------------
# 3. Incoming: UDH, data codings, reassembly (SPEC R3.5, R3.7a)
# ---------------------------------------------------------------------------------------------


def split_udh(short_message: bytes) -> tuple[Concatenation | None, bytes]:
    """Split a short message with UDHI set into its concatenation (if any) and its payload.

    Other information elements (ports, special SMS indications) are skipped. A header that is
    cut short or describes an impossible part is not trusted: the whole message is returned as
    the payload with no concatenation, so that it is still stored and read, never lost.
    """
    if not short_message:
        return None, b""
    length = short_message[0]
    header, payload = short_message[1 : 1 + length], short_message[1 + length :]
    if len(header) < length:
        return None, short_message
    concatenation: Concatenation | None = None
    position = 0
    while position + 2 <= len(header):
        iei, size = header[position], header[position + 1]
        data = header[position + 2 : position + 2 + size]
        if len(data) < size:
            return None, short_message
        try:
            if iei == _IEI_CONCAT_8BIT and size == 3:
                concatenation = Concatenation(data[0], data[1], data[2], 8)
            elif iei == _IEI_CONCAT_16BIT and size == 4:
                concatenation = Concatenation(data[0] << 8 | data[1], data[2], data[3], 16)
        except ValueError:
            return None, payload
        position += 2 + size
    return concatenation, payload


# GSM 03.38: the basic characters that the SMSC-default alphabet puts in the range where ASCII
# has control codes, and the extension table reached through 0x1B.
_GSM_LOW = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ"
_GSM_EXTENSION = {0x0A: "\f", 0x14: "^", 0x28: "{", 0x29: "}", 0x2F: "\\", 0x3C: "[", 0x3D: "~", 0x3E: "]"}
_GSM_EXTENSION |= {0x40: "|", 0x65: "€"}


def _decode_default_alphabet(payload: bytes) -> str:
    """data_coding 0, unpacked one byte per character, as SMSCs hand it to an ESME.

    Printable ASCII is read as ASCII, which the GSM basic table agrees with for digits and
    letters (the few symbols where they differ, such as ``@`` at 0x40, are read the ASCII way,
    as most SMSCs deliver them); bytes below 0x20 are GSM characters (0x00 is ``@``), 0x1B
    starts a GSM extension character (``€``). A septet never reaches 0x80, so a payload with
    such bytes is in some 8-bit charset: UTF-8 or GBK when it decodes strictly as one (an SMSC
    in China labelling Chinese text 0), else Latin-1.
    """
    if not payload.isascii():
        for codec in ("utf-8", "gb18030"):
            try:
                return payload.decode(codec)
            except UnicodeDecodeError:
                continue
    chars: list[str] = []
    index = 0
    while index < len(payload):
        byte = payload[index]
        if byte == 0x1B and index + 1 < len(payload):
            following = payload[index + 1]
            chars.append(_GSM_EXTENSION.get(following, " "))
            index += 2
            continue
        if byte < 0x20:
            chars.append(" " if byte == 0x1B else _GSM_LOW[byte])
        elif byte == 0x7F:
            chars.append("à")
        else:
            chars.append(chr(byte))
        index += 1
    return "".join(chars)


def _decode_ucs2(payload: bytes) -> str:
    if payload.startswith(b"\xff\xfe"):  # a little-endian byte order mark from an odd phone
        return payload[2:].decode("utf-16-le", errors="replace")
    if payload.startswith(b"\xfe\xff"):
        payload = payload[2:]
    return payload.decode("utf-16-be", errors="replace")


def _decode_octets(payload: bytes) -> str:
    """8-bit data (data_coding 15, binary): UTF-8 when valid UTF-8 with non-ASCII, else GBK.

    Valid UTF-8 is strong evidence even under the GBK label: Chinese text in GBK almost never
    forms valid UTF-8, while UTF-8 read as GBK gives plausible-looking nonsense (婊℃剰 for 满意).
    GB18030 is read, a superset of GBK; undecodable bytes become U+FFFD.
    """
    if not payload.isascii():
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return payload.decode("gb18030", errors="replace")


def decode_payload(payload: bytes, data_coding: int) -> str:
    """The text of a short message's payload (UDH already removed), never raising.

    0 and 1: SMSC default alphabet / IA5 (see :func:`_decode_default_alphabet`); 3: Latin-1;
    8: UCS-2, read as UTF-16-BE so that emoji survive; 15 and binary (2, 4): GBK or UTF-8;
    6, 7, 14: ISO 8859-5, ISO 8859-8, KS C 5601. GSM data coding schemes (0x10-0x3F,
    0xF0-0xFF) are read by their alphabet bits. Bytes that make no sense in the coding become
    U+FFFD, which the reply parser treats as unreadable (SPEC R3.5).
    """
    if 0x10 <= data_coding <= 0x3F:  # GSM DCS general group: bits 3-2 give the alphabet
        data_coding = {0: DATA_CODING_DEFAULT, 1: 4, 2: DATA_CODING_UCS2, 3: 4}[(data_coding >> 2) & 0x03]
    elif data_coding >= 0xF0:  # GSM DCS message class group: bit 2 gives 7-bit or 8-bit
        data_coding = 4 if data_coding & 0x04 else DATA_CODING_DEFAULT
    if data_coding in (0, 1):
        return _decode_default_alphabet(payload)
    if data_coding == DATA_CODING_LATIN1:
        return payload.decode("latin-1")
    if data_coding == DATA_CODING_UCS2:
        return _decode_ucs2(payload)
    if data_coding in (6, 7, 14):
        codec = {6: "iso8859_5", 7: "iso8859_8", 14: "euc_kr"}[data_coding]
        return payload.decode(codec, errors="replace")
    return _decode_octets(payload)


@dataclass(frozen=True)
class IncomingPart:
    """One ``deliver_sm`` carrying (part of) a citizen's message, as the SMPP adapter read it.

    ``sender`` is the source address in whatever form the adapter normalises phones to; parts
    are matched by it, so it must be the same form for every part.
    """

    sender: str
    payload: bytes
    data_coding: int
    concatenation: Concatenation | None = None

    @classmethod
    def from_pdu(
        cls,
        sender: str,
        short_message: bytes,
        *,
        esm_class: int,
        data_coding: int,
        sar_msg_ref_num: int | None = None,
        sar_total_segments: int | None = None,
        sar_segment_seqnum: int | None = None,
    ) -> IncomingPart:
        """Read the concatenation from the UDH (esm_class UDHI) or else from the sar_* TLVs.

        Pass ``message_payload`` as ``short_message`` when the SMSC used that TLV instead.
        """
        concatenation: Concatenation | None = None
        payload = short_message
        if esm_class & ESM_CLASS_UDHI:
            concatenation, payload = split_udh(short_message)
        elif sar_msg_ref_num is not None and sar_total_segments and sar_segment_seqnum:
            try:
                concatenation = Concatenation(sar_msg_ref_num & 0xFFFF, sar_total_segments, sar_segment_seqnum, 16)
            except ValueError:
                concatenation = None
        if concatenation is not None and concatenation.total == 1:
            concatenation = None
        return cls(sender, payload, data_coding, concatenation)


@dataclass(frozen=True)
class IncomingMessage:
    """A whole message from a citizen, ready for :func:`gateway.sms.replies.parse_reply`."""

    sender: str
    text: str
    parts: int = 1


@dataclass(frozen=True)
class Waiting:
    """A part was kept; the message is not complete yet."""

    sender: str
    received: int
    total: int


@dataclass(frozen=True)
class Duplicate:
    """An exact repeat of a part already taken (SPEC R3.7a): acknowledge it, count it once."""

    sender: str
    concatenation: Concatenation


@dataclass(frozen=True)
class IncompleteMessage:
    """A set of parts given up on: timed out, or its reference reused for another message.

    ``text`` joins the parts that did arrive, in order, so the caller can still store it.
    """

    sender: str
    reference: int
    total: int
    received: tuple[int, ...]
    text: str


_SetKey = tuple[str, int, int, int]  # sender, reference bits, reference, total


@dataclass
class _PartSet:
    started: datetime
    parts: dict[int, IncomingPart] = field(default_factory=dict)


class Reassembler:
    """Puts concatenated incoming parts back together (SPEC R3.5: reassembled before parsing).

    Parts are matched on (sender, reference, total). The payload bytes of all parts are joined
    before decoding, so a surrogate pair cut across parts by the sending phone or SMSC (as
    smpplib does) still decodes. A part identical to one already held, or to one of a message
    completed within ``timeout``, is a :class:`Duplicate` (an SMSC re-delivering after a lost
    acknowledgement). A different part in an occupied slot means the sender reused the
    reference: the old, incomplete set is given up. Sets not complete within ``timeout`` of
    their first part, or beyond ``max_pending`` sets, are given up too; :meth:`expire` hands
    them out. Single-part repeats carry no reference: the store recognises those by the SMSC
    message id.

    Held parts live in memory: the adapter stores every part before acknowledging it
    (SPEC R3.7a) and, after a restart, feeds the stored incomplete parts back through :meth:`add`.
    """

    def __init__(self, timeout: timedelta = timedelta(minutes=30), max_pending: int = 10_000) -> None:
        if timeout <= timedelta(0) or max_pending < 1:
            raise ValueError("The reassembly timeout must be positive and max_pending at least 1.")
        self.timeout = timeout
        self.max_pending = max_pending
        self._pending: dict[_SetKey, _PartSet] = {}
        self._completed: dict[_SetKey, tuple[datetime, dict[int, bytes]]] = {}
        self._given_up: list[IncompleteMessage] = []

    @property
    def pending(self) -> int:
        """How many incomplete messages are held."""
        return len(self._pending)

    def add(self, part: IncomingPart, now: datetime) -> IncomingMessage | Waiting | Duplicate:
        """Take one part; return the whole message when this part completes it."""
        self._give_up_stale(now)
        concatenation = part.concatenation
        if concatenation is None:
            return IncomingMessage(part.sender, decode_payload(part.payload, part.data_coding))
        key = (part.sender, concatenation.reference_bits, concatenation.reference, concatenation.total)
        completed = self._completed.get(key)
        if completed is not None and completed[1].get(concatenation.sequence) == part.payload:
            return Duplicate(part.sender, concatenation)
        held = self._pending.get(key)
        if held is not None and concatenation.sequence in held.parts:
            if held.parts[concatenation.sequence].payload == part.payload:
                return Duplicate(part.sender, concatenation)
            self._give_up(key)
            held = None
        if held is None:
            if len(self._pending) >= self.max_pending:
                self._give_up(min(self._pending, key=lambda k: self._pending[k].started))
            held = self._pending[key] = _PartSet(now)
        held.parts[concatenation.sequence] = part
        if len(held.parts) < concatenation.total:
            return Waiting(part.sender, len(held.parts), concatenation.total)
        del self._pending[key]
        self._completed[key] = (now, {number: p.payload for number, p in held.parts.items()})
        return IncomingMessage(part.sender, _join(held.parts), concatenation.total)

    def expire(self, now: datetime) -> list[IncompleteMessage]:
        """Give up sets older than the timeout; return them and any given up since the last call."""
        self._give_up_stale(now)
        given_up, self._given_up = self._given_up, []
        return given_up

    def _give_up_stale(self, now: datetime) -> None:
        for key in [k for k, held in self._pending.items() if now - held.started >= self.timeout]:
            self._give_up(key)
        for key in [k for k, (done, _) in self._completed.items() if now - done >= self.timeout]:
            del self._completed[key]

    def _give_up(self, key: _SetKey) -> None:
        held = self._pending.pop(key)
        sender, _, reference, total = key
        self._given_up.append(IncompleteMessage(sender, reference, total, tuple(sorted(held.parts)), _join(held.parts)))


def _join(parts: dict[int, IncomingPart]) -> str:
    """Decode the parts in order, joining the bytes of neighbouring parts that share a data coding."""
    texts: list[str] = []
    run: list[bytes] = []
    coding = previous = -1
    for number in sorted(parts):
        part = parts[number]
        if run and (part.data_coding != coding or number != previous + 1):
            texts.append(decode_payload(b"".join(run), coding))
            run = []
        run.append(part.payload)
        coding, previous = part.data_coding, number
    if run:
        texts.append(decode_payload(b"".join(run), coding))
    return "".join(texts)
