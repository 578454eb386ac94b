"""The throwaway PostgreSQL server of tests/postgresql_server.py really works."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

RATINGS = [
    {"id": 1, "label": "好评", "score": 5},
    {"id": 2, "label": "差评", "score": 1},
    {"id": 3, "label": "基本满意", "score": 3},
]


def test_round_trip(postgresql_fresh_url: str) -> None:
    engine = sa.create_engine(postgresql_fresh_url)
    try:
        with engine.begin() as conn:
            version = conn.execute(sa.text("select version()")).scalar_one()
            assert version.startswith("PostgreSQL ")
            conn.execute(
                sa.text("create table rating (id integer primary key, label text not null, score smallint not null)")
            )
            conn.execute(
                sa.text("insert into rating (id, label, score) values (:id, :label, :score)"),
                RATINGS,
            )
        with engine.connect() as conn:
            rows = conn.execute(sa.text("select id, label, score from rating order by id"))
            assert [dict(row) for row in rows.mappings()] == RATINGS
    finally:
        engine.dispose()


def test_fresh_databases_are_distinct(
    postgresql_url: str,
    postgresql_fresh_url: str,
    postgresql_create_database: Callable[[], str],
) -> None:
    other_url = postgresql_create_database()
    names = {make_url(url).database for url in (postgresql_url, postgresql_fresh_url, other_url)}
    assert len(names) == 3

    first, second = sa.create_engine(postgresql_fresh_url), sa.create_engine(other_url)
    try:
        with first.begin() as conn:
            conn.execute(sa.text("create table only_in_first (id integer)"))
        with second.connect() as conn:
            assert conn.execute(sa.text("select current_database()")).scalar_one() == (make_url(other_url).database)
            assert not sa.inspect(conn).has_table("only_in_first")
    finally:
        first.dispose()
        second.dispose()


def test_session_database(postgresql_url: str, request: pytest.FixtureRequest) -> None:
    assert make_url(postgresql_url).database == "gateway_test"
    assert make_url(postgresql_url).host == "127.0.0.1"
    assert request.node.get_closest_marker("postgresql") is not None
    engine = sa.create_engine(postgresql_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("select current_database()")).scalar_one() == ("gateway_test")
            assert conn.execute(sa.text("show fsync")).scalar_one() == "off"
            assert conn.execute(sa.text("show max_connections")).scalar_one() == "200"
    finally:
        engine.dispose()
