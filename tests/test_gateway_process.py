"""``gateway run`` as a real process on loopback: health, intake API, bad input, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.http_client import http_request

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningGateway:
    process: subprocess.Popen[bytes]
    base: str
    env: dict[str, str]
    log: Path

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        raw: bytes | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        status, _, payload = http_request(
            self.base + path, method, token=token, body=body, raw=raw, content_type=content_type, timeout=10
        )
        return status, json.loads(payload or b"null")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def start_gateway(tmp_path: Path, extra_env: dict[str, str] | None = None) -> RunningGateway:
    port = free_port()
    env = {
        **os.environ,
        "GATEWAY_STORE_DATA_DIR": str(tmp_path / "data"),
        "GATEWAY_HTTP_PORT": str(port),
        "GATEWAY_AGI_PORT": str(free_port()),
        **(extra_env or {}),
    }
    log = tmp_path / "gateway.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run"],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    gateway = RunningGateway(process, f"http://127.0.0.1:{port}", env, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"gateway exited with {process.returncode}:\n{log.read_text()}")
        try:
            if gateway.request("GET", "/health")[0] == 200:
                return gateway
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError(f"gateway did not answer /health within 30 s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    running = start_gateway(tmp_path_factory.mktemp("gateway"))
    yield running
    running.process.send_signal(signal.SIGTERM)
    running.process.wait(timeout=30)


@pytest.fixture(scope="module")
def intake_token(gateway: RunningGateway) -> str:
    result = gateway.cli("token", "create", "--role", "intake", "--name", "crm")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_health_reports_each_component(gateway: RunningGateway) -> None:
    status, body = gateway.request("GET", "/health")
    assert status == 200
    assert body["status"] == "ok" and body["components"]["store"]["status"] == "ok"


def test_openapi_document_is_served_and_equals_the_one_in_docs(gateway: RunningGateway) -> None:
    status, body = gateway.request("GET", "/openapi.json")
    assert status == 200 and body["openapi"].startswith("3.")
    docs = Path(__file__).resolve().parents[1] / "docs" / "openapi.json"
    assert json.loads(docs.read_text(encoding="utf-8")) == body, "regenerate with: gateway openapi > docs/openapi.json"


def test_intake_needs_a_token_with_the_right_role(gateway: RunningGateway) -> None:
    record = {"id": "M-1", "kind": "matter"}
    assert gateway.request("POST", "/v1/service-records", record)[0] == 401
    assert gateway.request("POST", "/v1/service-records", record, token="hcp_wrong")[0] == 401
    operator = gateway.cli("token", "create", "--role", "operator").stdout.strip()
    status, body = gateway.request("POST", "/v1/service-records", record, token=operator)
    assert status == 403 and "role 'operator'" in body["error"]


def test_intake_of_one_record_is_idempotent(gateway: RunningGateway, intake_token: str) -> None:
    record = {"id": "API-1", "kind": "matter", "mobile": "13800138000", "completed_at": "2026-11-20T10:00:00+08:00"}
    assert gateway.request("POST", "/v1/service-records", record, token=intake_token) == (
        201,
        {"id": "API-1", "status": "created", "errors": []},
    )
    assert gateway.request("POST", "/v1/service-records", record, token=intake_token)[1]["status"] == "unchanged"
    status, body = gateway.request("GET", "/v1/service-records/API-1", token=intake_token)
    assert status == 200 and body["mobileMasked"] == "138****8000" and "13800138000" not in json.dumps(body)


def test_batch_reports_each_bad_record_and_keeps_the_good_ones(gateway: RunningGateway, intake_token: str) -> None:
    body = {
        "records": [
            {"id": "B-1", "kind": "matter"},
            {"id": "B-2", "kind": "matter", "completed_at": 20261122},
            {"id": "B-3", "kind": "matter", "favourite": "x"},
            "not an object",
            {"id": "B-4", "kind": "call"},
        ]
    }
    status, answer = gateway.request("POST", "/v1/service-records", body, token=intake_token)
    assert status == 200
    assert answer["counts"] == {"created": 2, "updated": 0, "unchanged": 0, "rejected": 3}
    results = answer["results"]
    assert results[1]["errors"] == [{"field": "completed_at", "message": "must be a string, not int"}]
    assert results[2]["errors"] == [{"field": "favourite", "message": "is not a known field"}]
    assert results[3]["status"] == "rejected" and results[3]["index"] == 3
    assert gateway.request("GET", "/v1/service-records/B-4", token=intake_token)[0] == 200


@pytest.mark.parametrize(
    ("raw", "content_type", "status", "words"),
    [
        (b"{not json", "application/json", 400, "not valid JSON"),
        (b"\xff\xfe", "application/json", 400, "not UTF-8"),
        (b"[1, 2]", "application/json", 422, "must be a service record"),
        (b'{"records": []}', "application/json", 422, "records is empty"),
        (b"id=1", "application/x-www-form-urlencoded", 415, "application/json"),
        (b"x" * (1024 * 1024 + 1), "application/json", 413, "larger than"),
        (b"[" * 200_000 + b"]" * 200_000, "application/json", 400, "too deeply"),
    ],
)
def test_malformed_bodies_get_clear_errors(
    gateway: RunningGateway, intake_token: str, raw: bytes, content_type: str, status: int, words: str
) -> None:
    got, body = gateway.request("POST", "/v1/service-records", raw=raw, token=intake_token, content_type=content_type)
    assert got == status and words in body["error"]
    assert gateway.request("GET", "/health")[0] == 200


def test_unknown_routes_and_methods(gateway: RunningGateway) -> None:
    assert gateway.request("GET", "/nope")[0] == 404
    assert gateway.request("DELETE", "/health")[0] == 405


def test_sigterm_stops_cleanly_and_keeps_accepted_records(tmp_path: Path) -> None:
    running = start_gateway(tmp_path)
    token = running.cli("token", "create", "--role", "intake").stdout.strip()
    records = {"records": [{"id": f"T-{i}", "kind": "matter"} for i in range(500)]}
    assert running.request("POST", "/v1/service-records", records, token=token)[1]["counts"]["created"] == 500
    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(timeout=30) == 0
    assert "event=gateway.stopped" in running.log.read_text()
    lookup = running.cli("ratings", "--service-id", "T-499", "--json")
    assert lookup.returncode == 0 and json.loads(lookup.stdout) == []
    again = start_gateway(tmp_path)
    try:
        assert again.request("GET", "/v1/service-records/T-499", token=token)[0] == 200
    finally:
        again.process.send_signal(signal.SIGTERM)
        again.process.wait(timeout=30)


@pytest.mark.parametrize(("busy", "log_format"), [("AGI", "text"), ("HTTP", "json")])
def test_a_port_in_use_stops_the_gateway_with_one_error_and_a_failure_status(
    tmp_path: Path, busy: str, log_format: str
) -> None:
    """It ran on half-started, without the listeners after the busy one, and exited 0 on SIGTERM:
    systemd's Restart=on-failure never acted."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            **os.environ,
            "GATEWAY_STORE_DATA_DIR": str(tmp_path / "data"),
            "GATEWAY_HTTP_PORT": str(free_port()),
            "GATEWAY_AGI_PORT": str(free_port()),
            f"GATEWAY_{busy}_PORT": str(port),
            "GATEWAY_LOG_FORMAT": log_format,
        }
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "run"], env=env, capture_output=True, text=True, timeout=30, check=False
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower() and "port" in line]
    assert len(errors) == 1, result.stderr
    if log_format == "json":
        entry = json.loads(errors[0])
        assert (entry["level"], entry["event"], entry["service"]) == ("error", "gateway.cannot_listen", busy.lower())
        assert (entry["address"], entry["port"], entry["error"]) == ("127.0.0.1", str(port), "EADDRINUSE")
    else:
        assert f"event=gateway.cannot_listen service=agi address=127.0.0.1 port={port} error=EADDRINUSE" in errors[0]
    assert "gateway.stopped" in result.stderr.splitlines()[-1]


def test_sigterm_during_calls_ends_them_recorded_and_keeps_the_key(tmp_path: Path) -> None:
    """A deploy mid-call: the call that pressed its key keeps its rating (R2.4); the one still in the
    menu past the grace period is ended and recorded not rated, ready for an SMS (R2.3, R3.1)."""
    running = start_gateway(tmp_path, {"GATEWAY_AGI_SHUTDOWN_GRACE": "1s"})
    port = int(running.env["GATEWAY_AGI_PORT"])

    def call(call_id: str) -> tuple[socket.socket, Any]:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        env = (
            f"agi_network: yes\nagi_network_script: rating?call_id={call_id}\nagi_request: agi://x/rating\n"
            f"agi_uniqueid: {call_id}\nagi_callerid: 13800138000\n\n"
        )
        sock.sendall(env.encode())
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"GET OPTION")
        return sock, reader

    keyed, keyed_reader = call("1795370900.1")
    in_menu, in_menu_reader = call("1795370900.2")
    keyed.sendall(b"200 result=49 endpos=4000\n")  # key 1, 非常满意
    assert keyed_reader.readline() == b'SET VARIABLE HCP_RATING "5"\n'
    started = time.monotonic()
    running.process.send_signal(signal.SIGTERM)
    assert in_menu_reader.readline() == b""  # ended by the gateway after the grace period
    assert running.process.wait(timeout=30) == 0
    assert time.monotonic() - started < 20
    for sock, reader in ((keyed, keyed_reader), (in_menu, in_menu_reader)):
        reader.close()
        sock.close()
    rated = json.loads(running.cli("ratings", "--call-id", "1795370900.1", "--json").stdout)
    assert [(r["level"], r["channel"]) for r in rated] == [(5, "voice")]
    log = running.log.read_text()
    assert "event=agi.call_cut call_id=1795370900.2" in log and "event=store.call_after_stop" not in log
    again = start_gateway(tmp_path)
    try:
        token = running.cli("token", "create", "--role", "operator").stdout.strip()
        status, record = again.request("GET", "/v1/service-records/1795370900.2", token=token)
        assert status == 200 and record["unratedReason"] == "error"
    finally:
        again.process.send_signal(signal.SIGTERM)
        again.process.wait(timeout=30)


def rate_by_phone(port: int, call_id: str, key: str, caller: str = "13800138000") -> list[bytes]:
    """Play Asterisk's side of one short call over real TCP: the caller presses ``key``."""
    env = (
        f"agi_network: yes\nagi_network_script: rating?call_id={call_id}&linked_id={call_id}0&agent=A1024"
        f"&work_order=WO-{call_id}\nagi_request: agi://127.0.0.1:{port}/rating\nagi_channel: PJSIP/caller-1\n"
        f"agi_uniqueid: {call_id}\nagi_callerid: {caller}\n\n"
    )
    commands = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(env.encode())
        reader = sock.makefile("rb")
        answers = [
            f"200 result={ord(key)} endpos=4000\n".encode(),
            b"200 result=1\n",
            b"200 result=0 endpos=23000\n",
        ]
        for answer in answers:
            commands.append(reader.readline())
            sock.sendall(answer)
        assert reader.readline() == b""  # the gateway closes: the dialplan goes on
        reader.close()
    return commands


def test_operators_find_a_voice_rating_by_call_work_order_and_agent(gateway: RunningGateway) -> None:
    """Issue 3 §6 and SPEC R5.1: look-ups by API and CLI, phone masked, never in the logs."""
    port = int(gateway.env["GATEWAY_AGI_PORT"])
    commands = rate_by_phone(port, "1795370491.70", "4", caller="13912345678")
    assert commands[0].startswith(b"GET OPTION hcp/hcp-rating-menu")  # the dialplan answered already
    assert commands[1] == b'SET VARIABLE HCP_RATING "2"\n'
    operator = gateway.cli("token", "create", "--role", "operator").stdout.strip()
    for query in (
        "call_id=1795370491.70",
        "work_order=WO-1795370491.70",
        "agent=A1024&from=2026-01-01",
        "linked_id=1795370491.700",
    ):
        status, body = gateway.request("GET", f"/v1/ratings?{query}", token=operator)
        assert status == 200, body
        found = [r for r in body["ratings"] if r["service"]["callId"] == "1795370491.70"]
        assert len(found) == 1
        assert found[0]["level"] == 2 and found[0]["levelName"] == "不满意" and found[0]["rawInput"] == "4"
        assert found[0]["channel"] == "voice" and found[0]["service"]["mobileMasked"] == "139****5678"
    assert gateway.request("GET", "/v1/ratings?call_id=x&colour=red", token=operator)[0] == 400
    assert gateway.request("GET", "/v1/ratings", token=operator)[0] == 400
    cli = gateway.cli("ratings", "--work-order", "WO-1795370491.70", "--json")
    assert cli.returncode == 0, cli.stderr
    rows = json.loads(cli.stdout)
    assert [(r["level"], r["levelName"], r["channel"], r["rawInput"]) for r in rows] == [(2, "不满意", "voice", "4")]
    text = gateway.cli("ratings", "--call-id", "1795370491.70").stdout
    assert "不满意" in text and "139****5678" in text and "13912345678" not in text
    assert "13912345678" not in gateway.log.read_text()
