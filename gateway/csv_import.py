"""``gateway import FILE.csv``: bulk loads of service records (SPEC R1.3).

UTF-8 (with or without BOM), a header row naming the columns of
:data:`gateway.intake.CSV_COLUMNS` (``id`` and ``kind`` are required, the others may be
absent or empty). Idempotent on ``id``; every bad row is reported with its line, id and
reason, and never stops the rest.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from gateway.intake import ALL_FIELDS, ServiceRecordInput, parse_service_record
from gateway.privacy import mask_phone
from storage.store import IntakeResult, Store

BATCH_SIZE = 2000


class ImportFileError(Exception):
    """The file as a whole cannot be imported (nothing was imported)."""


@dataclass(frozen=True)
class RowProblem:
    line: int
    id: str | None
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}" + (f", id {self.id}" if self.id else "") + f": {self.reason}"


@dataclass
class ImportReport:
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("created", "updated", "unchanged", "rejected"), 0)
    )
    problems: list[RowProblem] = field(default_factory=list)
    ignored_columns: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(self.counts.values())


def read_rows(handle: io.TextIOBase) -> tuple[list[str], Iterator[tuple[int, dict[str, str] | None, str | None]]]:
    """The header, and (line, row, problem) per data row; ``row`` is None for a broken row."""
    reader = csv.reader(handle, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise ImportFileError("the file is empty; it needs a header row naming the columns") from None
    except csv.Error as error:
        raise ImportFileError(f"the header row is not valid CSV: {error}") from None
    header = [name.strip().lower() for name in header]
    missing = [name for name in ("id", "kind") if name not in header]
    if missing:
        raise ImportFileError(
            f"the header row lacks the column(s) {', '.join(missing)}; expected columns: {', '.join(ALL_FIELDS)}"
        )
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise ImportFileError(f"the header row names {', '.join(duplicates)} more than once")

    def rows() -> Iterator[tuple[int, dict[str, str] | None, str | None]]:
        while True:
            line = reader.line_num + 1
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                yield line, None, f"not valid CSV: {error}"
                continue
            if not any(v.strip() for v in values):
                continue  # blank line
            if len(values) != len(header):
                yield line, None, f"has {len(values)} fields where the header has {len(header)}"
                continue
            yield line, dict(zip(header, values, strict=True)), None

    return header, rows()


def import_csv(
    path: Path,
    store: Store,
    *,
    now: datetime,
    default_country_code: str = "86",
    progress: Callable[[int], None] | None = None,
) -> ImportReport:
    """Validate and store every row; returns counts and the problems, row by row."""
    report = ImportReport()
    try:
        handle = path.open(encoding="utf-8-sig", errors="surrogateescape", newline="")
    except OSError as error:
        raise ImportFileError(f"cannot open {path}: {error.strerror}") from None
    with handle:
        header, rows = read_rows(handle)
        report.ignored_columns = [name for name in header if name not in ALL_FIELDS]
        batch: list[ServiceRecordInput] = []
        lines: list[int] = []

        def flush() -> None:
            results: list[IntakeResult] = store.upsert_service_records(batch)
            for line, result in zip(lines, results, strict=True):
                report.counts[result.status] += 1
                if result.reason:
                    report.problems.append(RowProblem(line, result.id, result.reason))
            if progress:
                progress(len(batch))
            batch.clear()
            lines.clear()

        for line, row, problem in rows:
            if row is None:
                report.counts["rejected"] += 1
                report.problems.append(RowProblem(line, None, problem or "unreadable"))
                continue
            known = {k: v for k, v in row.items() if k in ALL_FIELDS}
            parsed = parse_service_record(known, now=now, strict_types=False, default_country_code=default_country_code)
            if isinstance(parsed, list):
                report.counts["rejected"] += 1
                raw_id = row.get("id", "").strip() or None
                if raw_id and any(error.field == "id" for error in parsed):
                    raw_id = None  # not a valid id: maybe a phone or a name of a shifted column (SPEC R5.1)
                elif raw_id and raw_id.isascii() and raw_id.isdigit() and len(raw_id) >= 7:
                    raw_id = mask_phone("+" + raw_id)  # all digits: maybe a phone; the line number tells the row (R5.1)
                report.problems.append(RowProblem(line, raw_id, "; ".join(str(e) for e in parsed)))
                if progress:
                    progress(1)
                continue
            batch.append(parsed)
            lines.append(line)
            if len(batch) >= BATCH_SIZE:
                flush()
        if batch:
            flush()
    return report
