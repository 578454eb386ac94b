"""Schemathesis against the OpenAPI document and a live gateway on loopback (issue 5 acceptance).

Every operation of ``build_openapi()`` (the document served and kept in docs/openapi.json) gets
requests generated from its schema, valid and invalid ones, sent with a token whose role may
use it, to a real ``GatewayApi`` over TCP. Each answer must be no 5xx, a documented status with
a documented content type and a body that matches the documented schema, and invalid requests
must be refused with a 4xx.

Bounded and reproducible: ``max_examples`` per operation and mode, derandomized (the same
cases on every run), no example database; about 10-20 s on 2 cores.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.config._checks import NegativeDataRejectionConfig

from gateway.openapi import build_openapi
from gateway.rating import Level, ServiceKind
from storage.outbox import Outbox
from tests.live_gateway import LiveGateway
from tests.test_operator_api import add_rating

MAX_EXAMPLES = 50

schema = schemathesis.openapi.from_dict(build_openapi())
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
    max_examples=MAX_EXAMPLES,
    deterministic=True,
    database="none",
)
# 413: a batch over 1000 records is refused as too large, which is a refusal too.
schema.config.checks.negative_data_rejection = NegativeDataRejectionConfig(
    expected_statuses=["400", "401", "403", "404", "405", "413", "415", "422"]
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    with LiveGateway(tmp_path_factory.mktemp("schema")) as running:
        store = running.gateway.store
        # Data for the look-ups to find: ratings with and without a phone, one set aside.
        add_rating(store, "1795370491.70", call_id="1795370491.70", agent_id="A1024", mobile="+8613912345678")
        rejected = add_rating(
            store,
            "BJ2026000001",
            kind=ServiceKind.MATTER,
            level=Level.DISSATISFIED,
            rated_at=datetime.now(UTC),
            matter_code="M1",
            department_code="D1",
        )
        Outbox(store).mark_rejected({rejected: "deptCode: not an 18-character code"})
        running.tokens = {role: running.token(role) for role in ("admin", "supervisor")}  # type: ignore[attr-defined]
        yield running


@pytest.fixture
def tokens(live: LiveGateway) -> dict[str, str]:
    return live.tokens  # type: ignore[attr-defined,no-any-return]


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
def test_the_api_keeps_its_documented_contract(
    case: schemathesis.Case, live: LiveGateway, tokens: dict[str, str]
) -> None:
    # Admin may use every route but the call-back views, which only supervisors may (SPEC R5.1, R5.2).
    role = "supervisor" if case.path.endswith("/contact") else "admin"
    case.call_and_validate(base_url=live.base, headers={"Authorization": f"Bearer {tokens[role]}"}, checks=CHECKS)


def test_the_document_served_is_the_one_tested(live: LiveGateway, tmp_path: Path) -> None:
    status, served = live.get("/openapi.json")
    assert status == 200 and served == build_openapi()
