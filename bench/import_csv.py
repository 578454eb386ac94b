"""Benchmark: ``gateway import`` of N service records from CSV into a fresh SQLite store.

    .venv/bin/python bench/import_csv.py --rows 100000

Runs the real command (a subprocess, progress bar off) twice: the first run creates every
record, the second finds every record unchanged (the idempotent re-run). Prints rows/s.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway.intake import CSV_COLUMNS


def write_csv(path: Path, rows: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for i in range(rows):
            writer.writerow(
                [
                    f"BJ{i:09d}",
                    "matter" if i % 4 else "call",
                    f"2026-11-{1 + i % 20:02d}T{8 + i % 9:02d}:{i % 60:02d}:00+08:00" if i % 10 else "",
                    f"13{rng.randrange(10**9):09d}",
                    f"user{i}@example.cn" if i % 3 == 0 else "",
                    f"1111000000000000X40001{i % 500:05d}",
                    "不动产登记（转移登记）",
                    "11620100013922046L",
                    "兰州市自然资源局",
                    f"A{i % 300:04d}",
                    f"GD2026{i:09d}" if i % 4 == 0 else "",
                    f"B{i // 3}" if i % 7 == 0 else "",
                    f"T{i // 5}" if i % 11 == 0 else "",
                ]
            )


def run_import(path: Path, env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "import", "--quiet", str(path)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"import failed ({result.returncode}): {result.stderr[-2000:]}")
    return elapsed, result.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "records.csv"
        write_csv(path, args.rows)
        env = {**os.environ, "GATEWAY_STORE_DATA_DIR": str(Path(tmp) / "data")}
        for label in ("first import (all created)", "second import (all unchanged)"):
            elapsed, summary = run_import(path, env)
            print(f"{label}: {args.rows} rows in {elapsed:.1f} s = {args.rows / elapsed:,.0f} rows/s  [{summary}]")


if __name__ == "__main__":
    main()
