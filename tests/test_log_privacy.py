"""No phone number, name, ID number or e-mail address reaches the logs, in any path (SPEC R5.1).

Issue 5's acceptance test. A real ``gateway run`` (log level debug, the pusher on, the strict
test platform as another process) is driven through every path with distinctive personal data;
then ALL that was logged is searched for that data in clear:

- the gateway process's stderr (its Python logging at DEBUG, and Twisted's own log events,
  which ``gateway run`` forwards to the same handler, access log included);
- in this process: Python logging at DEBUG (the CLI commands run in-process), every Twisted
  log event, and what the CLI wrote to stderr (cron mails it; it is a log too).

A path is one entry of :data:`PATHS`: a name and a function that drives it. Add a channel
(SMS, e-mail) by adding an entry; the checks are the same for all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from twisted.logger import formatEvent, globalLogPublisher

from gateway import cli
from gateway.config import load_config
from gateway.testing.asterisk import CallResult, place_call
from gateway.testing.reactor import run_on_reactor
from gateway.testing.smsc import Smsc
from storage.store import ROLES, Store
from tests.http_client import http_request
from tests.test_gateway_process import free_port

pytestmark = pytest.mark.slow

# -- the citizen's data, distinctive enough that any appearance is a leak -------------------------

PHONE = "13987654321"
NAME = "欧阳测试娜"
ID_CARD = "11010519491231002X"
EMAIL = "priv.citizen.7731@example.org"
MASKED = "139****4321"

SECRETS = sorted(
    {
        PHONE,
        "+86" + PHONE,
        "86" + PHONE,
        urllib.parse.quote("+86" + PHONE),
        "139 8765 4321",
        NAME,
        urllib.parse.quote(NAME),
        json.dumps(NAME)[1:-1],  # \u6b27…, as JSON in ASCII shows it
        repr(NAME.encode())[2:-1],  # \xe6\xac…, as the repr() of its UTF-8 bytes shows it
        ID_CARD,
        ID_CARD.lower(),
        EMAIL,
        urllib.parse.quote(EMAIL),
    }
)


def leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


def test_the_search_finds_each_form_of_the_data() -> None:
    """The net has no holes where it matters: each form the data may take is caught."""
    assert leaks(f"event=x caller={PHONE}") == [PHONE]
    assert urllib.parse.quote("+86" + PHONE) in leaks(f"mobile=%2B86{PHONE}")
    assert leaks(json.dumps({"name": NAME})) == [json.dumps(NAME)[1:-1]]
    assert leaks(f"body={NAME.encode()!r}") == [repr(NAME.encode())[2:-1]]
    assert leaks(f"id={ID_CARD.lower()}") == [ID_CARD.lower()]
    assert leaks(f"caller={MASKED} email=p***@example.org") == []


# -- the running gateway ------------------------------------------------------------------------


@dataclass
class Harness:
    """A ``gateway run`` process and the strict platform, and what the tests did to them."""

    tmp: Path
    env: dict[str, str]
    base: str
    agi_port: int
    log: Path
    gateway: subprocess.Popen[bytes]
    platform: subprocess.Popen[bytes]
    platform_log: Path
    smsc: Smsc
    tokens: dict[str, str] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)

    def request(
        self,
        method: str,
        path: str,
        *,
        role: str | None = None,
        body: Any = None,
        raw: bytes | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        status, _, payload = http_request(
            self.base + path,
            method,
            token=self.tokens[role] if role else None,
            body=body,
            raw=raw,
            content_type=content_type,
            ensure_ascii=False,
        )
        try:
            return status, json.loads(payload)
        except ValueError:
            return status, payload

    def cli(self, *args: str) -> int:
        """A ``gateway`` command in this process (its logging captured here)."""
        previous = {key: os.environ.get(key) for key in self.env if key.startswith("GATEWAY_")}
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("GATEWAY_")})
        try:
            return cli.main(list(args))
        finally:
            for key, value in previous.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def call(self, query: str, script: str, **env: str) -> CallResult:
        """One call from the simulated Asterisk to the gateway's FastAGI port, the citizen's number as caller."""
        agi_env = {"agi_callerid": PHONE, "agi_calleridname": NAME, "agi_dnid": PHONE, "agi_rdnis": PHONE, **env}

        async def scenario(reactor: Any) -> CallResult:
            return await place_call(
                reactor, "127.0.0.1", self.agi_port, query, script, agi_env=agi_env, time_scale=0.02, timeout=20
            )

        result: CallResult = run_on_reactor(scenario, timeout=30)
        return result

    def ensure_voice_rating(self) -> None:
        """The rated call the look-ups and the push need (done once, whichever path runs first)."""
        if "voice" in self.done:
            return
        result = self.call(
            f"rating?call_id=PRIV-CALL-1&linked_id=PRIV-CALL-1.0&agent=A1024&work_order=WO-PRIV&caller={PHONE}",
            "w1 d1",
        )
        assert result.variables.get("HCP_RATING") == "5", result.transcript_text
        self.done.add("voice")

    def today(self) -> str:
        return datetime.now(ZoneInfo("Asia/Shanghai")).date().isoformat()


def _start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    tmp = tmp_path_factory.mktemp("privacy")
    platform_port = free_port()
    platform_log = tmp / "platform.log"
    platform = _start(
        [sys.executable, "-m", "gateway.testing.platform", "--port", str(platform_port), "--secret", "priv-secret"],
        dict(os.environ),
        platform_log,
    )
    smsc = Smsc().start()  # the SMS channel is on too, against the project's SMSC peer
    http_port, agi_port = free_port(), free_port()
    env = {
        **os.environ,
        "GATEWAY_STORE_DATA_DIR": str(tmp / "data"),
        "GATEWAY_HTTP_PORT": str(http_port),
        "GATEWAY_AGI_PORT": str(agi_port),
        "GATEWAY_LOG_LEVEL": "debug",
        "GATEWAY_PLATFORM_ENABLED": "true",
        "GATEWAY_PRIVACY_PHONE_HASH_KEY": "c2hhcmVkLXBob25lLWhhc2gta2V5LWZvci10ZXN0cyE=",  # the shared key
        "GATEWAY_PLATFORM_URL": f"http://127.0.0.1:{platform_port}",
        "GATEWAY_PLATFORM_APP_ID": "gw-test",
        "GATEWAY_PLATFORM_SECRET": "priv-secret",
        "GATEWAY_PLATFORM_TIMEOUT": "2s",
        "GATEWAY_SMPP_ENABLED": "true",
        "GATEWAY_SMPP_PORT": str(smsc.port),
        "GATEWAY_SMPP_SYSTEM_ID": "gateway",
        "GATEWAY_SMPP_PASSWORD": "secret",
        "GATEWAY_SMS_INVITE_DELAY": "0s",
        "GATEWAY_SMS_QUIET_HOURS": "",
    }
    log = tmp / "gateway.log"
    gateway = _start([sys.executable, "-m", "gateway", "run"], env, log)
    harness = Harness(tmp, env, f"http://127.0.0.1:{http_port}", agi_port, log, gateway, platform, platform_log, smsc)
    try:
        deadline = time.monotonic() + 30
        while True:
            if gateway.poll() is not None:
                raise AssertionError(f"gateway exited with {gateway.returncode}:\n{log.read_text()}")
            with contextlib.suppress(OSError):
                if harness.request("GET", "/health")[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"gateway did not answer /health within 30 s:\n{log.read_text()}")
            time.sleep(0.1)
        store = Store.from_config(load_config(None, environ=env))
        harness.tokens = {role: store.create_token(role, f"privacy-{role}") for role in ROLES}
        store.engine.dispose()
        yield harness
    finally:
        for process in (gateway, platform):
            process.send_signal(signal.SIGTERM)
        for process in (gateway, platform):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        smsc.stop()


# -- what this process logs ---------------------------------------------------------------------


@dataclass
class Captured:
    twisted: list[str] = field(default_factory=list)


@pytest.fixture
def captured(caplog: pytest.LogCaptureFixture) -> Iterator[Captured]:
    caplog.set_level(logging.DEBUG)
    seen = Captured()

    def observe(event: dict[str, Any]) -> None:
        text = formatEvent(event) or ""
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        seen.twisted.append(text)

    globalLogPublisher.addObserver(observe)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(observe)


def in_process_logs(caplog: pytest.LogCaptureFixture, captured: Captured, capsys: pytest.CaptureFixture[str]) -> str:
    formatter = logging.Formatter("%(levelname)s %(name)s %(message)s")
    records = []
    for record in caplog.records:
        records.append(formatter.format(record))  # with the traceback, if any
    output = capsys.readouterr()  # the CLI's stderr, and its stdout (which shows the number masked only)
    return "\n".join([*records, *captured.twisted, output.err, output.out])


# -- the paths ----------------------------------------------------------------------------------


def drive_http_intake(h: Harness) -> None:
    """Intake, good and bad: unknown fields holding a name and an ID number, broken JSON, wrong types."""
    good = {
        "id": "PRIV-M-1",
        "kind": "matter",
        "mobile": PHONE,
        "email": EMAIL,
        "completed_at": "2026-11-20T10:00:00+08:00",
        "matter_code": "11110000000000000X4000117004000",
    }
    assert h.request("POST", "/v1/service-records", role="intake", body=good)[0] in (200, 201)
    status, body = h.request(
        "POST",
        "/v1/service-records",
        role="intake",
        body={"id": "PRIV-M-2", "kind": "matter", "mobile": PHONE + "x", "citizen_name": NAME, "id_card": ID_CARD},
    )
    assert status == 422 and {e["field"] for e in body["errors"]} >= {"mobile", "citizen_name", "id_card"}
    batch = {
        "records": [
            {"id": "PRIV-M-3", "kind": "matter", "email": f"{NAME} <{EMAIL}", "mobile": ID_CARD},
            {"id": PHONE, "kind": "matter", "mobile": "+86" + PHONE, "completed_at": NAME},
            {"id": "PRIV-M-4", "kind": "matter", "mobile": 13987654321},
            NAME,
        ]
    }
    assert h.request("POST", "/v1/service-records", role="intake", body=batch)[0] == 200
    broken = f'{{"id": "PRIV-M-5", "mobile": "{PHONE}", "name": "{NAME}", "id_card": "{ID_CARD}'.encode()
    assert h.request("POST", "/v1/service-records", role="intake", raw=broken)[0] == 400
    assert h.request("POST", "/v1/service-records", role="intake", raw=f"{NAME}{PHONE}".encode("gb18030"))[0] == 400
    form = urllib.parse.urlencode({"mobile": PHONE, "name": NAME, "email": EMAIL}).encode()
    assert (
        h.request("POST", "/v1/service-records", role="intake", raw=form, content_type="x-www-form-urlencoded")[0]
        == 415
    )
    too_big = json.dumps({"id": "PRIV-BIG", "kind": "matter", "mobile": PHONE, "pad": PHONE * 100_000}).encode()
    assert h.request("POST", "/v1/service-records", role="intake", raw=too_big)[0] == 413
    assert h.request("POST", "/v1/service-records", body=good)[0] == 401  # no token
    assert h.request("GET", f"/v1/service-records/{PHONE}", role="intake")[0] == 404  # a phone as an id
    assert h.request("GET", f"/v1/service-records/{urllib.parse.quote(NAME)}?mobile={PHONE}", role="intake")[0] == 404


def drive_fastagi(h: Harness) -> None:
    """Calls with the citizen's number and name as caller id (and in the URL): rated, hung up, an attempt.

    Identifiers (call id, agent, work order) are ids, never personal data: they are logged.
    """
    h.ensure_voice_rating()
    unrated = h.call(f"rating?call_id=PRIV-CALL-2&agent=A1024&caller=%2B86{PHONE}", "w1 h")
    assert unrated.variables.get("HCP_RATING") in (None, "")
    again = h.call("rating?call_id=PRIV-CALL-1&agent=A1024", "w1 d4")  # kept as an attempt (SPEC R1.4)
    assert again.variables.get("HCP_RATING") == "2"


def drive_operator_look_ups(h: Harness) -> None:
    """Operators' look-ups (masked), the supervisor's call-back view (unmasked, audited), admin views."""
    h.ensure_voice_rating()
    status, body = h.request("GET", "/v1/ratings?call_id=PRIV-CALL-1", role="operator")
    assert status == 200 and body["ratings"][0]["service"]["mobileMasked"] == MASKED
    record_id = body["ratings"][0]["recordId"]
    status, contact = h.request("GET", f"/v1/ratings/{record_id}/contact", role="supervisor")
    assert status == 200 and contact["mobile"] == "+86" + PHONE  # the number did go through this path
    assert h.request("GET", "/v1/service-records/PRIV-CALL-1/contact", role="supervisor")[1]["mobile"] == "+86" + PHONE
    assert h.request("GET", f"/v1/ratings/{record_id}/contact", role="operator")[0] == 403
    assert h.request("GET", f"/v1/ratings?agent={urllib.parse.quote(NAME)}&mobile={PHONE}", role="operator")[0] == 400
    assert h.request("GET", f"/v1/ratings?call_id={PHONE}", role="operator")[0] == 200
    assert h.request("GET", f"/v1/ratings?agent=A1024&cursor={PHONE}", role="operator")[0] == 400
    assert h.request("GET", "/v1/service-records/PRIV-M-1", role="operator")[0] in (200, 404)
    assert h.request("GET", "/v1/outbox/rejected", role="admin")[0] == 200
    assert h.request("GET", f"/v1/reconciliation?date={h.today()}", role="supervisor")[0] == 200
    assert h.request("GET", "/metrics")[0] == 200
    assert h.request("GET", "/health")[0] == 200


def drive_push(h: Harness) -> None:
    """The pusher delivers the voice ratings to the strict platform (masked phone and hash only)."""
    h.ensure_voice_rating()
    deadline = time.monotonic() + 20
    while True:
        status, report = h.request("GET", f"/v1/reconciliation?date={h.today()}", role="admin")
        assert status == 200, report
        if report["totals"]["pushed"] >= 1 and not report["pending"]:
            break
        assert time.monotonic() < deadline, f"not pushed within 20 s: {report}"
        time.sleep(0.1)
    assert report["platform"]["status"] == "ok" and report["totals"]["platform"] == report["totals"]["pushed"]


def drive_csv_import(h: Harness) -> None:
    """``gateway import``: good rows, bad rows holding the data in wrong places (a column shifted),
    unknown columns holding a name and an ID number, a broken row. The id column holds ids."""
    path = h.tmp / "records.csv"
    path.write_text(
        "id,kind,completed_at,mobile,email,citizen_name,id_card\n"
        f"PRIV-CSV-1,matter,2026-11-20T10:00:00+08:00,{PHONE},{EMAIL},{NAME},{ID_CARD}\n"
        f"PRIV-CSV-2,matter,{NAME},{PHONE}x,{NAME} {EMAIL},{NAME},{ID_CARD}\n"
        f"PRIV-CSV-3,matter,,{ID_CARD},,{NAME},{ID_CARD}\n"
        f'PRIV-CSV-4,"unterminated {NAME} {PHONE}\n',
        encoding="utf-8",
    )
    assert h.cli("import", str(path), "--quiet") == cli.EXIT_SOME_REJECTED


def drive_cli_ratings(h: Harness) -> None:
    """``gateway ratings`` and ``gateway reconcile`` (the output shows the number masked only)."""
    h.ensure_voice_rating()
    assert h.cli("ratings", "--call-id", "PRIV-CALL-1") == 0
    assert h.cli("ratings", "--work-order", "WO-PRIV", "--json") == 0
    assert h.cli("ratings", "--call-id", PHONE) == 0
    assert h.cli("reconcile", "--date", h.today(), "--no-platform") in (0, cli.EXIT_DIFFERENCES)


def drive_sms(h: Harness) -> None:
    """An invitation to the citizen's number, its receipt, replies with a name and an ID number in
    the comment, an unclear reply, an opt-out, a reply from the number in another form."""
    completed = datetime.now(ZoneInfo("Asia/Shanghai")).isoformat()
    record = {"id": "PRIV-SMS-1", "kind": "matter", "mobile": PHONE, "completed_at": completed, "matter_name": NAME}
    assert h.request("POST", "/v1/service-records", role="intake", body=record)[0] in (200, 201)
    smsc = h.smsc
    invitations = smsc.wait_for(lambda: [s for s in smsc.accepted() if s.destination == PHONE], timeout=15)
    source = invitations[0].source  # type: ignore[index]
    before = len(smsc.accepted())
    smsc.send_mo("86" + PHONE, source, f"2 我是{NAME}，身份证{ID_CARD}，电话{PHONE}")
    smsc.wait_for(lambda: len(smsc.accepted()) > before, timeout=10)  # the thanks
    smsc.send_mo("+86" + PHONE, source, f"{NAME}{ID_CARD}")
    smsc.send_mo(PHONE, "10690012345", "ＴＤ")
    smsc.wait_for(lambda: all(d.status == 0 for d in smsc.deliveries()) and len(smsc.deliveries()) >= 3, timeout=10)


@dataclass(frozen=True)
class PrivacyPath:
    name: str
    drive: Callable[[Harness], None]
    #: What this path must have logged at least (proves the logs were on, at DEBUG, for it).
    expect_in_gateway_log: str | None = None


PATHS = [
    PrivacyPath("http-intake", drive_http_intake, "event=http.request"),
    PrivacyPath("fastagi", drive_fastagi, "event=agi."),
    PrivacyPath("operator-look-ups", drive_operator_look_ups, "route=/v1/ratings/{record_id}/contact"),
    PrivacyPath("push", drive_push, "event=platform.pushed"),
    PrivacyPath("csv-import", drive_csv_import),
    PrivacyPath("cli-ratings", drive_cli_ratings),
    PrivacyPath("sms", drive_sms, "event=sms.reply"),
]


@pytest.mark.parametrize("path", PATHS, ids=lambda path: path.name)
def test_no_personal_data_reaches_the_logs(
    path: PrivacyPath,
    harness: Harness,
    captured: Captured,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    start = harness.log.stat().st_size
    path.drive(harness)
    time.sleep(0.3)  # what the gateway logs just after answering (a push, a call's end)
    gateway_log = harness.log.read_bytes()[start:].decode("utf-8", "replace")
    here = in_process_logs(caplog, captured, capsys)
    assert leaks(gateway_log) == [], f"{path.name}: personal data in the gateway's log:\n{gateway_log}"
    assert leaks(here) == [], f"{path.name}: personal data in this process's logs:\n{here}"
    if path.expect_in_gateway_log:
        assert path.expect_in_gateway_log in harness.log.read_text(encoding="utf-8", errors="replace")


def test_the_whole_gateway_log_is_clean_and_was_written_at_debug(harness: Harness) -> None:
    """After every path: the whole log (also lines written between tests), and the platform's."""
    text = harness.log.read_text(encoding="utf-8", errors="replace")
    assert "level=DEBUG" in text and "event=http.access" in text
    assert leaks(text) == []
    assert leaks(harness.platform_log.read_text(encoding="utf-8", errors="replace")) == []
