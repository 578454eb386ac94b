"""The mapping to the platform's format, the signature and the answer policy: pure, table-driven.

Every record built here is also checked by the strict test platform's own validator, which is
written from PLATFORM.md and not from the mapping (SPEC R7.1).
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway.platform.policy import (
    Acknowledged,
    Backoff,
    RejectAlone,
    RetryLater,
    Split,
    halves,
    judge,
    parse_retry_after,
)
from gateway.platform.records import (
    CaseFacts,
    EvaluationFacts,
    batch_body,
    batch_overhead,
    case_record,
    encode_record,
    eval_detail,
    evaluation_record,
    new_nonce,
    pf_code,
    platform_time,
    records_that_fit,
    signature,
    signed_headers,
)
from gateway.rating import RatedItem
from gateway.testing.platform import Invalid, validate_case, validate_evaluation

# 2026-11-22 10:15:03 in Asia/Shanghai.
RATED = datetime(2026, 11, 22, 2, 15, 3, tzinfo=UTC)
NOW = datetime(2026, 11, 23, tzinfo=UTC)
PHONE_HASH = "a" * 64

VOICE = EvaluationFacts(
    record_id="ev-01JD3Q0000000000000000000A",
    level=2,
    channel="voice",
    rated_at=RATED,
    project_no="1795370491.70",
    kind="call",
    reasons="attitude,unresolved",
    completed_at=RATED - timedelta(seconds=20),
    agent_id="A1024",
    work_order="GD2026112200123",
    call_id="1795370491.70",
    linked_id="1795370491.60",
    mobile_masked="139****5678",
    mobile_hash=PHONE_HASH,
)
MATTER = EvaluationFacts(
    record_id="ev-01JD3Q0000000000000000000B",
    level=5,
    channel="sms",
    rated_at=RATED,
    project_no="HL20261122000123",
    kind="matter",
    completed_at=RATED - timedelta(days=1),
    matter_code="11110000000000000X4000117004000",
    matter_name="户口迁移",
    department_code="11620100013889063X",
    department_name="兰州市公安局",
    area_code="620100",
    agent_id="W07",
    applicant_type="2",
    mobile_masked="138****5678",
    mobile_hash=PHONE_HASH,
)


def test_a_voice_rating_is_mapped_field_by_field() -> None:
    """SPEC R7.1: the link to the call (ids, agent, work order) and the level code travel."""
    assert evaluation_record(VOICE) == {
        "recordId": "ev-01JD3Q0000000000000000000A",
        "recordType": "evaluation",
        "projectNo": "1795370491.70",
        "taskName": "12345热线",
        "proStatus": "3",
        "pf": "6",
        "satisfaction": 2,
        "assessTime": "2026-11-22 10:15:03",
        "assessNumber": 1,
        "parentRecordId": None,
        "isDefault": False,
        "evalDetail": "attitude,unresolved",
        "evaluatedPerson": {"staffId": "A1024"},
        "hotline": {
            "callId": "1795370491.70",
            "linkedId": "1795370491.60",
            "agentId": "A1024",
            "workOrderNo": "GD2026112200123",
        },
        "userProp": "1",
        "userPhoneMasked": "139****5678",
        "userPhoneHash": PHONE_HASH,
    }


def test_a_matter_rated_by_sms_carries_matter_department_and_applicant() -> None:
    record = evaluation_record(MATTER)
    assert record["taskCode"] == "11110000000000000X4000117004000" and record["taskName"] == "户口迁移"
    assert (record["deptCode"], record["deptName"], record["areaCode"]) == (
        "11620100013889063X",
        "兰州市公安局",
        "620100",
    )
    assert (record["pf"], record["satisfaction"], record["userProp"]) == ("7", 5, "2")
    assert "hotline" not in record and "appliesTo" not in record


@pytest.mark.parametrize(
    ("channel", "is_default", "invited_by", "pf"),
    [
        ("web", False, None, "1"),
        ("app", False, None, "2"),
        ("qr", False, None, "3"),
        ("tablet", False, None, "4"),
        ("terminal", False, None, "5"),
        ("voice", False, None, "6"),
        ("sms", False, None, "7"),
        ("email", False, None, "8"),
        ("other", False, None, "9"),
        ("system", True, "sms", "7"),  # SPEC R3.4: the default keeps the invitation's channel
        ("system", True, "email", "8"),
        ("system", True, "voice", "6"),
        ("system", True, None, "9"),
        ("carrier-pigeon", False, None, "9"),
    ],
)
def test_channel_codes_follow_the_contracts_table(
    channel: str, is_default: bool, invited_by: str | None, pf: str
) -> None:
    assert pf_code(channel, is_default=is_default, invitation_channel=invited_by) == pf


def test_assess_time_is_shanghai_time_and_never_before_the_service() -> None:
    assert platform_time(datetime(2026, 12, 31, 16, 0, 1, tzinfo=UTC)) == "2027-01-01 00:00:01"
    early = replace(VOICE, completed_at=RATED + timedelta(minutes=3))  # the rater's clock ran behind
    assert evaluation_record(early)["assessTime"] == "2026-11-22 10:18:03"
    with pytest.raises(ValueError, match="naive"):
        platform_time(datetime(2026, 11, 22, 10, 0))


def test_a_follow_up_is_the_second_rating_and_names_the_first() -> None:
    """SPEC R4.5: assessNumber 2 with parentRecordId."""
    record = evaluation_record(replace(VOICE, is_follow_up=True, parent_record_id="ev-FIRST"))
    assert (record["assessNumber"], record["parentRecordId"]) == (2, "ev-FIRST")


def test_a_default_rating_is_flagged() -> None:
    record = evaluation_record(replace(MATTER, channel="system", is_default=True, level=3, invitation_channel="sms"))
    assert (record["isDefault"], record["satisfaction"], record["pf"]) == (True, 3, "7")


def test_a_batch_rating_applies_to_every_item_of_the_batch() -> None:
    """SPEC R1.6: one rating, every projectNo of the batch."""
    related = (RatedItem("B-1", batch_id="b"), RatedItem("B-3", batch_id="b"), RatedItem("B-2", batch_id="b"))
    record = evaluation_record(replace(MATTER, project_no="B-2", batch_id="b", related=related))
    assert record["appliesTo"] == ["B-1", "B-2", "B-3"]


def test_only_an_overall_theme_rating_applies_to_the_whole_theme() -> None:
    related = (RatedItem("T-1", theme_id="t"), RatedItem("T-2", theme_id="t"))
    overall = evaluation_record(replace(MATTER, project_no="T-1", theme_id="t", overall=True, related=related))
    separate = evaluation_record(replace(MATTER, project_no="T-1", theme_id="t", related=related))
    assert overall["appliesTo"] == ["T-1", "T-2"] and "appliesTo" not in separate


def test_comment_is_cut_to_500_characters_and_reasons_to_known_codes() -> None:
    record = evaluation_record(replace(VOICE, comment="慢" * 600))
    assert len(record["writingEvaluation"]) == 500
    assert eval_detail("attitude, Efficiency,noise,attitude") == "attitude,efficiency,other"
    assert eval_detail("") is None and eval_detail(None) is None


def test_a_case_version_is_its_own_record() -> None:
    facts = CaseFacts(
        case_no="CP2026112200017",
        version=3,
        status="rectifying",
        evaluation_record_id="ev-1",
        updated_at=datetime(2026, 11, 23, 1, 2, 11, tzinfo=UTC),
        deadline=datetime(2026, 11, 27, 9, 30, tzinfo=UTC),
        note="已联系",
    )
    assert case_record(facts) == {
        "recordId": "case-CP2026112200017-v3",
        "recordType": "case",
        "caseNo": "CP2026112200017",
        "evaluationRecordId": "ev-1",
        "version": 3,
        "status": "rectifying",
        "deadline": "2026-11-27 17:30:00",
        "updatedAt": "2026-11-23 09:02:11",
        "note": "已联系",
    }
    validate_case(case_record(facts))


@pytest.mark.parametrize(
    "facts",
    [
        VOICE,
        MATTER,
        replace(VOICE, is_follow_up=True, parent_record_id="ev-FIRST", comment="还是没解决"),
        replace(MATTER, channel="system", is_default=True, invitation_channel="email"),
        replace(MATTER, batch_id="b", related=(RatedItem("X", batch_id="b"),)),
        replace(VOICE, agent_id=None, linked_id=None, work_order=None, mobile_hash=None, mobile_masked=None),
    ],
)
def test_every_mapped_record_passes_the_strict_platform(facts: EvaluationFacts) -> None:
    validate_evaluation(json.loads(encode_record(evaluation_record(facts))), NOW)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"satisfaction": "4"}, "satisfaction: must be an integer"),
        ({"satisfaction": 6}, "satisfaction: must be between 1 and 5"),
        ({"pf": 6}, "pf:"),
        ({"assessTime": "2026-11-22T10:15:03"}, "assessTime: must be written"),
        ({"assessTime": "2026-02-30 10:15:03"}, "assessTime: is not a valid"),
        ({"assessTime": "2027-01-01 00:00:00"}, "assessTime: is in the future"),
        ({"assessNumber": 2}, "parentRecordId: is required"),
        ({"deptCode": "DEPT-1"}, "deptCode: must be an 18-character"),
        ({"userPhoneMasked": "13912345678"}, "userPhoneMasked:"),
        ({"userPhoneHash": "ABC"}, "userPhoneHash:"),
        ({"writingEvaluation": "x" * 501}, "writingEvaluation: longer than 500"),
        ({"evalDetail": "rude"}, "evalDetail:"),
        ({"hotline": None}, "taskCode: is required"),
        ({"appliesTo": ["other"]}, "appliesTo: must include"),
        ({"isDefault": "no"}, "isDefault:"),
        ({"colour": "red"}, "colour: is not a field"),
        ({"userProp": "7"}, "userProp:"),
    ],
)
def test_the_strict_platform_names_what_is_wrong_with_a_record(change: dict[str, Any], reason: str) -> None:
    record = {**evaluation_record(VOICE), **change}
    with pytest.raises(Invalid, match="^" + reason.replace("(", r"\(")):
        validate_evaluation(record, NOW)


def test_signature_is_hmac_sha256_of_app_timestamp_nonce_and_body_hash() -> None:
    """PLATFORM.md; the expected value was checked with `openssl dgst -sha256 -hmac`."""
    body = b'{"appId":"gw-hotline-01"}'
    nonce = "00112233445566778899aabbccddeeff"
    expected = "756164ce642f34eb93c971cad4972928eac70a9f8d7396cf9b68eba153913a42"
    assert signature("s3cret", "gw-hotline-01", 1795370400000, nonce, body) == expected
    assert signed_headers("gw-hotline-01", "s3cret", body, timestamp_ms=1795370400000, nonce=nonce) == {
        "X-HCP-AppId": "gw-hotline-01",
        "X-HCP-Timestamp": "1795370400000",
        "X-HCP-Nonce": nonce,
        "X-HCP-Signature": expected,
    }


def test_nonces_are_hex_of_allowed_length_and_do_not_repeat() -> None:
    nonces = {new_nonce() for _ in range(10_000)}
    assert len(nonces) == 10_000
    assert all(16 <= len(n) <= 64 and int(n, 16) >= 0 for n in nonces)


def test_a_batch_body_is_the_contracts_json() -> None:
    encoded = [encode_record(evaluation_record(VOICE)), encode_record(evaluation_record(MATTER))]
    body = json.loads(batch_body("gw-1", "b-1", encoded))
    assert body == {"appId": "gw-1", "batchId": "b-1", "records": [evaluation_record(VOICE), evaluation_record(MATTER)]}
    assert "户口迁移".encode() in batch_body("gw-1", "b-1", encoded)  # UTF-8, not \\u escapes


@pytest.mark.parametrize(
    ("sizes", "max_bytes", "fit"),
    [
        ([100] * 600, 1024 * 1024, 500),  # at most 500 records
        ([300_000] * 5, 1024 * 1024, 3),  # at most 1 MiB
        ([2_000_000], 1024 * 1024, 1),  # one record always goes (and the platform says 413)
        ([10, 10, 10], 45 + 10 + 1 + 10, 2),  # overhead, a record, a comma, a record
    ],
)
def test_a_body_holds_at_most_500_records_and_1_mib(sizes: list[int], max_bytes: int, fit: int) -> None:
    assert records_that_fit(sizes, batch_overhead("gw-1", "b-1"), max_bytes=max_bytes) == fit


# -- the answer policy (SPEC R7.2) ----------------------------------------------------------------

SENT = ["r1", "r2", "r3", "r4"]


def ack(**answer: Any) -> bytes:
    return json.dumps({"code": 0, **answer}).encode()


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (
            200,
            ack(accepted=["r1"], duplicates=["r2"], rejected=[{"recordId": "r3", "reason": "pf: bad"}]),
            Acknowledged(["r1", "r2"], {"r3": "pf: bad"}, ["r4"]),
        ),
        (200, ack(accepted=["r1", "r2", "r3", "r4", "stranger"]), Acknowledged(SENT, {}, [])),
        (200, b"<html>ok</html>", RetryLater("the platform's answer is not JSON", misconfigured=True)),
        (200, json.dumps({"code": 1}).encode(), RetryLater("the platform's answer has no code 0", misconfigured=True)),
        (
            400,
            b'{"error": "records must be a list"}',
            Split("the platform refused the batch with 400: records must be a list"),
        ),
        (413, b"", Split("the platform refused the batch with 413: (no body)")),
        (401, b'{"error": "X-HCP-Nonce was already used"}', RetryLater("x", auth=True)),
        (429, b"", RetryLater("x", retry_after=7.0)),
        (503, b"", RetryLater("x", retry_after=7.0)),
        (500, b"", RetryLater("x", retry_after=7.0)),
        (404, b"", RetryLater("x", misconfigured=True)),
        (None, b"", RetryLater("x")),
    ],
)
def test_each_answer_has_one_verdict(status: int | None, body: bytes, expected: Any) -> None:
    verdict = judge(SENT, status, body, retry_after=7.0, error="ConnectionRefusedError")
    assert type(verdict) is type(expected)
    if isinstance(expected, RetryLater):
        assert isinstance(verdict, RetryLater)
        assert (verdict.auth, verdict.misconfigured) == (expected.auth, expected.misconfigured)
        assert verdict.retry_after == (7.0 if status in (429, 503, 500) else None)
        if expected.reason != "x":
            assert verdict.reason == expected.reason
    else:
        assert verdict == expected


def test_a_single_record_refused_as_a_batch_is_the_one_at_fault() -> None:
    assert judge(["r1"], 400, b'{"error": "bad"}') == RejectAlone("the platform refused the batch with 400: bad")
    assert halves(["a", "b", "c"]) == (["a", "b"], ["c"])


def test_a_record_both_acknowledged_and_rejected_counts_as_rejected() -> None:
    verdict = judge(["r1"], 200, ack(accepted=["r1"], rejected=[{"recordId": "r1", "reason": "no"}]))
    assert verdict == Acknowledged([], {"r1": "no"}, [])


def test_backoff_doubles_up_to_its_cap_with_jitter_and_resets_on_success() -> None:
    backoff = Backoff(initial=0.5, maximum=30)
    assert [backoff.failure(jitter=1.0) for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert backoff.success() == 9
    assert backoff.failure(jitter=0.0) == 0.25  # half of the ceiling, at least
    assert Backoff().failure(jitter=0.0, retry_after=12) == 12  # never sooner than Retry-After
    assert Backoff().failure(jitter=0.0, retry_after=10_000) == 300  # and never stalled for ever


def test_retry_after_is_read_as_seconds_or_as_an_http_date() -> None:
    now = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
    assert parse_retry_after("120") == 120
    assert parse_retry_after("Sun, 22 Nov 2026 08:00:30 GMT", now) == 30
    assert parse_retry_after("Sun, 22 Nov 2026 07:00:00 GMT", now) == 0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    assert parse_retry_after("99999") == 300
