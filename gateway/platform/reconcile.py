"""Reconciliation (SPEC R7.3, 全量上报): one day's totals, the gateway's and the platform's side by side.

Per channel (the platform's pf code) and level: how many ratings the gateway stored, how many
the platform acknowledged, and how many the platform itself says it holds
(``GET /reconciliation``); with the recordIds still pending or set aside. The day is the
platform's: assessTime's date in Asia/Shanghai.

Blocking code (the store, ``urllib``) for the ``gateway reconcile`` command; Twisted code calls
:func:`reconciliation_report` in a store thread (``DeferredStore.run``).
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

from gateway.config import Config, PlatformConfig
from gateway.platform.records import PF_NAMES, new_nonce, signed_headers
from gateway.rating import Level
from storage.outbox import DayTotals, Outbox
from storage.store import Store

Counts = Mapping[str, Mapping[str, int]]


class PlatformUnavailable(Exception):
    """The platform's counts could not be had; the message says why, in words."""


@dataclass(frozen=True)
class Row:
    pf: str
    level: int
    stored: int
    pushed: int
    platform: int | None

    @property
    def consistent(self) -> bool:
        return self.stored == self.pushed and (self.platform is None or self.platform == self.pushed)


@dataclass(frozen=True)
class Reconciliation:
    """One day compared; ``platform`` None when the platform was not asked or did not answer."""

    day: date
    totals: DayTotals
    platform: Counts | None
    platform_status: str  # ok | not configured | unavailable
    platform_error: str | None = None

    @property
    def rows(self) -> list[Row]:
        keys = {
            (pf, level)
            for counts in (self.totals.stored, self.totals.pushed, self.platform or {})
            for pf, levels in counts.items()
            for level in levels
        }
        return [
            Row(
                pf,
                int(level),
                _get(self.totals.stored, pf, level),
                _get(self.totals.pushed, pf, level),
                _get(self.platform, pf, level) if self.platform is not None else None,
            )
            for pf, level in sorted(keys, key=lambda key: (int(key[0]), -int(key[1])))
        ]

    @property
    def platform_total(self) -> int | None:
        if self.platform is None:
            return None
        return sum(n for levels in self.platform.values() for n in levels.values())

    @property
    def consistent(self) -> bool:
        """Everything stored was pushed, nothing is pending or set aside, and the platform agrees."""
        return (
            all(row.consistent for row in self.rows)
            and not self.totals.pending
            and not self.totals.rejected
            and self.platform_status != "unavailable"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "date": self.day.isoformat(),
            "timezone": "Asia/Shanghai",
            "rows": [
                {
                    "pf": row.pf,
                    "channel": PF_NAMES.get(row.pf, row.pf),
                    "level": row.level,
                    "levelName": Level(row.level).chinese_name if 1 <= row.level <= 5 else None,
                    "stored": row.stored,
                    "pushed": row.pushed,
                    "platform": row.platform,
                }
                for row in self.rows
            ],
            "totals": {
                "stored": self.totals.stored_total,
                "pushed": self.totals.pushed_total,
                "platform": self.platform_total,
            },
            "pending": list(self.totals.pending),
            "rejected": [{"recordId": r, "reason": reason} for r, reason in self.totals.rejected],
            "platform": {"status": self.platform_status, "error": self.platform_error},
            "consistent": self.consistent,
        }


def _get(counts: Counts | None, pf: str, level: str) -> int:
    return int((counts or {}).get(pf, {}).get(level, 0))


def platform_configured(config: PlatformConfig) -> bool:
    return bool(config.url.strip() and config.app_id.strip() and config.secret)


_CODE = re.compile(r"[0-9]{1,3}")  # ASCII: str.isdigit() takes full-width digits too


def parse_platform_counts(answer: Any, day: date) -> dict[str, dict[str, int]]:
    """The ``counts`` of a ``/reconciliation`` answer, checked (PLATFORM.md Reconciliation)."""
    if not isinstance(answer, dict) or not isinstance(answer.get("counts"), dict):
        raise PlatformUnavailable("the platform's reconciliation answer has no counts")
    if answer.get("date") not in (None, day.isoformat()):
        raise PlatformUnavailable(f"the platform answered for {answer.get('date')}, not {day.isoformat()}")
    counts: dict[str, dict[str, int]] = {}
    for pf, levels in answer["counts"].items():
        if not isinstance(levels, dict):
            raise PlatformUnavailable(f"the platform's counts for channel {pf} are not an object")
        if not _CODE.fullmatch(str(pf)) or not all(_CODE.fullmatch(str(level)) for level in levels):
            raise PlatformUnavailable(f"the platform's counts for channel {pf!r} are not keyed by pf and level codes")
        if not all(type(n) is int and n >= 0 for n in levels.values()):
            raise PlatformUnavailable(f"the platform's counts for channel {pf} are not whole numbers")
        counts[str(pf)] = {str(level): n for level, n in levels.items()}
    return counts


def fetch_platform_counts(
    config: PlatformConfig,
    day: date,
    *,
    now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    opener: Callable[..., Any] = urllib.request.urlopen,
) -> dict[str, dict[str, int]]:
    """``GET {url}/reconciliation?date=…``, signed like a POST with an empty body."""
    url = f"{config.url.rstrip('/')}/reconciliation?" + urllib.parse.urlencode({"date": day.isoformat()})
    headers = signed_headers(config.app_id, config.secret, b"", timestamp_ms=now_ms(), nonce=new_nonce())
    request = urllib.request.Request(url, headers={**headers, "User-Agent": "hcp-gateway"}, method="GET")
    try:
        with opener(request, timeout=config.timeout) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise PlatformUnavailable(f"the platform answered {error.code} to {url}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise PlatformUnavailable(f"the platform at {config.url} cannot be reached: {reason}") from None
    except ValueError:
        raise PlatformUnavailable("the platform's reconciliation answer is not JSON") from None
    return parse_platform_counts(answer, day)


def reconcile(store: Store, day: date, platform: PlatformConfig | None = None) -> Reconciliation:
    """Compare ``day``; the platform is asked when ``platform`` is configured (SPEC R7.3)."""
    totals = Outbox(store).day_totals(day)
    if platform is None or not platform_configured(platform):
        return Reconciliation(day, totals, None, "not configured")
    try:
        counts = fetch_platform_counts(platform, day)
    except PlatformUnavailable as error:
        return Reconciliation(day, totals, None, "unavailable", str(error))
    return Reconciliation(day, totals, counts, "ok")


def reconciliation_report(store: Store, config: Config, day: date) -> dict[str, Any]:
    """The report as JSON, for an HTTP endpoint (issue 5 §2); blocking: run it in a store thread."""
    return reconcile(store, day, config.platform).as_json()


def format_text(result: Reconciliation, *, limit: int = 50) -> str:
    """The report for people: one line per channel and level, then what is pending or set aside."""
    lines = [f"reconciliation {result.day.isoformat()} (assessTime date, Asia/Shanghai)"]
    lines.append(f"{'pf':<3} {'channel':<10} {'level':<12} {'stored':>8} {'pushed':>8} {'platform':>9}")
    for row in result.rows:
        name = Level(row.level).chinese_name if 1 <= row.level <= 5 else "?"
        platform = "-" if row.platform is None else str(row.platform)
        mark = "" if row.consistent else "  <- differs"
        channel = PF_NAMES.get(row.pf, row.pf)
        lines.append(
            f"{row.pf:<3} {_pad(channel, 10)} {row.level} {_pad(name, 10)} {row.stored:>8} {row.pushed:>8} "
            f"{platform:>9}{mark}"
        )
    platform_total = "-" if result.platform_total is None else str(result.platform_total)
    lines.append(f"{'total':<27} {result.totals.stored_total:>8} {result.totals.pushed_total:>8} {platform_total:>9}")
    pending, rejected = result.totals.pending, result.totals.rejected
    lines.append(f"pending ({len(pending)}): " + (", ".join(pending[:limit]) + _more(pending, limit) or "none"))
    lines.append(f"rejected ({len(rejected)}):" + ("" if rejected else " none"))
    lines.extend(f"  {record_id}: {reason}" for record_id, reason in rejected[:limit])
    if len(rejected) > limit:
        lines.append(f"  … and {len(rejected) - limit} more (use --json)")
    status = result.platform_status + (f": {result.platform_error}" if result.platform_error else "")
    lines.append(f"platform: {status}")
    lines.append("consistent: " + ("yes" if result.consistent else "no"))
    return "\n".join(lines)


def _pad(text: str, width: int) -> str:
    """Pad to a display width, Chinese characters counting two columns."""
    shown = sum(2 if ord(ch) > 0x2E80 else 1 for ch in text)
    return text + " " * max(width - shown, 0)


def _more(items: list[str], limit: int) -> str:
    return f" … and {len(items) - limit} more (use --json)" if len(items) > limit else ""
