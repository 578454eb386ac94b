"""``gateway import FILE.csv`` (SPEC R1.3): idempotent, every bad row reported, the rest kept."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.csv_import import ImportFileError, import_csv
from gateway.intake import CSV_COLUMNS
from storage.store import Store

NOW = datetime(2026, 11, 23, 6, 0, tzinfo=UTC)
HEADER = ",".join(CSV_COLUMNS) + "\n"


def write(tmp_path: Path, text: str, name: str = "records.csv", encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def test_good_rows_are_stored_and_bad_rows_reported_with_line_id_and_reason(tmp_path: Path, store: Store) -> None:
    path = write(
        tmp_path,
        HEADER
        + "M-1,matter,2026-11-22 10:00:00,13800138000,a@example.cn,X1,不动产登记,D1,自然资源局,A1,,B1,\n"
        + "M-2,matter,not a date,,,,,,,,,,\n"
        + "C-1,call,2026-11-22T09:00:00+08:00,,,,,,,A2,GD-1,,\n"
        + "M-3,visit,,,,,,,,,,,\n"
        + "M-4,matter,,12345,,,,,,,,,\n"
        + "M-5,matter\n"
        + "\n"
        + ",matter,,,,,,,,,,,\n"
        + 'M-6,matter,,,,,"unterminated,,,,,,\n',
    )
    report = import_csv(path, store, now=NOW)
    assert report.counts == {"created": 2, "updated": 0, "unchanged": 0, "rejected": 6}
    problems = [str(p) for p in report.problems]
    assert "line 3, id M-2: completed_at: is not an ISO 8601 time" in problems[0]
    assert any(p.startswith("line 7: has 2 fields where the header has 13") for p in problems)
    assert any(p.startswith("line 9: id: is required") for p in problems)
    assert any("M-4" in p and "mobile" in p for p in problems)
    assert store.get_service_record("M-1")["mobileMasked"] == "138****8000"  # type: ignore[index]
    assert store.get_service_record("C-1") is not None


def test_a_shifted_row_is_reported_without_the_phone_it_carries_and_bad_dates_stop_nothing(
    tmp_path: Path, store: Store
) -> None:
    """SPEC R5.1: `gateway import` prints problems on the console; a phone in the id or kind column
    is not repeated there. A .NET "no date" (year 1) is a field error, not an aborted batch."""
    path = write(
        tmp_path,
        HEADER
        + "138 1234 5679,matter,,,,,,,,,,,\n"
        + "M-7,13912345678,,,,,,,,,,,\n"
        + "13912345679,M-10,matter,,,,,,,,,,\n"
        + "M-8,matter,0001-01-01T00:00:00,,,,,,,,,,\n"
        + "M-9,matter,2026-11-22 10:00:00,,,,,,,,,,\n",
    )
    report = import_csv(path, store, now=NOW)
    assert report.counts == {"created": 1, "updated": 0, "unchanged": 0, "rejected": 4}
    printed = "\n".join(str(p) for p in report.problems)
    assert "1234" not in printed and "13912345678" not in printed and "13912345679" not in printed
    assert "line 4, id 139****5679: kind" in printed  # a digits-only id is shown masked
    assert "line 5, id M-8: completed_at" in printed
    assert store.get_service_record("M-9") is not None


def test_importing_the_same_file_twice_changes_nothing(tmp_path: Path, store: Store) -> None:
    path = write(tmp_path, HEADER + "M-1,matter,,,,X1,,,,,,,\nM-2,matter,,,,,,,,,,,\n")
    assert import_csv(path, store, now=NOW).counts["created"] == 2
    assert import_csv(path, store, now=NOW).counts == {"created": 0, "updated": 0, "unchanged": 2, "rejected": 0}


def test_bom_and_minimal_header_are_accepted(tmp_path: Path, store: Store) -> None:
    path = write(tmp_path, "\ufeffid,kind,extra\nM-1,matter,x\n")
    report = import_csv(path, store, now=NOW)
    assert report.counts["created"] == 1 and report.ignored_columns == ["extra"]


def test_gbk_rows_are_rejected_but_utf8_rows_kept(tmp_path: Path, store: Store) -> None:
    path = tmp_path / "mixed.csv"
    path.write_bytes(
        HEADER.encode()
        + "M-1,matter,,,,,不动产登记,,,,,,\n".encode()
        + "M-2,matter,,,,,不动产登记,,,,,,\n".encode("gbk")
    )
    report = import_csv(path, store, now=NOW)
    assert report.counts["created"] == 1 and report.counts["rejected"] == 1
    assert "not valid UTF-8" in str(report.problems[0])


@pytest.mark.parametrize(
    ("text", "words"),
    [("", "empty"), ("identifier,kind\nx,matter\n", r"lacks the column\(s\) id"), ("id,kind,id\n", "more than once")],
)
def test_unusable_files_import_nothing_and_say_why(tmp_path: Path, sqlite_store: Store, text: str, words: str) -> None:
    with pytest.raises(ImportFileError, match=words):
        import_csv(write(tmp_path, text), sqlite_store, now=NOW)


def test_import_command_exit_status_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path, f'[store]\ndata_dir = "{tmp_path / "data"}"\n', "gateway.toml")
    path = write(tmp_path, HEADER + "M-1,matter,,,,,,,,,,,\nM-2,kind?,,,,,,,,,,,\n")
    assert main(["--config", str(config), "import", "--quiet", str(path)]) == 3
    captured = capsys.readouterr()
    assert "2 rows: 1 created, 0 updated, 0 unchanged, 1 rejected" in captured.out
    assert "line 3, id M-2: kind:" in captured.err
    assert main(["--config", str(config), "import", "--quiet", str(tmp_path / "missing.csv")]) == 1
    assert "nothing was imported" in capsys.readouterr().err
