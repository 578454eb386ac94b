"""Service intake: what other systems tell us about services that happened (SPEC R1.3).

Pure validation shared by the HTTP API and the CSV import: a mapping of fields in, a
:class:`ServiceRecordInput` or a list of :class:`FieldError` out. Personal data is checked
here but encrypted by the store.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.privacy import InvalidPhoneNumber, normalise_phone
from gateway.rating import ApplicantType, ServiceKind
from gateway.workdays import SHANGHAI

#: Columns every import file names (the contract of ``gateway import``), in order.
CSV_COLUMNS = (
    "id",
    "kind",
    "completed_at",
    "mobile",
    "email",
    "matter_code",
    "matter_name",
    "department_code",
    "department_name",
    "agent_id",
    "work_order",
    "batch_id",
    "theme_id",
)
#: Further optional fields, accepted by the API and as extra CSV columns.
EXTRA_FIELDS = ("call_id", "linked_id", "queue", "applicant_type", "area_code")
ALL_FIELDS = CSV_COLUMNS + EXTRA_FIELDS

#: Longest value of each field, in characters: the store's columns (storage/schema.py).
MAX_FIELD_LENGTH = {
    "id": 64,
    "matter_code": 64,
    "matter_name": 200,
    "department_code": 64,
    "department_name": 200,
    "agent_id": 64,
    "work_order": 64,
    "batch_id": 64,
    "theme_id": 64,
    "call_id": 64,
    "linked_id": 64,
    "queue": 64,
    "area_code": 12,
    "email": 254,
}
_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:\-/]+")
_EMAIL_PATTERN = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
#: Completion times further ahead than this are taken for a wrong clock or a wrong zone.
MAX_CLOCK_SKEW = timedelta(hours=1)


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@dataclass(frozen=True)
class ServiceRecordInput:
    """A service record as reported (SPEC R1.3); ``mobile`` is in E.164 form."""

    id: str
    kind: ServiceKind
    completed_at: datetime | None = None
    mobile: str | None = None
    email: str | None = None
    matter_code: str | None = None
    matter_name: str | None = None
    department_code: str | None = None
    department_name: str | None = None
    agent_id: str | None = None
    work_order: str | None = None
    batch_id: str | None = None
    theme_id: str | None = None
    call_id: str | None = None
    linked_id: str | None = None
    queue: str | None = None
    applicant_type: ApplicantType | None = None
    area_code: str | None = None


INPUT_FIELDS = tuple(f.name for f in fields(ServiceRecordInput))


def parse_timestamp(text: str) -> datetime:
    """ISO 8601 with or without an offset; without one it is Beijing time (Asia/Shanghai)."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 time such as 2026-11-22T10:15:03+08:00") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=SHANGHAI)
    try:
        moment.astimezone(UTC)  # stored as UTC: year 1 in Beijing ("no date" in .NET) is not
    except OverflowError:
        raise ValueError(f"{text!r} is not a time the store can hold") from None
    return moment


def parse_service_record(
    data: Mapping[str, Any], *, now: datetime, strict_types: bool = True, default_country_code: str = "86"
) -> ServiceRecordInput | list[FieldError]:
    """Validate one reported service record.

    ``strict_types``: the JSON API wants strings (or null) and refuses unknown fields; the
    CSV import has only strings and ignores extra columns (reported once by the importer).
    Empty strings mean "not known".
    """
    errors: list[FieldError] = []
    values: dict[str, Any] = {}
    if strict_types:
        errors.extend(FieldError(name, "is not a known field") for name in data if name not in ALL_FIELDS)
    for name in ALL_FIELDS:
        raw = data.get(name)
        if raw is None:
            continue
        if not isinstance(raw, str):
            errors.append(FieldError(name, f"must be a string, not {type(raw).__name__}"))
            continue
        text = raw.strip()
        if not text:
            continue
        if "\ufffd" in text or any("\ud800" <= ch <= "\udfff" for ch in text):  # GBK bytes, or \ud800 in JSON
            errors.append(FieldError(name, "is not valid UTF-8 text (is the file GBK-encoded?)"))
            continue
        if any(ord(ch) < 32 for ch in text):
            errors.append(FieldError(name, "contains control characters"))
            continue
        limit = MAX_FIELD_LENGTH.get(name)
        if limit and len(text) > limit:
            errors.append(FieldError(name, f"is longer than {limit} characters"))
            continue
        values[name] = text

    reported = {error.field for error in errors}
    record_id = values.get("id")
    if record_id is None:
        if "id" not in reported:
            errors.append(FieldError("id", "is required"))
    elif not _ID_PATTERN.fullmatch(record_id):
        errors.append(FieldError("id", "may hold only letters, digits and _ . : - /"))
    kind = values.get("kind")
    if kind is None:
        if "kind" not in reported:
            errors.append(FieldError("kind", "is required: call or matter"))
    else:
        try:
            values["kind"] = ServiceKind(kind.lower())
        except ValueError:
            # Not the value itself: a shifted CSV column puts a phone or a name here (SPEC R5.1).
            errors.append(FieldError("kind", "is neither call nor matter"))
    if "completed_at" in values:
        try:
            completed = parse_timestamp(values["completed_at"])
        except ValueError:
            # Not the value itself: a shifted CSV column puts a name or a phone here (SPEC R5.1).
            errors.append(FieldError("completed_at", "is not an ISO 8601 time such as 2026-11-22T10:15:03+08:00"))
        else:
            if completed > now + MAX_CLOCK_SKEW:
                errors.append(FieldError("completed_at", "is in the future; check the clock and the time zone"))
            values["completed_at"] = completed
    if "mobile" in values:
        try:
            values["mobile"] = normalise_phone(values["mobile"], default_country_code)
        except InvalidPhoneNumber as error:
            errors.append(FieldError("mobile", str(error)))
    if "email" in values and not _EMAIL_PATTERN.fullmatch(values["email"]):
        errors.append(FieldError("email", "is not an e-mail address"))
    if "applicant_type" in values:
        try:
            values["applicant_type"] = ApplicantType(values["applicant_type"])
        except ValueError:
            codes = ", ".join(t.value for t in ApplicantType)
            errors.append(FieldError("applicant_type", f"must be one of the userProp codes {codes}"))
    if errors:
        return errors
    return ServiceRecordInput(**values)
