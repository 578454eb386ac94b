"""The rating rules: levels, key mapping, channels, one rating per record, batches and themes.

Pure code (no I/O, no clock): every channel adapter and the store call into this module, so a
rule lives in exactly one place.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


class Level(enum.IntEnum):
    """A rating level, valued by its score code (SPEC R1.2: 5 = 非常满意 … 1 = 非常不满意).

    The value is the stored code; it never equals a key the citizen pressed except by the
    explicit mapping in :class:`KeyMap`.
    """

    VERY_DISSATISFIED = 1
    DISSATISFIED = 2
    BASICALLY_SATISFIED = 3
    SATISFIED = 4
    VERY_SATISFIED = 5

    @property
    def chinese_name(self) -> str:
        return LEVEL_NAMES[self]

    @property
    def is_bad(self) -> bool:
        """不满意 and 非常不满意 are bad ratings (差评, SPEC R1.1)."""
        return self <= Level.DISSATISFIED

    @property
    def points(self) -> int:
        """Satisfaction on a 100-point scale (SPEC R6.1: 5→100 … 1→20)."""
        return int(self) * 20


LEVEL_NAMES: Mapping[Level, str] = {
    Level.VERY_SATISFIED: "非常满意",
    Level.SATISFIED: "满意",
    Level.BASICALLY_SATISFIED: "基本满意",
    Level.DISSATISFIED: "不满意",
    Level.VERY_DISSATISFIED: "非常不满意",
}

#: The level recorded when a citizen does not rate in time (SPEC R3.4).
DEFAULT_LEVEL = Level.BASICALLY_SATISFIED


class Channel(enum.StrEnum):
    """Where a rating came from (SPEC R1.7)."""

    VOICE = "voice"
    SMS = "sms"
    EMAIL = "email"
    WEB = "web"
    APP = "app"
    QR_CODE = "qr"
    HALL_TABLET = "tablet"
    TERMINAL = "terminal"
    OTHER = "other"
    SYSTEM = "system"  # the default rating (SPEC R3.4)


class ServiceKind(enum.StrEnum):
    """What a service record is (SPEC R1.3)."""

    CALL = "call"  # a 12345 hotline call
    MATTER = "matter"  # a government matter (办件)


class ApplicantType(enum.StrEnum):
    """The applicant, as the platform's userProp codes number it (PLATFORM.md)."""

    NATURAL_PERSON = "1"  # 自然人
    ENTERPRISE = "2"  # 企业法人
    PUBLIC_INSTITUTION = "3"  # 事业法人
    SOCIAL_ORGANISATION = "4"  # 社会组织法人
    UNINCORPORATED = "5"  # 非法人企业
    GOVERNMENT = "6"  # 行政机关
    OTHER = "9"  # 其他组织


class KeyMapError(ValueError):
    """A key map that does not map five distinct keys onto the five levels."""


@dataclass(frozen=True)
class KeyMap:
    """Which key (DTMF or SMS digit) selects which level (SPEC R1.2).

    The menu's default is the common 12345 wording: 1 = 非常满意 … 5 = 非常不满意; a
    deployment may configure another order. Digits are never passed through as levels.
    """

    keys: Mapping[str, Level]

    @classmethod
    def hotline_default(cls) -> KeyMap:
        return cls(
            {
                "1": Level.VERY_SATISFIED,
                "2": Level.SATISFIED,
                "3": Level.BASICALLY_SATISFIED,
                "4": Level.DISSATISFIED,
                "5": Level.VERY_DISSATISFIED,
            }
        )

    @classmethod
    def from_config(cls, mapping: Mapping[str, int]) -> KeyMap:
        """Build from ``{"1": 5, "2": 4, …}`` (key → level code), checking it is a bijection."""
        keys: dict[str, Level] = {}
        for key, code in mapping.items():
            if len(key) != 1 or key not in "0123456789*#":
                raise KeyMapError(f"key {key!r} is not a single DTMF key (0-9, * or #)")
            try:
                keys[key] = Level(int(code))
            except (TypeError, ValueError):
                raise KeyMapError(f"key {key!r} maps to {code!r}, which is not a level code 1-5") from None
        if sorted(keys.values()) != sorted(Level):
            raise KeyMapError("the key map must give each of the five levels exactly one key")
        return cls(keys)

    def level_for(self, key: str) -> Level | None:
        """The level a key selects, or None for a key that is not on the menu."""
        return self.keys.get(key)

    def key_for(self, level: Level) -> str:
        for key, mapped in self.keys.items():
            if mapped is level:
                return key
        raise KeyError(level)

    @property
    def valid_keys(self) -> str:
        return "".join(sorted(self.keys))


class RatingDecision(enum.StrEnum):
    """What becomes of a new rating for a record that may already be rated (SPEC R1.4)."""

    ACCEPTED = "accepted"  # the record's rating
    ATTEMPT = "attempt"  # kept for audit, does not replace the first
    FOLLOW_UP = "follow_up"  # 追评 after a bad-rating case was reported back (SPEC R4.5)


@dataclass(frozen=True)
class ExistingRatings:
    """What the store already holds for one service record (and visit)."""

    has_rating: bool = False
    has_default_only: bool = False
    has_follow_up: bool = False
    case_reported: bool = False


def decide_rating(existing: ExistingRatings, *, follow_up: bool = False) -> RatingDecision:
    """One rating per service per visit (SPEC R1.4), one follow-up (SPEC R4.5).

    A default rating (R3.4) is the system's, not the citizen's: no citizen rating can arrive
    after it, because the window has closed, so it is treated as a rating like any other.
    A follow-up is accepted once, and only after the bad-rating case result was reported.
    """
    if follow_up:
        if existing.has_rating and existing.case_reported and not existing.has_follow_up:
            return RatingDecision.FOLLOW_UP
        return RatingDecision.ATTEMPT
    if existing.has_rating:
        return RatingDecision.ATTEMPT
    return RatingDecision.ACCEPTED


@dataclass(frozen=True)
class RatedItem:
    """A service record as batch/theme propagation sees it (SPEC R1.6)."""

    record_id: str
    batch_id: str | None = None
    theme_id: str | None = None


def applies_to(rated: RatedItem, items: Iterable[RatedItem]) -> list[str]:
    """Every record a rating of ``rated`` covers (SPEC R1.6).

    A rating of one item of a batch (批量业务) covers every item of the batch; an overall
    rating of a theme (主题式"一件事") covers every matter of the theme. The result is sorted
    and always includes the rated record itself.
    """
    covered = {rated.record_id}
    for item in items:
        if rated.batch_id and item.batch_id == rated.batch_id:
            covered.add(item.record_id)
        if rated.theme_id and item.theme_id == rated.theme_id:
            covered.add(item.record_id)
    return sorted(covered)


def rating_group(batch_id: str | None, theme_id: str | None) -> tuple[str, str] | None:
    """The group a citizen is asked to rate as one service (SPEC R1.6), or None for a lone record.

    A theme (主题式"一件事") is asked for its overall rating, which covers every matter of it,
    batches included; otherwise a batch (批量业务) is asked once, its rating covering every item.

    >>> rating_group("B-1", "T-1"), rating_group("B-1", None), rating_group(None, None)
    (('theme', 'T-1'), ('batch', 'B-1'), None)
    """
    if theme_id:
        return ("theme", theme_id)
    if batch_id:
        return ("batch", batch_id)
    return None


@dataclass(frozen=True)
class GivenRating:
    """A rating as given, for :func:`effective_levels`: on one record, or overall on a theme."""

    record_id: str
    level: Level
    overall: bool = False  # True when rated as the theme's overall rating


def effective_levels(items: Iterable[RatedItem], ratings: Iterable[GivenRating]) -> dict[str, Level]:
    """The level that holds for each record, after batch and theme propagation (SPEC R1.6).

    Precedence, strongest first: the record's own rating; a rating of another item in its
    batch; its theme's overall rating. Within one kind the first given rating wins (R1.4).
    """
    items = list(items)
    by_id = {item.record_id: item for item in items}
    own: dict[str, Level] = {}
    batch: dict[str, Level] = {}
    theme: dict[str, Level] = {}
    for rating in ratings:
        item = by_id.get(rating.record_id)
        if item is None:
            continue
        if rating.overall and item.theme_id:
            theme.setdefault(item.theme_id, rating.level)
            continue
        own.setdefault(item.record_id, rating.level)
        if item.batch_id:
            batch.setdefault(item.batch_id, rating.level)
    levels: dict[str, Level] = {}
    for item in items:
        if item.record_id in own:
            levels[item.record_id] = own[item.record_id]
        elif item.batch_id and item.batch_id in batch:
            levels[item.record_id] = batch[item.batch_id]
        elif item.theme_id and item.theme_id in theme:
            levels[item.record_id] = theme[item.theme_id]
    return levels
