"""Operators' queries on both backends (SQLite and PostgreSQL): keyset pages, the audited call-back view."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select

from gateway.rating import Level
from storage.queries import BadCursor, audit_entries, contact_view, encode_cursor, find_ratings_page
from storage.schema import audit_log
from storage.store import Store
from tests.test_operator_api import BASE, add_rating


def test_keyset_pages_cover_ratings_of_the_same_moment_once_each(store: Store) -> None:
    """Ratings stored in one group commit share a time: the row id breaks the tie (microseconds kept)."""
    moment = BASE + timedelta(microseconds=123457)
    ids = [add_rating(store, f"Q-{n:02d}", agent_id="A-Q", rated_at=moment) for n in range(7)]
    ids.append(add_rating(store, "Q-LATER", agent_id="A-Q", rated_at=moment + timedelta(microseconds=1)))
    seen, cursor = [], None
    while True:
        page = find_ratings_page(store, {"agent": "A-Q"}, limit=3, cursor=cursor)
        seen += [rating.record_id for rating in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == ids
    assert find_ratings_page(store, {"agent": "A-Q"}, limit=8).next_cursor is None  # exactly one full page


@pytest.mark.parametrize("cursor", ["", "x", encode_cursor("not a time", 1), encode_cursor("2026-11-20T02:00:00", 1)])
def test_a_cursor_not_given_out_is_refused(store: Store, cursor: str) -> None:
    with pytest.raises(BadCursor, match="start again without it"):
        find_ratings_page(store, {"agent": "A-Q"}, cursor=cursor)


def test_the_call_back_view_is_audited_in_the_same_transaction_and_the_audit_holds_no_number(store: Store) -> None:
    """SPEC R5.1: an unmasked view that cannot be audited is not shown."""
    record_id = add_rating(store, "CB-1", level=Level.DISSATISFIED, mobile="+8613712345678")
    view = contact_view(store, actor="supervisor:alice", role="supervisor", rating_record_id=record_id)
    assert view is not None and view["mobile"] == "+8613712345678" and view["mobileMasked"] == "137****5678"
    [entry] = audit_entries(store, action="contact.view")
    assert (entry["actor"], entry["subject"]) == ("supervisor:alice", f"rating:{record_id}")
    assert "13712345678" not in repr(entry)
    assert contact_view(store, actor="supervisor:alice", role="supervisor", service_id="NO-SUCH") is None
    assert len(audit_entries(store, action="contact.view")) == 1

    # The audit write fails (its table is gone): the number is not handed out.
    with store.engine.begin() as connection:
        connection.execute(audit_log.delete())
        before = connection.execute(select(func.count()).select_from(audit_log)).scalar_one()
    assert before == 0
    audit_log.drop(store.engine)
    try:
        with pytest.raises(Exception, match="audit_log"):
            contact_view(store, actor="supervisor:alice", role="supervisor", service_id="CB-1")
    finally:
        audit_log.create(store.engine)
