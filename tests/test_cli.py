"""The ``gateway`` command's failures of the deployment: one sentence on stderr, exit 1, no secret shown."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from gateway.cli import main
from storage.migrate import alembic_config
from tests.postgresql_server import PostgreSQLServer

PASSWORD = "p%40ss%"  # as written in the URL: "p@ss%" percent-encoded but for the last %


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in [name for name in os.environ if name.startswith("GATEWAY_")]:
        monkeypatch.delenv(name)
    path = tmp_path / "data"
    monkeypatch.setenv("GATEWAY_STORE_DATA_DIR", str(path))
    return path


def one_line_of_stderr(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_data_dir_that_is_a_file_is_named(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir.write_text("", encoding="utf-8")
    line = one_line_of_stderr(capsys, "token", "list")
    assert line == f"[store] data_dir {data_dir} is a file, not a directory; name a directory"


def test_a_data_dir_that_cannot_be_created_is_named(
    data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir.write_text("", encoding="utf-8")
    monkeypatch.setenv("GATEWAY_STORE_DATA_DIR", str(data_dir / "inside"))
    line = one_line_of_stderr(capsys, "db", "upgrade")
    assert line.startswith(f"[store] data_dir {data_dir / 'inside'} cannot be created (Not a directory)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any directory")
def test_a_data_dir_that_is_not_writable_is_named(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir.mkdir(mode=0o500)
    line = one_line_of_stderr(capsys, "token", "list")
    assert line.startswith(f"[store] data_dir {data_dir} is not writable by this user")


def test_the_data_dir_the_gateway_creates_is_private(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It holds masked phones, comments and the audit log (SPEC R5.1): other users may not list or read it."""
    assert main(["token", "list"]) == 0
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((data_dir / "gateway.sqlite3").stat().st_mode) == 0o600


def test_a_data_dir_set_up_beforehand_keeps_the_modes_its_owner_chose(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Shared with gateway-agi's user by a group (docs/asterisk.md): the store must stay group-writable."""
    data_dir.mkdir(mode=0o770)
    os.chmod(data_dir, 0o2770)
    old_umask = os.umask(0o007)
    try:
        assert main(["token", "list"]) == 0
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o2770
    assert stat.S_IMODE((data_dir / "gateway.sqlite3").stat().st_mode) == 0o644 & ~0o007  # SQLite's, not 0600


def test_the_store_is_private_in_a_data_dir_others_may_read(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)
    assert main(["token", "list"]) == 0
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o755  # its owner's choice
    assert stat.S_IMODE((data_dir / "gateway.sqlite3").stat().st_mode) == 0o600


def test_a_damaged_key_file_is_reported_by_config_check_and_stops_every_command(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir.mkdir()
    (data_dir / "keys.toml").write_text('encryption_key = "AAAA', encoding="utf-8")
    assert main(["config", "check"]) == 1
    assert f"the key file {data_dir / 'keys.toml'} is damaged" in capsys.readouterr().err
    line = one_line_of_stderr(capsys, "token", "list")
    assert line.startswith(f"the key file {data_dir / 'keys.toml'} is damaged (Unterminated string")
    assert "AAAA" not in line


def test_a_bad_calendar_file_stops_run_with_one_sentence(data_dir: Path, tmp_path: Path) -> None:
    """`config check` reported it; `run` gave a traceback (it installs a reactor, hence a process of its own)."""
    override = tmp_path / "holidays.toml"
    override.write_text("[agi]\nwait = 1\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "run"],
        env={**os.environ, "GATEWAY_STORE_DATA_DIR": str(data_dir), "GATEWAY_CALENDAR_OVERRIDE_FILE": str(override)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"Calendar override file {override}: [agi] is not a year table" in result.stderr.splitlines()[-1]


def test_a_postgresql_url_without_its_driver_names_the_extra(
    data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # what `import psycopg` meets when it is not installed
    monkeypatch.setenv("GATEWAY_STORE_URL", f"postgresql+psycopg://gateway:{PASSWORD}@127.0.0.1:1/gateway")
    line = one_line_of_stderr(capsys, "token", "list")
    assert "driver psycopg is not installed" in line and "[postgresql] extra" in line


def test_a_password_with_a_percent_sign_reaches_the_database_and_is_never_shown(
    data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alembic's ConfigParser read ``%40`` as interpolation and printed the URL, password and all."""
    monkeypatch.setenv("GATEWAY_STORE_URL", f"postgresql+psycopg://gateway:{PASSWORD}@127.0.0.1:1/gateway")
    line = one_line_of_stderr(capsys, "token", "list")
    assert line.startswith("the store cannot be reached: connection failed")
    assert "p%40ss" not in line and "p@ss" not in line


def test_alembic_gets_the_url_with_its_percent_signs_intact() -> None:
    engine = create_engine(f"postgresql+psycopg://gateway:{PASSWORD}@127.0.0.1:1/gateway")
    url = alembic_config(engine).get_main_option("sqlalchemy.url")
    assert make_url(url or "").password == "p@ss%"


def test_a_database_user_without_the_right_to_create_tables_is_told_so(
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    postgresql_server: PostgreSQLServer,
    postgresql_fresh_url: str,
) -> None:
    role = f"reader_{uuid.uuid4().hex[:8]}"
    database = make_url(postgresql_fresh_url).database or ""
    with postgresql_server.connect() as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        with postgresql_server.connect(database) as conn:
            conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        url = make_url(postgresql_fresh_url).set(username=role, password="p@ss%")
        monkeypatch.setenv("GATEWAY_STORE_URL", url.render_as_string(hide_password=False))
        line = one_line_of_stderr(capsys, "db", "upgrade")
        assert line.startswith("the store's database user lacks a permission: permission denied for schema public;")
        assert "p@ss" not in line and "p%40ss" not in line
    finally:
        with postgresql_server.connect() as conn:
            conn.execute(f"DROP ROLE {role}")


def test_config_may_follow_the_command_too(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """README: "All take --config FILE"; `gateway config check --config F` was a usage error."""
    config = tmp_path / "gateway.toml"
    config.write_text("[agi]\nport = 70000\n", encoding="utf-8")
    for argv in (["--config", str(config), "config", "check"], ["config", "check", "--config", str(config)]):
        assert main(argv) == 1
        assert "[agi] port" in capsys.readouterr().err


def test_ratings_are_listed_in_beijing_time_as_the_filters_read_it(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A time copied from the list into --since finds the rating (docs/operations.md)."""
    from datetime import UTC, datetime

    from gateway.config import load_config
    from gateway.intake import ServiceRecordInput
    from gateway.rating import Channel, Level, ServiceKind
    from storage.store import Store

    store = Store.from_config(load_config(None))
    store.upsert_service_records([ServiceRecordInput(id="M-1", kind=ServiceKind.MATTER)])  # type: ignore[arg-type]
    [record] = [store.get_service_record("M-1")]
    assert record is not None
    with store.engine.begin() as connection:
        pk = connection.exec_driver_sql("SELECT id FROM service_records").scalar_one()
        store.add_rating(
            connection, service_record_id=pk, level=Level.SATISFIED, channel=Channel.WEB, raw_input="4",
            rated_at=datetime(2026, 11, 24, 6, 48, 27, tzinfo=UTC),
        )  # fmt: skip
    assert main(["ratings", "--service-id", "M-1"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("2026-11-24 14:48:27+08:00")
    assert main(["ratings", "--service-id", "M-1", "--since", "2026-11-24T14:48", "--until", "2026-11-24T14:49"]) == 0
    assert capsys.readouterr().out.startswith("2026-11-24 14:48:27+08:00")
