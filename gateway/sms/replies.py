"""Reading a citizen's reply to an invitation: a rating, an opt-out, or unclear (SPEC R3.5, R3.8).

:func:`parse_reply` takes the whole text of one reply (SMS parts already reassembled, or the
first line of a reply mail, SPEC R3.9) and returns :class:`Rating`, :class:`OptOut` or
:class:`Unclear`. The answer to send back is chosen by :func:`answer_text`.

How a reply is read, in order:

1. Normalise (NFKC): full-width ``１`` and ``ＴＤ`` become ``1`` and ``TD``, ``，`` becomes ``,``.
2. Empty → unclear. ``TD``, ``T`` (only as the whole reply) or ``退订`` → opt-out (SPEC R3.8); an
   opt-out wins over a rating in the same reply, since stopping messages matters more. A
   negated ``退订`` (不要退订, 别退订) is not one.
3. Unreadable (U+FFFD, control characters, GBK or UTF-8 bytes decoded with the wrong codec)
   → unclear: a guess from mojibake could record a wrong rating.
4. Tokens: runs of ASCII digits, level words, separators, the rest. A digit run is a menu key
   when it is one digit or one digit repeated (``1``, ``11``); it is a number, not a key, when
   it is longer (``13800138000``, ``2024``), holds ``.`` or ``:`` (``3.5``, ``8:30``), touches a
   Latin letter (``B1``), follows 第 or a score's lead (满分 5, 评分:5, 给个5), is a score out of
   5 or 10 (``4/5``), or precedes a unit (``3号``, ``2个``, ``5星``, ``5★``); a score's unit may
   follow after a space (``5 分``, ``5 stars``), other units must touch it (``1 人员态度好`` is
   key 1 and a comment). A score out of 5 would otherwise read as 非常不满意. Two or three
   different menu digits
   (``12``) are several keys.
5. Level words are matched longest first, so 不满意 and 非常不满意 are found whole and never as
   满意 (the substring trap of SPEC R3.5). A word preceded in its clause by a negation
   (不是非常满意, 没有不满意) is not trusted. One-character synonyms (差) count only as the
   whole reply.
6. Decide: several different keys → unclear. One key: its level (SPEC R1.2 key map), unless a
   level word of the other polarity (good vs bad, SPEC R1.1) contradicts it (``5 非常满意``: the
   citizen took 5 for the best) → unclear. No key: a negated level word, or several different
   level words → unclear; one level word → that level.
7. The comment is what follows the rating at the head of the reply (``4，窗口态度不好``), or
   what precedes it at the tail, or else the whole reply; cut from the raw text, at most 500
   characters.
"""

from __future__ import annotations

import enum
import re
import string
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from gateway.rating import LEVEL_NAMES, KeyMap, Level
from gateway.sms.text import reply_menu, signed

#: Longest comment kept with a rating; the raw text is kept whole.
COMMENT_MAX = 500

#: Synonyms matched anywhere in a reply, like the five level names (SPEC R3.5 "as configured").
#: Negative forms are listed so that the longest match wins over 满意 inside them.
DEFAULT_SYNONYMS: Mapping[str, Level] = MappingProxyType(
    {
        **dict.fromkeys(["很满意", "特别满意", "十分满意", "非常非常满意"], Level.VERY_SATISFIED),
        **dict.fromkeys(["比较满意", "挺满意", "好评"], Level.SATISFIED),
        **dict.fromkeys(["一般", "还行", "基本上满意", "还算满意", "算是满意"], Level.BASICALLY_SATISFIED),
        **dict.fromkeys(
            ["不太满意", "不大满意", "不怎么满意", "不是很满意", "不够满意", "差劲", "差评"], Level.DISSATISFIED
        ),
        **dict.fromkeys(
            ["很不满意", "特别不满意", "十分不满意", "太不满意", "很差", "太差", "非常差", "极差", "很差劲"],
            Level.VERY_DISSATISFIED,
        ),
    }
)

#: Synonyms that count only as the whole reply: inside a sentence they mean something else
#: (差不多 "almost", 出差 "business trip", 还可以更快 "could be faster").
DEFAULT_WHOLE_REPLY_SYNONYMS: Mapping[str, Level] = MappingProxyType(
    {
        "差": Level.DISSATISFIED,
        "不好": Level.DISSATISFIED,
        "还可以": Level.BASICALLY_SATISFIED,
        "凑合": Level.BASICALLY_SATISFIED,
        "差不多": Level.BASICALLY_SATISFIED,
    }
)

#: Phrases that contain level words but name none: a level word found wholly inside one is not
#: a level (好差评 holds 差评, 满意度 holds 满意). A question such as 满不满意 is not listed:
#: it holds 不满意, and a reply that holds 不满意 must never read as a good level.
NEUTRAL_PHRASES = ("好差评", "满意度")
#: Words a citizen may put before the key (回复1, 我选1, 评价：1); not part of the comment.
LEAD_WORDS = ("回复", "我选择", "我选", "选择", "选", "评价")


class UnclearReason(enum.StrEnum):
    """Why a reply gave no rating (for logs and figures; every one gets the same clarification)."""

    EMPTY = "empty"
    UNREADABLE = "unreadable"  # U+FFFD, control characters, mojibake
    NO_LEVEL = "no_level"  # text, emoji, a phone number, a quantity: nothing names a level
    SEVERAL_LEVELS = "several_levels"  # 1 2, 12, 1或2, 满意……不满意
    KEY_NOT_ON_MENU = "key_not_on_menu"  # 0, 6-9
    CONFLICT = "conflict"  # a key and a level word of the other polarity: 5 非常满意
    NEGATED = "negated"  # 不是非常满意


@dataclass(frozen=True)
class Rating:
    """A reply that rates: the level, the raw text, and the citizen's comment (SPEC R1.2, R3.5).

    ``key`` is the menu digit when the level came from one, ``word`` the level word or synonym
    when it came from words; the raw text is kept whole for audit.
    """

    level: Level
    raw: str
    comment: str = ""
    key: str | None = None
    word: str | None = None


@dataclass(frozen=True)
class OptOut:
    """退订: stop all future invitations to this number (SPEC R3.8)."""

    raw: str


@dataclass(frozen=True)
class Unclear:
    """Nothing to record; the citizen gets one clarification (SPEC R3.5)."""

    raw: str
    why: UnclearReason


ParsedReply = Rating | OptOut | Unclear


_ASCII_PUNCTUATION = frozenset(string.punctuation)


def _is_separator(char: str) -> bool:
    """Spaces and punctuation, ASCII or CJK (。，！？、：【】「」…); emoji are not separators."""
    return char.isspace() or char in _ASCII_PUNCTUATION or unicodedata.category(char).startswith("P")


def _normalise_word(word: str) -> str:
    return unicodedata.normalize("NFKC", word).strip()


@dataclass(frozen=True)
class ReplyRules:
    """The configurable part of reading replies: key map, synonyms, comment length (SPEC R1.2, R3.5)."""

    key_map: KeyMap = field(default_factory=KeyMap.hotline_default)
    synonyms: Mapping[str, Level] = field(default_factory=lambda: DEFAULT_SYNONYMS)
    whole_reply_synonyms: Mapping[str, Level] = field(default_factory=lambda: DEFAULT_WHOLE_REPLY_SYNONYMS)
    comment_max: int = COMMENT_MAX
    _words: Mapping[str, Level] = field(init=False, repr=False, compare=False)
    _whole: Mapping[str, Level] = field(init=False, repr=False, compare=False)
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        words = {name: level for level, name in LEVEL_NAMES.items()}
        for table in (self.synonyms, self.whole_reply_synonyms):
            for word, level in table.items():
                normal = _normalise_word(word)
                if not normal or any(char.isdigit() or _is_separator(char) for char in normal):
                    raise ValueError(f"Reply synonym {word!r} must be a word without digits, spaces or punctuation.")
                if not isinstance(level, Level):
                    raise ValueError(f"Reply synonym {word!r} must map to a Level, not {level!r}.")
        for word, level in self.synonyms.items():
            words[_normalise_word(word)] = level
        if self.comment_max < 0:
            raise ValueError(f"comment_max must be 0 or more, not {self.comment_max}.")
        # Longest first: at any position 非常不满意 is tried before 不满意, and 不满意 before 满意.
        ordered = sorted(words, key=lambda word: (-len(word), word))
        object.__setattr__(self, "_words", MappingProxyType(words))
        object.__setattr__(
            self,
            "_whole",
            MappingProxyType({_normalise_word(w).casefold(): lv for w, lv in self.whole_reply_synonyms.items()}),
        )
        object.__setattr__(self, "_pattern", re.compile("|".join(map(re.escape, ordered))))


DEFAULT_RULES = ReplyRules()


def parse_reply(raw: str, rules: ReplyRules = DEFAULT_RULES) -> ParsedReply:
    """Read one reply (SPEC R3.5, R3.8); never raises, whatever the text.

    >>> parse_reply("4 窗口态度不好")
    Rating(level=<Level.DISSATISFIED: 2>, raw='4 窗口态度不好', comment='窗口态度不好', key='4', word=None)
    >>> parse_reply("非常不满意").level.name
    'VERY_DISSATISFIED'
    >>> parse_reply("ＴＤ")
    OptOut(raw='ＴＤ')
    >>> parse_reply("1或2").why
    <UnclearReason.SEVERAL_LEVELS: 'several_levels'>
    """
    text, origin = _normalise(raw)
    if not text.strip():
        return Unclear(raw, UnclearReason.EMPTY)
    if _is_opt_out(text):
        return OptOut(raw)
    if _is_unreadable(raw, text, rules):
        return Unclear(raw, UnclearReason.UNREADABLE)
    compact = "".join(char for char in text if not _is_separator(char)).casefold()
    whole = rules._whole.get(compact)
    if whole is not None:
        return Rating(whole, raw, "", word=compact)
    tokens = _tokenise(text, rules)
    return _decide(raw, text, origin, tokens, rules)


# ---------------------------------------------------------------------------------------------
# Normalising and screening
# ---------------------------------------------------------------------------------------------


def _normalise(raw: str) -> tuple[str, list[int]]:
    """NFKC, character by character, with the raw index of every normalised character.

    Per-character NFKC equals whole-text NFKC for everything the parser matches (digits, CJK,
    Latin letters, punctuation) and lets the comment be cut from the citizen's own text.
    """
    pieces: list[str] = []
    origin: list[int] = []
    for index, char in enumerate(raw):
        piece = unicodedata.normalize("NFKC", char)
        pieces.append(piece)
        origin.extend([index] * len(piece))
    origin.append(len(raw))
    return "".join(pieces), origin


_OPT_OUT_WHOLE = re.compile(r"(?:td|退订)+|t")
_OPT_OUT_TD = re.compile(r"(?<![a-z])td(?![a-z])")
_OPT_OUT_NEGATIONS = (
    "不",
    "别",
    "別",
    "勿",
    "没",
    "沒",
    "无需",
    "無需",
    "不用",
    "不要",
    "不想",
    "不必",
    "没有",
    "沒有",
)


def _is_opt_out(text: str) -> bool:
    """SPEC R3.8: TD or 退订 anywhere (TD as a word of its own), T only as the whole reply.

    退订 right after a negation (不要退订, 不退订, 别退订) says the opposite: not an opt-out,
    which is permanent (R1.5) and would also drop a rating given in the same reply.
    """
    folded = text.casefold()
    compact = "".join(char for char in folded if not _is_separator(char))
    if _OPT_OUT_WHOLE.fullmatch(compact) or _OPT_OUT_TD.search(folded):
        return True
    if "退订" not in compact:
        return False
    # On the text as written, so that a separator ends the negation: 不，退订 ("no; stop") is one.
    written = list(re.finditer("退订", folded))
    if not written:  # 退 订, written apart
        return True
    return any(not folded[: match.start()].endswith(_OPT_OUT_NEGATIONS) for match in written)


def _is_cjk(char: str) -> bool:
    return "\u4e00" <= char <= "\u9fff" or "\u3400" <= char <= "\u4dbf"


def _is_unreadable(raw: str, text: str, rules: ReplyRules) -> bool:
    """Replacement characters, control characters, or text decoded with the wrong codec."""
    for char in raw:
        if char == "\ufffd" or (unicodedata.category(char) in ("Cc", "Cs") and char not in "\t\n\r"):
            return True
    return _latin1_mojibake(raw) or (rules._pattern.search(text) is None and _utf8_read_as_gbk(raw))


def _latin1_mojibake(raw: str) -> bool:
    """GBK or UTF-8 bytes read as Latin-1/cp1252 (``Âú×ã``, ``æ»¡æ„``): no Chinese reply looks so."""
    if raw.isascii():
        return False
    for codec in ("latin-1", "cp1252"):
        try:
            data = raw.encode(codec)
        except UnicodeEncodeError:
            continue
        for original in ("gb18030", "utf-8"):
            try:
                if any(_is_cjk(char) for char in data.decode(original)):
                    return True
            except UnicodeDecodeError:
                continue
    return False


def _utf8_read_as_gbk(raw: str) -> bool:
    """UTF-8 bytes read as GBK (``婊℃剰`` for 满意). Checked only when no level word was found."""
    data = raw.encode("gb18030")
    if sum(byte >= 0x80 for byte in data) < 6:
        return False
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return sum(_is_cjk(char) for char in decoded) >= 2


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------


class _Kind(enum.Enum):
    SEPARATOR = "separator"
    KEY = "key"  # one digit, or one digit repeated
    KEYS = "keys"  # two or three different menu digits: 12, 45
    NUMBER = "number"  # a phone number, a year, a quantity, a code: not a key
    WORD = "word"
    LEAD = "lead"  # 回复, 我选 …
    OTHER = "other"


@dataclass(frozen=True)
class _Token:
    kind: _Kind
    start: int
    end: int
    digits: str = ""  # KEY: the one digit; KEYS: the different digits
    level: Level | None = None  # WORD
    negated: bool = False  # WORD


_DIGITS = re.compile(r"[0-9]+(?:[.:][0-9]+)*")
_LATIN = re.compile(r"[A-Za-z]+")
_UNITS = frozenset(
    "年月日号號时時点點分秒个個位次楼樓层層元块塊岁歲天周星颗顆"  # touching the digit: 3号, 5星
    "人名件遍趟条條张張份本项項%‰℃万萬千百十★☆⭐"
)
#: Touching a digit before it, what makes it a score rather than a menu key: 给个5, 打个5.
_SCORE_LEADS = frozenset("个個")
#: Units of a score, which may follow the digit after a space ("5 分"); other units must touch
#: it ("1 人员态度好" is key 1 and a comment).
_SCORE_UNITS = frozenset("分星颗顆★☆⭐")
_LATIN_UNITS = ("star", "point", "pts", "pt ")
_OUT_OF = re.compile(r"/(?:5|10)(?![0-9])")
_UNIT_WORDS = ("小时", "小時")
_NEGATIONS = frozenset("不没沒未无無别別")
_NEGATION_REACH = 4  # characters before a level word, within its clause


def _tokenise(text: str, rules: ReplyRules) -> list[_Token]:
    neutral = [
        (match.start(), match.end()) for phrase in NEUTRAL_PHRASES for match in re.finditer(re.escape(phrase), text)
    ]
    tokens: list[_Token] = []
    position = 0
    while position < len(text):
        char = text[position]
        if _is_separator(char):
            end = position + 1
            while end < len(text) and _is_separator(text[end]):
                end += 1
            tokens.append(_Token(_Kind.SEPARATOR, position, end))
        elif "0" <= char <= "9":
            match = _DIGITS.match(text, position)
            assert match is not None
            end = match.end()
            tokens.append(_digit_token(text, position, end, rules.key_map))
        elif (word := rules._pattern.match(text, position)) and not any(
            start <= position and word.end() <= end for start, end in neutral
        ):
            end = word.end()
            negated = _is_negated(text, position)
            tokens.append(_Token(_Kind.WORD, position, end, level=rules._words[word.group()], negated=negated))
        elif latin := _LATIN.match(text, position):
            end = latin.end()
            tokens.append(_Token(_Kind.OTHER, position, end))
        elif lead := next((w for w in LEAD_WORDS if text.startswith(w, position)), None):
            end = position + len(lead)
            tokens.append(_Token(_Kind.LEAD, position, end))
        else:
            end = position + 1
            tokens.append(_Token(_Kind.OTHER, position, end))
        position = end
    return tokens


def _digit_token(text: str, start: int, end: int, key_map: KeyMap) -> _Token:
    run = text[start:end]
    before = text[start - 1] if start else ""
    after = text[end : end + 2]
    spaced = text[end:].lstrip(" \t")  # only a score's unit may stand after a space: "5 分", "5 stars"
    lead = text[:start].rstrip(" \t:")[-1:]  # 满分 5, 评分:5
    is_number = (
        not run.isdigit()  # 3.5, 8:30
        or (before.isascii() and before.isalpha())
        or (after[:1].isascii() and after[:1].isalpha())  # B1, 1A: a code
        or before == "第"  # 第3个窗口
        or before in _SCORE_LEADS  # 给个5, 打个5
        or lead == "分"  # 满分5, 评分:5: a score out of 5 would read as 非常不满意
        or after[:1] in _UNITS
        or after.startswith(_UNIT_WORDS)  # 3号, 2个小时, 5分, 5星, 5★
        or spaced[:1] in _SCORE_UNITS
        or spaced[:5].lower().startswith(_LATIN_UNITS)  # 5 stars, 5 points
        or _OUT_OF.match(text, end) is not None  # 4/5, 8/10: a score out of 5 or 10
        or (before == "/" and text[start - 2 : start - 1].isdigit() and run in ("5", "10"))
    )
    different = sorted(set(run))
    if is_number or (len(different) > 1 and len(run) > 3):
        return _Token(_Kind.NUMBER, start, end)
    if len(different) == 1:
        return _Token(_Kind.KEY, start, end, digits=different[0])
    if all(key_map.level_for(digit) is not None for digit in different):
        return _Token(_Kind.KEYS, start, end, digits="".join(different))
    return _Token(_Kind.NUMBER, start, end)  # 10, 86, 100: not a choice between menu keys


def _is_negated(text: str, start: int) -> bool:
    """A negation before a level word in the same clause: 不是非常满意, 没有不满意, 不 满意."""
    position = start - 1
    while position >= max(0, start - _NEGATION_REACH):
        if _is_separator(text[position]) and not text[position].isspace():
            return False  # a new clause: 不，非常满意
        if text[position] in _NEGATIONS:
            return True
        if text[position] == "非" and text[position + 1 : position + 2] != "常":
            return True  # 并非满意, but not the 非 of 非常
        position -= 1
    return False


# ---------------------------------------------------------------------------------------------
# Deciding
# ---------------------------------------------------------------------------------------------


def _decide(raw: str, text: str, origin: list[int], tokens: list[_Token], rules: ReplyRules) -> ParsedReply:
    digits = {digit for token in tokens if token.kind in (_Kind.KEY, _Kind.KEYS) for digit in token.digits}
    words = [token for token in tokens if token.kind is _Kind.WORD and not token.negated]
    negated = any(token.kind is _Kind.WORD and token.negated for token in tokens)
    if len(digits) > 1:
        return Unclear(raw, UnclearReason.SEVERAL_LEVELS)
    if digits:
        (key,) = digits
        level = rules.key_map.level_for(key)
        if level is None:
            return Unclear(raw, UnclearReason.KEY_NOT_ON_MENU)
        if any(word.level is not None and word.level.is_bad != level.is_bad for word in words):
            return Unclear(raw, UnclearReason.CONFLICT)
        comment = _comment(raw, origin, tokens, level, key, rules.comment_max)
        return Rating(level, raw, comment, key=key)
    if negated:  # 没有不满意，很满意: the words cannot be taken one by one
        return Unclear(raw, UnclearReason.NEGATED)
    levels = {word.level for word in words}
    if len(levels) > 1:
        return Unclear(raw, UnclearReason.SEVERAL_LEVELS)
    if levels:
        (level,) = levels
        comment = _comment(raw, origin, tokens, level, None, rules.comment_max)
        return Rating(level, raw, comment, word=text[words[0].start : words[0].end])
    return Unclear(raw, UnclearReason.NO_LEVEL)


def _comment(raw: str, origin: list[int], tokens: list[_Token], level: Level, key: str | None, limit: int) -> str:
    """What the citizen said besides the rating: after a rating head, before a rating tail, or all."""

    def is_rating(token: _Token) -> bool:
        if token.kind is _Kind.KEY:
            return token.digits == key
        return token.kind is _Kind.WORD and token.level is level and not token.negated

    end_of_text = len(origin) - 1
    head = 0
    while head < len(tokens) and (tokens[head].kind in (_Kind.SEPARATOR, _Kind.LEAD) or is_rating(tokens[head])):
        head += 1
    if any(is_rating(token) for token in tokens[:head]):  # 4，窗口态度不好
        start = tokens[head].start if head < len(tokens) else end_of_text
        return raw[origin[start] :].strip()[:limit]
    tail = len(tokens)
    while tail > 0 and (tokens[tail - 1].kind is _Kind.SEPARATOR or is_rating(tokens[tail - 1])):
        tail -= 1
    rated_tail = any(is_rating(token) for token in tokens[tail:])
    if rated_tail and tokens[tail].kind in (_Kind.SEPARATOR, _Kind.KEY):  # 谢谢，非常满意 / 谢谢 1
        return raw[: origin[tokens[tail].start]].strip()[:limit]
    return raw.strip()[:limit]  # 我对服务非常满意: the rating is part of the sentence


# ---------------------------------------------------------------------------------------------
# Answers (SPEC R3.5, R3.6, R3.8)
# ---------------------------------------------------------------------------------------------


class ReplyWindow(enum.StrEnum):
    """Where a reply stands, as correlation (SPEC R3.6) found it."""

    OPEN = "open"  # matched an invitation whose window is open and which has no rating yet
    ALREADY_RATED = "already_rated"  # matched an invitation that already has a rating (R1.4)
    CLOSED = "closed"  # matched an invitation whose window has closed
    NOT_INVITED = "not_invited"  # no invitation was ever sent to this number


def thanks_text(level: Level, signature: str) -> str:
    """Thanks after a rating; a bad rating is told that someone will be in touch (SPEC R4.1)."""
    name = LEVEL_NAMES[level]
    if level.is_bad:
        return signed(signature, f"您的评价（{name}）已收到，我们将尽快核实并与您联系。感谢您的监督！")
    return signed(signature, f"您的评价（{name}）已收到，感谢您的支持，我们将继续努力！")


def clarification_text(signature: str, key_map: KeyMap | None = None) -> str:
    """The one clarification for an unclear reply (SPEC R3.5)."""
    return signed(
        signature,
        f"抱歉，未能识别您的回复。请只{reply_menu(key_map)}，数字后可附意见。回复TD退订",
    )


def opt_out_confirmation_text(signature: str) -> str:
    """The one confirmation of an opt-out (SPEC R3.8)."""
    return signed(signature, "您已成功退订，今后不再向您发送服务评价短信。")


def window_closed_text(signature: str) -> str:
    """A rating that cannot be recorded: the window closed, or nothing awaits a rating (SPEC R3.6)."""
    return signed(signature, "您好，目前没有待您评价的服务或评价期已结束，本条回复未作为评价记录。感谢您的关注！")


def already_rated_text(signature: str) -> str:
    """A second rating for the same service: kept for audit only (SPEC R1.4)."""
    return signed(signature, "您已对本次服务作出评价，无需重复评价。感谢您的支持！")


def answer_text(
    reply: ParsedReply,
    window: ReplyWindow,
    *,
    signature: str,
    key_map: KeyMap | None = None,
    clarified_before: bool = False,
    opted_out_before: bool = False,
) -> str | None:
    """The SMS to send back to a reply, or None for silence.

    - An opt-out is confirmed once, whoever sends it (SPEC R3.8).
    - A rating is thanked when it is recorded; otherwise it is told why not (SPEC R3.6, R1.4).
    - An unclear reply to an open invitation gets one clarification (SPEC R3.5); an unclear
      reply in any other case gets nothing, so that chatter, spam and other machines'
      auto-replies are not answered (an answer to an auto-reply could start a loop; the
      per-number caps of :mod:`gateway.sms.schedule` bound that too).
    """
    if isinstance(reply, OptOut):
        return None if opted_out_before else opt_out_confirmation_text(signature)
    if isinstance(reply, Rating):
        if window is ReplyWindow.OPEN:
            return thanks_text(reply.level, signature)
        if window is ReplyWindow.ALREADY_RATED:
            return already_rated_text(signature)
        return window_closed_text(signature)
    if window is ReplyWindow.OPEN and not clarified_before:
        return clarification_text(signature, key_map)
    return None
