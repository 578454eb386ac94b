"""Service intake validation (SPEC R1.3), table-driven."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from gateway.intake import ServiceRecordInput, parse_service_record
from gateway.rating import ApplicantType, ServiceKind

NOW = datetime(2026, 11, 23, 6, 0, tzinfo=UTC)
BEIJING = timezone(timedelta(hours=8))


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"id": "M-1", "kind": "matter"}, {"kind": ServiceKind.MATTER}),
        ({"id": "C-1", "kind": "CALL"}, {"kind": ServiceKind.CALL}),
        (
            {"id": "M-2", "kind": "matter", "completed_at": "2026-11-22 10:15:03"},
            {"completed_at": datetime(2026, 11, 22, 10, 15, 3, tzinfo=BEIJING)},
        ),
        (
            {"id": "M-3", "kind": "matter", "completed_at": "2026-11-22T02:15:03Z"},
            {"completed_at": datetime(2026, 11, 22, 2, 15, 3, tzinfo=UTC)},
        ),
        ({"id": "M-4", "kind": "matter", "mobile": "138 0013 8000"}, {"mobile": "+8613800138000"}),
        ({"id": "M-5", "kind": "matter", "mobile": "+86-138-0013-8000"}, {"mobile": "+8613800138000"}),
        ({"id": "M-6", "kind": "matter", "mobile": "１３８００１３８０００"}, {"mobile": "+8613800138000"}),
        ({"id": "M-7", "kind": "matter", "mobile": "", "email": ""}, {"mobile": None, "email": None}),
        ({"id": "M-8", "kind": "matter", "applicant_type": "2"}, {"applicant_type": ApplicantType.ENTERPRISE}),
        ({"id": "M-9", "kind": "matter", "matter_name": " 不动产登记 "}, {"matter_name": "不动产登记"}),
    ],
)
def test_valid_records(data: dict[str, str], expected: dict[str, object]) -> None:
    result = parse_service_record(data, now=NOW)
    assert isinstance(result, ServiceRecordInput), result
    for name, value in expected.items():
        assert getattr(result, name) == value


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({"kind": "matter"}, "id", "required"),
        ({"id": "M 1", "kind": "matter"}, "id", "letters"),
        ({"id": "x" * 65, "kind": "matter"}, "id", "longer than 64"),
        ({"id": "M-1"}, "kind", "required"),
        ({"id": "M-1", "kind": "visit"}, "kind", "neither call nor matter"),
        ({"id": "M-1", "kind": "matter", "completed_at": "yesterday"}, "completed_at", "ISO 8601"),
        ({"id": "M-1", "kind": "matter", "completed_at": "2026-11-25T00:00:00+08:00"}, "completed_at", "future"),
        ({"id": "M-1", "kind": "matter", "mobile": "call me"}, "mobile", "only digits"),
        ({"id": "M-1", "kind": "matter", "mobile": "1380013800"}, "mobile", "11 digits"),
        ({"id": "M-1", "kind": "matter", "email": "not-an-address"}, "email", "e-mail"),
        ({"id": "M-1", "kind": "matter", "applicant_type": "7"}, "applicant_type", "userProp"),
        ({"id": "M-1", "kind": "matter", "matter_name": "a\x00b"}, "matter_name", "control"),
        ({"id": "M-1", "kind": "matter", "matter_name": "\udcb2\udcbb"}, "matter_name", "UTF-8"),
        ({"id": "M-1", "kind": "matter", "email": "a\ud800@x.cn"}, "email", "UTF-8"),  # a lone surrogate in JSON
        ({"id": "M-1", "kind": "matter", "completed_at": "0001-01-01T00:00:00"}, "completed_at", "ISO 8601"),
        ({"id": "M-1", "kind": "matter", "colour": "red"}, "colour", "not a known field"),
        ({"id": 17, "kind": "matter"}, "id", "must be a string"),
        ({"id": "M-1", "kind": ["matter"]}, "kind", "must be a string"),
    ],
)
def test_invalid_records_name_the_field_and_the_reason(data: dict[str, object], field: str, words: str) -> None:
    result = parse_service_record(data, now=NOW)
    assert isinstance(result, list)
    messages = {e.field: e.message for e in result}
    assert field in messages, result
    assert words in messages[field]


def test_csv_mode_tolerates_extra_columns() -> None:
    assert isinstance(
        parse_service_record({"id": "M", "kind": "matter", "x": "1"}, now=NOW, strict_types=False), ServiceRecordInput
    )


def test_a_shifted_column_does_not_echo_personal_data_in_the_error() -> None:
    """SPEC R5.1: a phone number in the kind column is named as wrong, not repeated."""
    result = parse_service_record({"id": "M-1", "kind": "13912345678"}, now=NOW)
    assert isinstance(result, list)
    assert all("13912345678" not in str(error) for error in result)
