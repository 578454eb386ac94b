"""Store fixtures: the same tests run against SQLite and a real PostgreSQL server."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.privacy import DataProtector
from storage import migrate
from storage.store import Store, make_engine


def make_protector() -> DataProtector:
    return DataProtector(os.urandom(32), os.urandom(32))


def random_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database URL on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gateway.sqlite3'}"
    return str(request.getfixturevalue("postgresql_fresh_url"))


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """A migrated store on each backend."""
    engine = make_engine(store_url, threads=4)
    migrate.upgrade(engine)
    yield Store(engine, make_protector())
    engine.dispose()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    engine = make_engine(f"sqlite:///{tmp_path / 'gateway.sqlite3'}")
    migrate.upgrade(engine)
    yield Store(engine, make_protector())
    engine.dispose()
