"""Reading citizens' SMS replies (gateway.sms.replies, SPEC R3.5, R3.8), tested by a table.

Each row is a reply as a phone delivers it and what the gateway must make of it: a rating
(level and comment), an opt-out, or unclear (and why). The default menu is the 12345 one:
1 非常满意, 2 满意, 3 基本满意, 4 不满意, 5 非常不满意 (SPEC R1.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.rating import KeyMap, Level
from gateway.sms.replies import (
    COMMENT_MAX,
    DEFAULT_RULES,
    OptOut,
    Rating,
    ReplyRules,
    ReplyWindow,
    Unclear,
    UnclearReason,
    answer_text,
    clarification_text,
    parse_reply,
)

LEVEL_BY_NAME = {level.chinese_name: level for level in Level}
SIGNATURE = "【12345热线】"


@dataclass(frozen=True)
class Expected:
    kind: type
    level: Level | None = None
    comment: str = ""
    why: UnclearReason | None = None


def rated(name: str, comment: str = "") -> Expected:
    return Expected(Rating, LEVEL_BY_NAME[name], comment)


def opt_out() -> Expected:
    return Expected(OptOut)


def unclear(why: UnclearReason) -> Expected:
    return Expected(Unclear, why=why)


EMPTY = UnclearReason.EMPTY
UNREADABLE = UnclearReason.UNREADABLE
NO_LEVEL = UnclearReason.NO_LEVEL
SEVERAL = UnclearReason.SEVERAL_LEVELS
NOT_ON_MENU = UnclearReason.KEY_NOT_ON_MENU
CONFLICT = UnclearReason.CONFLICT
NEGATED = UnclearReason.NEGATED

LONG_COMMENT = "窗口工作人员态度冷淡，" * 80  # 800 characters

REPLIES: list[tuple[str, Expected]] = [
    # --- a digit, as the menu asks -------------------------------------------------------------
    ("1", rated("非常满意")),
    ("2", rated("满意")),
    ("3", rated("基本满意")),
    ("4", rated("不满意")),
    ("5", rated("非常不满意")),
    ("１", rated("非常满意")),  # full-width digits (SPEC R3.5)
    ("５", rated("非常不满意")),
    ("  3  ", rated("基本满意")),
    ("3。", rated("基本满意")),
    ("2！", rated("满意")),
    ("【1】", rated("非常满意")),
    ("（4）", rated("不满意")),
    ("\u30002\u3000", rated("满意")),  # ideographic spaces
    ("①", rated("非常满意")),  # a circled digit from the phone's symbol keyboard
    ("回复1", rated("非常满意")),
    ("我选2", rated("满意")),
    ("评价：3", rated("基本满意")),
    # --- the same digit repeated ------------------------------------------------------------------
    ("11", rated("非常满意")),
    ("1 1", rated("非常满意")),
    ("５５５", rated("非常不满意")),
    # --- a digit and a comment --------------------------------------------------------------------
    ("4 窗口态度不好", rated("不满意", "窗口态度不好")),
    ("4，窗口态度不好", rated("不满意", "窗口态度不好")),
    ("4窗口态度不好", rated("不满意", "窗口态度不好")),
    ("4、排队太久了！", rated("不满意", "排队太久了！")),
    ("５ 跑了三趟都没办成", rated("非常不满意", "跑了三趟都没办成")),
    ("1 谢谢王姐的耐心讲解👍", rated("非常满意", "谢谢王姐的耐心讲解👍")),
    ("2.效率挺高", rated("满意", "效率挺高")),
    ("谢谢 1", rated("非常满意", "谢谢")),
    ("1 非常满意", rated("非常满意")),
    ("2 很满意", rated("满意", "很满意")),  # same polarity: the key decides
    ("4 非常不满意", rated("不满意", "非常不满意")),
    ("4 等了2个小时才轮到我", rated("不满意", "等了2个小时才轮到我")),  # 2个 is a quantity
    ("1 谢谢3号窗口的小李", rated("非常满意", "谢谢3号窗口的小李")),  # 3号 names a window
    ("4 B2窗口没人", rated("不满意", "B2窗口没人")),  # B2 is a code, not a key
    # --- level words and synonyms -----------------------------------------------------------------
    ("非常满意", rated("非常满意")),
    ("满意", rated("满意")),
    ("基本满意", rated("基本满意")),
    ("不满意", rated("不满意")),  # never 满意 (the substring trap)
    ("非常不满意", rated("非常不满意")),  # never 非常满意, 满意 or 不满意
    ("非常满意，谢谢", rated("非常满意", "谢谢")),
    ("不满意！办个证跑了三次", rated("不满意", "办个证跑了三次")),
    ("非常不满意。。。", rated("非常不满意")),
    ("谢谢，非常满意", rated("非常满意", "谢谢")),
    ("对这次服务很满意", rated("非常满意", "对这次服务很满意")),
    ("很满意", rated("非常满意")),
    ("一般", rated("基本满意")),
    ("还行吧", rated("基本满意", "吧")),
    ("差", rated("不满意")),
    ("很差", rated("非常不满意")),
    ("很不满意", rated("非常不满意")),
    ("不太满意", rated("不满意")),
    ("服务态度太差了", rated("非常不满意", "服务态度太差了")),
    ("满意满意", rated("满意")),
    ("5星好评", rated("满意", "5星好评")),  # 5星 is a score, not key 5 (非常不满意)
    # --- several levels, conflicts, negations -----------------------------------------------------
    ("1 2", unclear(SEVERAL)),
    ("12", unclear(SEVERAL)),
    ("1或2", unclear(SEVERAL)),
    ("1，2", unclear(SEVERAL)),
    ("2-3", unclear(SEVERAL)),
    ("态度满意，效率不满意", unclear(SEVERAL)),
    ("5 非常满意", unclear(CONFLICT)),  # the citizen took 5 for the best
    ("非常满意5", unclear(CONFLICT)),
    ("1 太慢了，很不满意", unclear(CONFLICT)),
    ("不是非常满意", unclear(NEGATED)),
    ("没有不满意，很满意", unclear(NEGATED)),
    ("不 满意", unclear(NEGATED)),  # a stray space does not turn 不满意 into 满意
    ("4 不 满意", rated("不满意", "不 满意")),
    # --- no level ---------------------------------------------------------------------------------
    ("谢谢", unclear(NO_LEVEL)),
    ("好的收到", unclear(NO_LEVEL)),
    ("👍👍👍", unclear(NO_LEVEL)),
    ("😀", unclear(NO_LEVEL)),
    ("？", unclear(NO_LEVEL)),
    ("13800138000", unclear(NO_LEVEL)),  # a phone number is not a rating
    ("2024年", unclear(NO_LEVEL)),
    ("第3个窗口", unclear(NO_LEVEL)),
    ("给5分", unclear(NO_LEVEL)),  # a score, not key 5
    ("基本上满意", rated("基本满意")),  # not 满意 found inside it
    ("还算满意吧", rated("基本满意", "吧")),
    ("5 分", unclear(NO_LEVEL)),  # a unit after a space is still a unit
    ("５ 分", unclear(NO_LEVEL)),
    ("5 星", unclear(NO_LEVEL)),
    ("5颗星", unclear(NO_LEVEL)),
    ("5⭐", unclear(NO_LEVEL)),
    ("5★", unclear(NO_LEVEL)),
    ("5/5", unclear(NO_LEVEL)),
    ("满分5", unclear(NO_LEVEL)),
    ("给个5", unclear(NO_LEVEL)),
    ("5 stars", unclear(NO_LEVEL)),
    ("1 星", unclear(NO_LEVEL)),  # one star is not key 1 (非常满意)
    ("1 人员态度好", rated("非常满意", "人员态度好")),  # a unit after a space is a comment's first word
    ("4 个人态度不好", rated("不满意", "个人态度不好")),
    ("满分 5", unclear(NO_LEVEL)),
    ("评分：5", unclear(NO_LEVEL)),
    ("4/5", unclear(NO_LEVEL)),  # a score out of 5
    ("2/3", unclear(SEVERAL)),
    ("不，退订", opt_out()),  # "no; stop": the separator ends the negation
    ("10", unclear(NO_LEVEL)),
    ("8:30到的", unclear(NO_LEVEL)),
    ("出差了", unclear(NO_LEVEL)),  # 差 counts only as the whole reply
    ("好差评是什么", unclear(NO_LEVEL)),
    ("一", unclear(NO_LEVEL)),  # Chinese numerals are not keys
    ("6", unclear(NOT_ON_MENU)),
    ("0", unclear(NOT_ON_MENU)),
    ("9 谢谢", unclear(NOT_ON_MENU)),
    # --- empty and unreadable ---------------------------------------------------------------------
    ("", unclear(EMPTY)),
    ("   \r\n", unclear(EMPTY)),
    ("\ufffd\ufffd", unclear(UNREADABLE)),  # bytes the SMPP adapter could not decode
    ("1\ufffd", unclear(UNREADABLE)),
    ("满意".encode("gbk").decode("latin-1"), unclear(UNREADABLE)),  # GBK read as Latin-1: ÂúÒâ
    ("4 窗口态度不好".encode("gbk").decode("latin-1"), unclear(UNREADABLE)),
    ("满意".encode().decode("latin-1"), unclear(UNREADABLE)),  # UTF-8 read as Latin-1
    ("4 窗口态度不好".encode().decode("gbk", errors="replace"), unclear(UNREADABLE)),  # UTF-8 read as GBK
    ("1\x00\x07", unclear(UNREADABLE)),
    # --- opt-out (SPEC R3.8) ----------------------------------------------------------------------
    ("TD", opt_out()),
    ("td", opt_out()),
    ("Td。", opt_out()),
    ("ＴＤ", opt_out()),
    (" T ", opt_out()),
    ("t", opt_out()),
    ("退订", opt_out()),
    ("【退订】", opt_out()),
    ("我要退订，别再发了", opt_out()),
    ("4 你们的短信退订不了", opt_out()),  # wants to stop: opting out is what was asked
    ("不要退订", unclear(NO_LEVEL)),  # a negated 退订 is not an opt-out, which is permanent (R1.5)
    ("不退订", unclear(NO_LEVEL)),
    ("2 别退订", rated("满意", "别退订")),  # the rating stands
    ("4 退订", opt_out()),  # stopping messages wins over the rating
    ("谢谢 TD", opt_out()),
    ("TEST", unclear(NO_LEVEL)),  # T counts only as the whole reply, TD only as a word
    # --- very long --------------------------------------------------------------------------------
    ("4 " + LONG_COMMENT, rated("不满意", LONG_COMMENT[:COMMENT_MAX])),
]


def case_id(raw: str) -> str:
    shown = raw if len(raw) <= 20 else raw[:20] + "…"
    return repr(shown)


@pytest.mark.parametrize(("raw", "expected"), REPLIES, ids=[case_id(raw) for raw, _ in REPLIES])
def test_reply_table(raw: str, expected: Expected) -> None:
    parsed = parse_reply(raw)
    assert type(parsed) is expected.kind, parsed
    assert parsed.raw == raw
    if isinstance(parsed, Rating):
        assert (parsed.level, parsed.comment) == (expected.level, expected.comment)
    if isinstance(parsed, Unclear):
        assert parsed.why is expected.why


def test_the_table_is_large_and_covers_every_outcome() -> None:
    assert len(REPLIES) >= 60
    assert {expected.why for _, expected in REPLIES if expected.kind is Unclear} == set(UnclearReason)
    assert {expected.level for _, expected in REPLIES if expected.kind is Rating} == set(Level)


def test_rating_keeps_the_key_or_the_word_it_came_from() -> None:
    """SPEC R1.2: every stored rating keeps the raw input beside the level."""
    assert parse_reply("４ 太慢").key == "4"  # type: ignore[union-attr]
    assert parse_reply("４ 太慢").word is None  # type: ignore[union-attr]
    by_word = parse_reply("很差，排了一上午")
    assert isinstance(by_word, Rating)
    assert (by_word.key, by_word.word) == (None, "很差")


def test_key_map_is_configuration_not_digits_passed_through() -> None:
    """SPEC R1.2: a deployment with 1 = 非常不满意 … 5 = 非常满意 reads 5 as 非常满意."""
    reversed_menu = ReplyRules(key_map=KeyMap.from_config({"1": 1, "2": 2, "3": 3, "4": 4, "5": 5}))
    assert parse_reply("5 非常满意", reversed_menu) == Rating(Level.VERY_SATISFIED, "5 非常满意", "", key="5")
    assert parse_reply("5 非常满意").why is CONFLICT  # type: ignore[union-attr]


def test_synonyms_are_configurable() -> None:
    rules = ReplyRules(synonyms={"点赞": Level.VERY_SATISFIED}, whole_reply_synonyms={})
    assert parse_reply("必须点赞", rules).level is Level.VERY_SATISFIED  # type: ignore[union-attr]
    assert isinstance(parse_reply("很满意", rules), Rating)  # 满意 inside it is still a level name
    assert parse_reply("很满意", rules).level is Level.SATISFIED  # type: ignore[union-attr]
    assert parse_reply("差", rules).why is NO_LEVEL  # type: ignore[union-attr]


@pytest.mark.parametrize("bad", ["", "很 满意", "5星", "！"])
def test_a_synonym_must_be_a_plain_word(bad: str) -> None:
    with pytest.raises(ValueError, match="synonym"):
        ReplyRules(synonyms={bad: Level.SATISFIED})


def test_comment_limit_is_configurable() -> None:
    assert parse_reply("4 太慢了", ReplyRules(comment_max=2)).comment == "太慢"  # type: ignore[union-attr]


# --- answers ------------------------------------------------------------------------------------

WINDOW_CLOSED = "【12345热线】您好，目前没有待您评价的服务或评价期已结束，本条回复未作为评价记录。感谢您的关注！"
ANSWERS: list[tuple[str, ReplyWindow, dict[str, bool], str | None]] = [
    # reply, window, earlier answers, expected text (None: no answer)
    ("1", ReplyWindow.OPEN, {}, "【12345热线】您的评价（非常满意）已收到，感谢您的支持，我们将继续努力！"),
    ("4 太慢", ReplyWindow.OPEN, {}, "【12345热线】您的评价（不满意）已收到，我们将尽快核实并与您联系。感谢您的监督！"),
    ("1", ReplyWindow.ALREADY_RATED, {}, "【12345热线】您已对本次服务作出评价，无需重复评价。感谢您的支持！"),
    ("1", ReplyWindow.CLOSED, {}, WINDOW_CLOSED),  # SPEC R3.6
    ("1", ReplyWindow.NOT_INVITED, {}, WINDOW_CLOSED),
    ("TD", ReplyWindow.OPEN, {}, "【12345热线】您已成功退订，今后不再向您发送服务评价短信。"),
    ("TD", ReplyWindow.NOT_INVITED, {}, "【12345热线】您已成功退订，今后不再向您发送服务评价短信。"),
    ("TD", ReplyWindow.OPEN, {"opted_out_before": True}, None),  # confirmed once (SPEC R3.8)
    ("谢谢", ReplyWindow.OPEN, {}, clarification_text(SIGNATURE)),
    ("谢谢", ReplyWindow.OPEN, {"clarified_before": True}, None),  # one clarification (SPEC R3.5)
    ("谢谢", ReplyWindow.CLOSED, {}, None),
    ("广告：贷款找我", ReplyWindow.NOT_INVITED, {}, None),
]


@pytest.mark.parametrize(("raw", "window", "before", "expected"), ANSWERS)
def test_answer_table(raw: str, window: ReplyWindow, before: dict[str, bool], expected: str | None) -> None:
    assert answer_text(parse_reply(raw), window, signature=SIGNATURE, **before) == expected


def test_clarification_shows_the_configured_menu() -> None:
    assert clarification_text("12345热线") == (
        "【12345热线】抱歉，未能识别您的回复。请只回复1非常满意，2满意，3基本满意，4不满意，5非常不满意，"
        "数字后可附意见。回复TD退订"
    )


# --- properties ---------------------------------------------------------------------------------

LEVEL_FRAGMENTS = ["不满意", "满意", "非常", "很", "基本", "一般", "不", "没有", "度", "好差评", "差", "还行"]
OTHER_FRAGMENTS = [
    "TD",
    "退订",
    "1",
    "4",
    "５",
    "12",
    "13800138000",
    "，",
    "。",
    " ",
    "！",
    "谢谢",
    "👍",
    "\ufffd",
    "第",
]
FRAGMENTS = st.sampled_from([*LEVEL_FRAGMENTS, *OTHER_FRAGMENTS])
REPLY_TEXTS = st.one_of(st.text(max_size=80), st.lists(FRAGMENTS | st.text(max_size=3), max_size=12).map("".join))
PROPERTY_SETTINGS = settings(max_examples=300, deadline=None)


@PROPERTY_SETTINGS
@given(REPLY_TEXTS)
@example("\ud83d")  # a lone surrogate from a broken decoder
@example("满意".encode("gbk").decode("latin-1"))
def test_any_text_parses_without_exception(raw: str) -> None:
    parsed = parse_reply(raw)
    assert isinstance(parsed, Rating | OptOut | Unclear)
    assert parsed.raw == raw
    if isinstance(parsed, Rating):
        assert len(parsed.comment) <= COMMENT_MAX
        assert parsed.level in Level


@PROPERTY_SETTINGS
@given(REPLY_TEXTS, REPLY_TEXTS)
def test_bad_words_never_read_as_a_good_level(before: str, after: str) -> None:
    """The substring trap (SPEC R3.5): a reply holding 不满意 never yields a good level by word."""
    raw = f"{before}不满意{after}"
    if "非常不满意" in raw:
        return
    parsed = parse_reply(raw, DEFAULT_RULES)
    if isinstance(parsed, Rating) and parsed.word is not None:
        assert parsed.level.is_bad, parsed


@PROPERTY_SETTINGS
@given(REPLY_TEXTS)
def test_very_bad_never_reads_as_anything_else_by_word(around: str) -> None:
    parsed = parse_reply(f"非常不满意{around}")
    if isinstance(parsed, Rating) and parsed.word is not None:
        assert parsed.level is Level.VERY_DISSATISFIED, parsed
