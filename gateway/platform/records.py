"""The store's ratings and cases in the central platform's format, and the request signature.

Pure code: facts in, JSON-ready dicts and bytes out. This is the one module that knows
``PLATFORM.md`` (contract v1) field by field; a province that numbers or names things
differently gets one more module like this one, and nothing else changes (SPEC R7.1).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from gateway.rating import RatedItem, applies_to

SHANGHAI = ZoneInfo("Asia/Shanghai")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"

#: PLATFORM.md: one batch holds 1 to 500 records and at most 1 MiB of body.
MAX_BATCH_RECORDS = 500
MAX_BODY_BYTES = 1024 * 1024
MAX_COMMENT_CHARS = 500
MAX_RECORD_ID_CHARS = 64

#: 评价渠道 (pf): GB/T 39046-2020 order 1-7, and the contract's extensions 8 (email) and 9 (other).
PF_CODES: Mapping[str, str] = {
    "web": "1",
    "app": "2",
    "qr": "3",
    "tablet": "4",
    "terminal": "5",
    "voice": "6",
    "sms": "7",
    "email": "8",
    "other": "9",
    "system": "9",
}
PF_NAMES: Mapping[str, str] = {
    "1": "PC端",
    "2": "移动端",
    "3": "二维码",
    "4": "政务大厅平板电脑",
    "5": "自助终端",
    "6": "电话",
    "7": "短信",
    "8": "电子邮件",
    "9": "其他",
}

#: 办件状态 3 = 已办结: a service is rated once it is completed.
PRO_STATUS_COMPLETED = "3"
HOTLINE_TASK_NAME = "12345热线"
NATURAL_PERSON = "1"
EVAL_DETAIL_CODES = ("attitude", "efficiency", "unresolved", "other")

#: Which deadline a case update reports, by the status it enters (SPEC R4.2).
_CASE_DEADLINE = {
    "opened": "contact_due",
    "contacted": "rectify_due",
    "rectifying": "rectify_due",
    "extended": "rectify_due",
    "rectified": "feedback_due",
    "explained": "feedback_due",
    "not_adopted_pending": "feedback_due",
    "not_adopted": "feedback_due",
}


@dataclass(frozen=True)
class EvaluationFacts:
    """What the store holds about one counted rating and its service record (SPEC R1.3, R7.1)."""

    record_id: str
    level: int
    channel: str
    rated_at: datetime
    project_no: str  # the service record's external id: 办件编号, work order or call id
    kind: str  # call | matter
    is_default: bool = False
    is_follow_up: bool = False
    overall: bool = False
    comment: str | None = None
    reasons: str | None = None
    parent_record_id: str | None = None
    invitation_channel: str | None = None  # the invitation's channel, for a default rating (SPEC R3.4)
    completed_at: datetime | None = None
    matter_code: str | None = None
    matter_name: str | None = None
    department_code: str | None = None
    department_name: str | None = None
    area_code: str | None = None
    agent_id: str | None = None
    work_order: str | None = None
    call_id: str | None = None
    linked_id: str | None = None
    applicant_type: str | None = None
    mobile_masked: str | None = None
    mobile_hash: str | None = None
    batch_id: str | None = None
    theme_id: str | None = None
    related: tuple[RatedItem, ...] = ()  # records sharing the batch or theme (SPEC R1.6)


@dataclass(frozen=True)
class CaseFacts:
    """One version of a bad-rating case (差评工单, SPEC R4.1-R4.3) as the platform sees it."""

    case_no: str
    version: int
    status: str
    evaluation_record_id: str
    updated_at: datetime
    deadline: datetime | None = None
    note: str | None = None


def platform_time(moment: datetime) -> str:
    """``2026-11-22 10:15:03``: Asia/Shanghai, the contract's exact format."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime; the platform's times are Asia/Shanghai, attach a zone")
    return moment.astimezone(SHANGHAI).strftime(TIME_FORMAT)


def assess_moment(facts: EvaluationFacts) -> datetime:
    """When the rating was given, never earlier than the service it rates (PLATFORM.md assessTime)."""
    if facts.completed_at is not None and facts.completed_at > facts.rated_at:
        return facts.completed_at
    return facts.rated_at


def pf_code(channel: str, *, is_default: bool = False, invitation_channel: str | None = None) -> str:
    """The platform's channel code (pf) of a rating (SPEC R1.7).

    A default rating (SPEC R3.4) is reported under the channel that invited the citizen, when
    known; otherwise it is 9 (其他), like any channel the table does not name.
    """
    if is_default and invitation_channel in PF_CODES:
        return PF_CODES[invitation_channel]
    return PF_CODES.get(channel, "9")


def eval_detail(reasons: str | None) -> str | None:
    """Bad-rating reasons (SPEC R2.5) as the contract's comma-separated codes; unknown ones are ``other``."""
    if not reasons:
        return None
    codes: list[str] = []
    for reason in reasons.split(","):
        code = reason.strip().lower()
        if not code:
            continue
        code = code if code in EVAL_DETAIL_CODES else "other"
        if code not in codes:
            codes.append(code)
    return ",".join(codes) or None


def covered_projects(facts: EvaluationFacts) -> list[str] | None:
    """Every projectNo the rating covers, for a batch or a theme's overall rating (SPEC R1.6)."""
    theme = facts.theme_id if facts.overall else None
    if not facts.batch_id and not theme:
        return None
    rated = RatedItem(facts.project_no, batch_id=facts.batch_id, theme_id=theme)
    return applies_to(rated, facts.related)


def evaluation_record(facts: EvaluationFacts) -> dict[str, Any]:
    """A rating as a PLATFORM.md evaluation record. Optional fields without a value are left out."""
    record: dict[str, Any] = {
        "recordId": facts.record_id,
        "recordType": "evaluation",
        "projectNo": facts.project_no,
        "taskCode": facts.matter_code,
        "taskName": facts.matter_name or (HOTLINE_TASK_NAME if facts.kind == "call" else None),
        "deptCode": facts.department_code,
        "deptName": facts.department_name,
        "areaCode": facts.area_code,
        "proStatus": PRO_STATUS_COMPLETED,
        "pf": pf_code(facts.channel, is_default=facts.is_default, invitation_channel=facts.invitation_channel),
        "satisfaction": int(facts.level),
        "assessTime": platform_time(assess_moment(facts)),
        "assessNumber": 2 if facts.is_follow_up else 1,
        "parentRecordId": facts.parent_record_id if facts.is_follow_up else None,
        "isDefault": bool(facts.is_default),
        "evalDetail": eval_detail(facts.reasons),
        "writingEvaluation": facts.comment[:MAX_COMMENT_CHARS] if facts.comment else None,
        "evaluatedPerson": {"staffId": facts.agent_id} if facts.agent_id else None,
        "hotline": _hotline(facts),
        "userProp": facts.applicant_type or (NATURAL_PERSON if facts.kind == "call" else None),
        "userPhoneMasked": facts.mobile_masked,
        "userPhoneHash": facts.mobile_hash,
        "appliesTo": covered_projects(facts),
    }
    return {k: v for k, v in record.items() if v is not None or k == "parentRecordId"}


def _hotline(facts: EvaluationFacts) -> dict[str, str] | None:
    """The call's identifiers (SPEC R2.1), for any rating of a hotline call, whatever its channel."""
    if facts.kind != "call":
        return None
    fields = {
        "callId": facts.call_id or facts.project_no,
        "linkedId": facts.linked_id,
        "agentId": facts.agent_id,
        "workOrderNo": facts.work_order,
    }
    return {k: v for k, v in fields.items() if v}


def case_record_id(case_no: str, version: int) -> str:
    """``case-<caseNo>-v<version>``: one record per version of a case (the platform keeps the highest)."""
    return f"case-{case_no}-v{version}"


def case_deadline_field(status: str) -> str | None:
    """Which of a case's deadlines (contact_due, rectify_due, feedback_due) its status reports."""
    return _CASE_DEADLINE.get(status)


def case_record(facts: CaseFacts) -> dict[str, Any]:
    """A bad-rating case update as a PLATFORM.md case record."""
    record: dict[str, Any] = {
        "recordId": case_record_id(facts.case_no, facts.version),
        "recordType": "case",
        "caseNo": facts.case_no,
        "evaluationRecordId": facts.evaluation_record_id,
        "version": int(facts.version),
        "status": facts.status,
        "deadline": platform_time(facts.deadline) if facts.deadline else None,
        "updatedAt": platform_time(facts.updated_at),
        "note": facts.note,
    }
    return {k: v for k, v in record.items() if v is not None}


# -- the request (PLATFORM.md Transport) --------------------------------------------------------


def encode_record(record: Mapping[str, Any]) -> bytes:
    """One record as compact UTF-8 JSON, the unit a batch is assembled from."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()


def batch_body(app_id: str, batch_id: str, encoded: Sequence[bytes]) -> bytes:
    """``{"appId": …, "batchId": …, "records": [...]}`` from records already encoded."""
    head = json.dumps({"appId": app_id, "batchId": batch_id}, ensure_ascii=False, separators=(",", ":"))
    return head[:-1].encode() + b',"records":[' + b",".join(encoded) + b"]}"


def batch_overhead(app_id: str, batch_id: str) -> int:
    return len(batch_body(app_id, batch_id, []))


def records_that_fit(
    sizes: Iterable[int], overhead: int, *, max_records: int = MAX_BATCH_RECORDS, max_bytes: int = MAX_BODY_BYTES
) -> int:
    """How many records, from the first, one body can carry (≤ 500 records, ≤ 1 MiB). At least one."""
    total, count = overhead, 0
    for size in sizes:
        extra = size + (1 if count else 0)  # the comma
        if count >= max_records or (count and total + extra > max_bytes):
            break
        total += extra
        count += 1
    return count


def new_nonce() -> str:
    """32 random hex characters (128 bits): within the contract's 16-64, never repeated in practice."""
    return secrets.token_hex(16)


def signature(secret: str, app_id: str, timestamp_ms: int, nonce: str, body: bytes) -> str:
    """``hex(HMAC-SHA256(secret, appId \\n timestamp \\n nonce \\n hex(SHA-256(body))))`` (PLATFORM.md)."""
    message = "\n".join((app_id, str(timestamp_ms), nonce, hashlib.sha256(body).hexdigest()))
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def signed_headers(app_id: str, secret: str, body: bytes, *, timestamp_ms: int, nonce: str) -> dict[str, str]:
    """The four ``X-HCP-*`` headers of one request; a new nonce and timestamp for every attempt."""
    return {
        "X-HCP-AppId": app_id,
        "X-HCP-Timestamp": str(timestamp_ms),
        "X-HCP-Nonce": nonce,
        "X-HCP-Signature": signature(secret, app_id, timestamp_ms, nonce, body),
    }
