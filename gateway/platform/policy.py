"""What the pusher does with each answer of the platform (SPEC R7.2), as pure decisions.

``judge`` turns an HTTP outcome into a verdict; :class:`Backoff` says how long the pusher as a
whole waits after a failure. No I/O and no clock: the pusher feeds answers in and acts on the
verdicts, and tests feed real-looking answers without a network.

Answers (``PLATFORM.md`` Responses):

==============================  ============================================================
200 ``{"code": 0, …}``          accepted and duplicates are done; rejected are set aside with
                                the reason; records the answer does not mention stay pending
400, 413                        the batch is refused: split it in halves to isolate the record
                                at fault; a single record refused this way is set aside (when
                                the refusal is not the platform's JSON, only once another
                                batch of the round went through: the pusher decides)
401                             signature, timestamp or nonce refused: retry with a fresh
                                nonce and timestamp, and say so loudly (a wrong secret?)
429, 503 (Retry-After)          slow down: wait at least Retry-After, then retry
other 5xx, timeout, dropped     unknown whether anything was taken: retry the same recordIds
other 4xx (404, 415, …)         the gateway is misconfigured: retry, never drop
==============================  ============================================================
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TypeVar

T = TypeVar("T")

#: A platform asking for more than this is believed only up to it: pushes must resume (SPEC R7.1).
MAX_RETRY_AFTER = 300.0


@dataclass(frozen=True)
class Acknowledged:
    """The platform answered for the batch: settle each record it names."""

    done: list[str]  # accepted or duplicates: pushed (SPEC R7.2)
    rejected: dict[str, str]  # recordId → the platform's reason: set aside, never retried unchanged
    unanswered: list[str]  # sent but not named in the answer: still pending


@dataclass(frozen=True)
class Split:
    """The batch as a whole was refused (400, 413): send each half on its own."""

    reason: str


@dataclass(frozen=True)
class RejectAlone:
    """A batch of one record refused as a whole: that record is the one at fault.

    ``platform_said``: the refusal is the platform's own (a JSON object). A page that is not
    (a proxy's HTML 400 or 413, a wrong URL) may refuse every record alike: the pusher sets
    such a record aside only once another batch went through.
    """

    reason: str
    platform_said: bool = True


@dataclass(frozen=True)
class RetryLater:
    """Nothing is known to be taken: back off, then send the same records again."""

    reason: str
    retry_after: float | None = None
    auth: bool = False  # 401: loud, since a wrong secret stops every push
    misconfigured: bool = False  # an answer that means the URL or the contract is wrong


Verdict = Acknowledged | Split | RejectAlone | RetryLater


def judge(
    sent: Sequence[str], status: int | None, body: bytes = b"", retry_after: float | None = None, error: str = ""
) -> Verdict:
    """The verdict on one POST of the records ``sent``; ``status`` None means no answer (``error``)."""
    if status is None:
        return RetryLater(f"no answer: {error or 'connection failed'}")
    if 200 <= status < 300:
        return _acknowledgement(sent, body)
    if status in (400, 413):
        reason = f"the platform refused the batch with {status}: {_error_text(body)}"
        return Split(reason) if len(sent) > 1 else RejectAlone(reason, platform_said=_is_json_object(body))
    if status == 401:
        return RetryLater(f"the platform refused the signature (401): {_error_text(body)}", auth=True)
    if status in (429, 503):
        return RetryLater(f"the platform asks to slow down ({status})", retry_after=retry_after)
    if status >= 500:
        return RetryLater(f"the platform failed ({status})", retry_after=retry_after)
    return RetryLater(f"unexpected answer {status}: {_error_text(body)}", misconfigured=True)


def _acknowledgement(sent: Sequence[str], body: bytes) -> Verdict:
    try:
        answer = json.loads(body)
    except ValueError:
        return RetryLater("the platform's answer is not JSON", misconfigured=True)
    if not isinstance(answer, dict) or answer.get("code") != 0:
        return RetryLater("the platform's answer has no code 0", misconfigured=True)
    expected = set(sent)
    done: list[str] = []
    for key in ("accepted", "duplicates"):
        ids = answer.get(key) or []
        if isinstance(ids, list):
            done.extend(i for i in ids if isinstance(i, str) and i in expected)
    rejected: dict[str, str] = {}
    for entry in answer.get("rejected") or []:
        if isinstance(entry, dict) and entry.get("recordId") in expected:
            rejected[entry["recordId"]] = str(entry.get("reason") or "rejected without a reason")
    named = set(done) | set(rejected)
    done = list(dict.fromkeys(i for i in done if i not in rejected))
    return Acknowledged(done, rejected, [i for i in sent if i not in named])


def _is_json_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except ValueError:
        return False


def _error_text(body: bytes) -> str:
    try:
        answer = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace") or "(no body)"
    if isinstance(answer, dict):
        for key in ("error", "message", "reason"):
            if isinstance(answer.get(key), str):
                return str(answer[key])[:200]
    return json.dumps(answer, ensure_ascii=False)[:200]


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return min(float(text), MAX_RETRY_AFTER)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


@dataclass
class Backoff:
    """Capped exponential backoff with jitter, for the pusher as a whole (SPEC R7.2).

    While the platform is down the pusher waits ``initial``, ``2·initial``, … up to ``maximum``
    (each time between half and all of it, so that instances do not retry in step), and never
    less than the platform's Retry-After. One success resets it: records carry no timers of
    their own, so the whole backlog flows again at full speed when the platform is back.
    """

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    failures: int = field(default=0)

    def failure(self, jitter: float, retry_after: float | None = None) -> float:
        """Delay before the next attempt; ``jitter`` is a random number in [0, 1)."""
        ceiling = min(self.maximum, self.initial * self.factor ** min(self.failures, 64))
        self.failures += 1
        delay = ceiling / 2 + jitter * ceiling / 2
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
        return delay

    def success(self) -> int:
        """Reset after an answer; returns how many failures came before it."""
        failures, self.failures = self.failures, 0
        return failures


def halves(items: Sequence[T]) -> tuple[list[T], list[T]]:
    """The two halves of a refused batch (the first the larger)."""
    middle = (len(items) + 1) // 2
    return list(items[:middle]), list(items[middle:])
