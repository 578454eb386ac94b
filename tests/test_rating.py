"""The rating rules (SPEC R1.1, R1.2, R1.4, R1.6), pure."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.rating import (
    ExistingRatings,
    GivenRating,
    KeyMap,
    KeyMapError,
    Level,
    RatedItem,
    RatingDecision,
    applies_to,
    decide_rating,
    effective_levels,
)


@pytest.mark.parametrize(
    ("key", "level", "name", "bad"),
    [
        ("1", Level.VERY_SATISFIED, "非常满意", False),
        ("2", Level.SATISFIED, "满意", False),
        ("3", Level.BASICALLY_SATISFIED, "基本满意", False),
        ("4", Level.DISSATISFIED, "不满意", True),
        ("5", Level.VERY_DISSATISFIED, "非常不满意", True),
    ],
)
def test_hotline_menu_keys_map_to_score_codes_not_passed_through(key: str, level: Level, name: str, bad: bool) -> None:
    """SPEC R1.2: key 1 is 非常满意, stored as code 5; R1.1: 4 and 5 are bad ratings."""
    assert KeyMap.hotline_default().level_for(key) is level
    assert level.chinese_name == name
    assert level.is_bad is bad


@pytest.mark.parametrize("key", ["0", "6", "9", "*", "#", "", "12"])
def test_keys_off_the_menu_select_nothing(key: str) -> None:
    assert KeyMap.hotline_default().level_for(key) is None


def test_key_map_from_configuration_must_be_a_bijection() -> None:
    reversed_map = KeyMap.from_config({"5": 5, "4": 4, "3": 3, "2": 2, "1": 1})
    assert reversed_map.level_for("5") is Level.VERY_SATISFIED
    with pytest.raises(KeyMapError, match="exactly one key"):
        KeyMap.from_config({"1": 5, "2": 5, "3": 3, "4": 2, "5": 1})
    with pytest.raises(KeyMapError, match="not a level code"):
        KeyMap.from_config({"1": 6, "2": 4, "3": 3, "4": 2, "5": 1})
    with pytest.raises(KeyMapError, match="single DTMF key"):
        KeyMap.from_config({"10": 5, "2": 4, "3": 3, "4": 2, "5": 1})


def test_satisfaction_points() -> None:
    """SPEC R6.1: 5→100 … 1→20."""
    assert [level.points for level in Level] == [20, 40, 60, 80, 100]


def test_second_rating_is_an_attempt_and_follow_up_only_after_case_reported() -> None:
    """SPEC R1.4 and R4.5."""
    assert decide_rating(ExistingRatings()) is RatingDecision.ACCEPTED
    assert decide_rating(ExistingRatings(has_rating=True)) is RatingDecision.ATTEMPT
    assert decide_rating(ExistingRatings(has_rating=True), follow_up=True) is RatingDecision.ATTEMPT
    reported = ExistingRatings(has_rating=True, case_reported=True)
    assert decide_rating(reported, follow_up=True) is RatingDecision.FOLLOW_UP
    again = ExistingRatings(has_rating=True, case_reported=True, has_follow_up=True)
    assert decide_rating(again, follow_up=True) is RatingDecision.ATTEMPT


def test_batch_rating_covers_every_item_and_theme_overall_yields_to_own_rating() -> None:
    """SPEC R1.6 by example."""
    items = [
        RatedItem("a", batch_id="B"),
        RatedItem("b", batch_id="B"),
        RatedItem("c", theme_id="T"),
        RatedItem("d", theme_id="T"),
        RatedItem("e"),
    ]
    assert applies_to(items[0], items) == ["a", "b"]
    assert applies_to(items[2], items) == ["c", "d"]
    assert applies_to(items[4], items) == ["e"]
    levels = effective_levels(
        items,
        [
            GivenRating("b", Level.SATISFIED),
            GivenRating("c", Level.VERY_SATISFIED, overall=True),
            GivenRating("d", Level.DISSATISFIED),
        ],
    )
    assert levels == {"a": Level.SATISFIED, "b": Level.SATISFIED, "c": Level.VERY_SATISFIED, "d": Level.DISSATISFIED}


ids = st.sampled_from("abcdefgh")
groups = st.one_of(st.none(), st.sampled_from(["G1", "G2", "G3"]))


@st.composite
def items_and_ratings(draw: st.DrawFn) -> tuple[list[RatedItem], list[GivenRating]]:
    names = draw(st.lists(ids, min_size=1, max_size=8, unique=True))
    items = [RatedItem(n, batch_id=draw(groups), theme_id=draw(groups)) for n in names]
    given = draw(
        st.lists(
            st.builds(GivenRating, st.sampled_from(names), st.sampled_from(list(Level)), st.booleans()),
            max_size=6,
        )
    )
    return items, given


@settings(max_examples=200, deadline=None)
@given(items_and_ratings())
def test_propagation_properties(case: tuple[list[RatedItem], list[GivenRating]]) -> None:
    """SPEC R1.6: own ratings take precedence; batch members share; every level comes from a given rating."""
    items, given = case
    levels = effective_levels(items, given)
    by_id = {item.record_id: item for item in items}
    own = {}
    for rating in given:
        if not (rating.overall and by_id[rating.record_id].theme_id):
            own.setdefault(rating.record_id, rating.level)
    for record_id, level in own.items():
        assert levels[record_id] is level  # a separate rating always wins
    given_levels = {r.level for r in given}
    assert set(levels.values()) <= given_levels
    for item in items:
        if item.record_id not in own and item.batch_id:
            peers = [i for i in items if i.batch_id == item.batch_id and i.record_id in own]
            if peers:
                assert item.record_id in levels  # a rated batch covers every item
        if item.record_id in levels:
            covering = [
                r
                for r in given
                if r.record_id == item.record_id
                or (item.batch_id and by_id[r.record_id].batch_id == item.batch_id)
                or (item.theme_id and r.overall and by_id[r.record_id].theme_id == item.theme_id)
            ]
            assert covering
    for item in items:
        assert item.record_id in applies_to(item, items)
        for other in applies_to(item, items):
            o = by_id[other]
            assert (
                other == item.record_id
                or (item.batch_id and o.batch_id == item.batch_id)
                or (item.theme_id and o.theme_id == item.theme_id)
            )
