"""A strict central platform for tests and benchmarks: ``PLATFORM.md`` (contract v1), enforced.

Written from the contract, not from the gateway's mapping, so that it catches the gateway's
mistakes: it checks the signature, the timestamp (±300 s), nonce replay (10 minutes), the
content type, the batch (1-500 records, ≤ 1 MiB) and every field of every record, rejects
invalid records one by one with a reason, answers repeats as duplicates, keeps the highest
version of each case, and answers ``/reconciliation``.

It also misbehaves on demand (``faults``): an error status (500, 503 or 429 with Retry-After,
401, 400, 413), a slow answer (for the gateway's timeout), or a connection dropped after the
batch was taken, so the gateway must send it again and sees duplicates; and it can go down
and come back. It logs every recordId received per request, and whether the answer reached
the wire, so a test can assert that nothing is sent again once acknowledged.

In-process: :func:`listen` on a reactor. Standalone::

    python -m gateway.testing.platform --port 8099 --app-id gw-test --secret s3cret

with control endpoints under ``/_control/`` (``faults``, ``down``, ``log``, ``summary``, ``reset``).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import re
import sys
import weakref
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from twisted.internet.interfaces import IListeningPort, IReactorTCP, IReactorTime
from twisted.web import resource, server

if TYPE_CHECKING:
    from storage.store import Store

SHANGHAI = ZoneInfo("Asia/Shanghai")
MAX_BODY = 1024 * 1024
MAX_RECORDS = 500
CLOCK_SKEW_MS = 300_000
NONCE_MEMORY = 600.0

PF = {"1", "2", "3", "4", "5", "6", "7", "8", "9"}
USER_PROP = {"1", "2", "3", "4", "5", "6", "9"}
EVAL_DETAIL = {"attitude", "efficiency", "unresolved", "other"}
CASE_STATUS = {
    "opened",
    "contacted",
    "rectifying",
    "extended",
    "rectified",
    "explained",
    "not_adopted_pending",
    "not_adopted",
    "feedback_sent",
    "closed",
}
_TIME = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")
_USCC = re.compile(r"[0-9A-HJ-NPQRTUWXY]{2}\d{6}[0-9A-HJ-NPQRTUWXY]{10}")
_AREA = re.compile(r"\d{6}(\d{6})?")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NONCE = re.compile(r"[0-9a-fA-F]{16,64}")
_MASKED = re.compile(r"[0-9]*\*+[0-9]*")
_ID = re.compile(r"[^\s\x00-\x1f\x7f]{1,64}")

EVALUATION_FIELDS = {
    "recordId",
    "recordType",
    "projectNo",
    "taskCode",
    "taskName",
    "deptCode",
    "deptName",
    "areaCode",
    "proStatus",
    "pf",
    "satisfaction",
    "assessTime",
    "assessNumber",
    "parentRecordId",
    "isDefault",
    "evalDetail",
    "writingEvaluation",
    "evaluatedPerson",
    "hotline",
    "userProp",
    "userPhoneMasked",
    "userPhoneHash",
    "appliesTo",
}
CASE_FIELDS = {
    "recordId",
    "recordType",
    "caseNo",
    "evaluationRecordId",
    "version",
    "status",
    "deadline",
    "updatedAt",
    "note",
}


class Invalid(Exception):
    """A record the platform refuses; the message is the reason it answers."""


def _text(record: Mapping[str, Any], name: str, *, required: bool = False, max_len: int = 200) -> str | None:
    value = record.get(name)
    if value is None:
        if required:
            raise Invalid(f"{name}: is required")
        return None
    if not isinstance(value, str):
        raise Invalid(f"{name}: must be a string, not {type(value).__name__}")
    if required and not value.strip():
        raise Invalid(f"{name}: must not be empty")
    if len(value) > max_len:
        raise Invalid(f"{name}: longer than {max_len} characters")
    return value


def _time(record: Mapping[str, Any], name: str, *, required: bool = False) -> datetime | None:
    value = _text(record, name, required=required, max_len=19)
    if value is None:
        return None
    if not _TIME.fullmatch(value):
        raise Invalid(f"{name}: must be written YYYY-MM-DD HH:MM:SS")
    try:
        return datetime.strptime(value, "%Y-%m-%d %H:%M:%S").replace(tzinfo=SHANGHAI)
    except ValueError:
        raise Invalid(f"{name}: is not a valid date and time") from None


def _match(record: Mapping[str, Any], name: str, pattern: re.Pattern[str], what: str) -> None:
    value = _text(record, name, max_len=100)
    if value is not None and not pattern.fullmatch(value):
        raise Invalid(f"{name}: must be {what}")


def _integer(record: Mapping[str, Any], name: str, allowed: range) -> int:
    value = record.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise Invalid(f"{name}: must be an integer")
    if value not in allowed:
        raise Invalid(f"{name}: must be between {allowed.start} and {allowed.stop - 1}")
    return value


def _unknown(record: Mapping[str, Any], known: set[str]) -> None:
    extra = sorted(set(record) - known)
    if extra:
        raise Invalid(f"{extra[0]}: is not a field of this record type")


def validate_evaluation(record: Mapping[str, Any], now: datetime) -> None:
    """Every field of an evaluation record, as PLATFORM.md defines it; raises :class:`Invalid`."""
    _unknown(record, EVALUATION_FIELDS)
    project = _text(record, "projectNo", required=True, max_len=64)
    _text(record, "taskCode", max_len=64)
    if record.get("taskCode") is None and record.get("hotline") is None:
        raise Invalid("taskCode: is required for a record that is not a hotline call")
    _text(record, "taskName", required=True, max_len=200)
    _match(record, "deptCode", _USCC, "an 18-character unified social credit code")
    _text(record, "deptName", max_len=200)
    _match(record, "areaCode", _AREA, "a 6- or 12-digit administrative division code")
    if record.get("proStatus") != "3":
        raise Invalid('proStatus: must be "3" (已办结)')
    if record.get("pf") not in PF:
        raise Invalid('pf: must be a channel code "1" to "9"')
    _integer(record, "satisfaction", range(1, 6))
    assessed = _time(record, "assessTime", required=True)
    if assessed is not None and assessed > now + timedelta(seconds=300):
        raise Invalid("assessTime: is in the future")
    number = _integer(record, "assessNumber", range(1, 3))
    parent = _text(record, "parentRecordId", max_len=64)
    if number == 2 and not parent:
        raise Invalid("parentRecordId: is required for a follow-up (assessNumber 2)")
    if number == 1 and parent is not None:
        raise Invalid("parentRecordId: must be null for a first rating")
    if not isinstance(record.get("isDefault"), bool):
        raise Invalid("isDefault: must be true or false")
    detail = _text(record, "evalDetail", max_len=100)
    if detail is not None and not set(detail.split(",")) <= EVAL_DETAIL:
        raise Invalid("evalDetail: must be comma-separated codes: attitude, efficiency, unresolved, other")
    _text(record, "writingEvaluation", max_len=500)
    person = record.get("evaluatedPerson")
    if person is not None:
        if not isinstance(person, dict):
            raise Invalid("evaluatedPerson: must be an object")
        _unknown(person, {"staffId", "name"})
        _text(person, "staffId", required=True, max_len=64)
        _text(person, "name", max_len=50)
    hotline = record.get("hotline")
    if hotline is not None:
        if not isinstance(hotline, dict):
            raise Invalid("hotline: must be an object")
        _unknown(hotline, {"callId", "linkedId", "agentId", "workOrderNo"})
        _text(hotline, "callId", required=True, max_len=64)
        for name in ("linkedId", "agentId", "workOrderNo"):
            _text(hotline, name, max_len=64)
    prop = record.get("userProp")
    if prop is not None and prop not in USER_PROP:
        raise Invalid("userProp: must be one of 1, 2, 3, 4, 5, 6, 9")
    _match(record, "userPhoneMasked", _MASKED, "a masked number such as 138****5678")
    _match(record, "userPhoneHash", _HEX64, "64 lowercase hex characters")
    covered = record.get("appliesTo")
    if covered is not None:
        if not isinstance(covered, list) or not covered:
            raise Invalid("appliesTo: must be a non-empty list of projectNo")
        if not all(isinstance(p, str) and 0 < len(p) <= 64 for p in covered):
            raise Invalid("appliesTo: every item must be a projectNo string")
        if project not in covered:
            raise Invalid("appliesTo: must include the record's own projectNo")


def validate_case(record: Mapping[str, Any]) -> None:
    """Every field of a case record; the recordId names the case and its version."""
    _unknown(record, CASE_FIELDS)
    case_no = _text(record, "caseNo", required=True, max_len=32)
    _text(record, "evaluationRecordId", required=True, max_len=64)
    version = _integer(record, "version", range(1, 1_000_000))
    if record.get("recordId") != f"case-{case_no}-v{version}":
        raise Invalid("recordId: must be case-<caseNo>-v<version>")
    if record.get("status") not in CASE_STATUS:
        raise Invalid("status: is not a case status")
    _time(record, "deadline")
    _time(record, "updatedAt", required=True)
    _text(record, "note", max_len=2000)


@dataclass
class Fault:
    """One misbehaviour, for the next ``count`` batches."""

    kind: str  # status | delay | drop | down (for ``seconds``) | ok (no fault: lets ``count`` batches through)
    count: int = 1
    status: int = 500
    retry_after: str | None = None
    seconds: float = 0.0


@dataclass
class Received:
    """One request's recordIds and what became of them (the test's evidence)."""

    number: int
    record_ids: list[str]
    status: int
    batch_id: str = ""
    delivered: bool = True
    accepted: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "n": self.number,
            "batchId": self.batch_id,
            "recordIds": self.record_ids,
            "status": self.status,
            "delivered": self.delivered,
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
        }


class CentralPlatform:
    """The platform's books and rules; :class:`PlatformResource` puts them on HTTP."""

    def __init__(self, app_id: str, secret: str, clock: IReactorTime) -> None:
        self.app_id = app_id
        self.secret = secret
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}  # recordId → the accepted record
        self.cases: dict[str, dict[str, Any]] = {}  # caseNo → the highest version seen
        self.rejected: dict[str, tuple[str, str]] = {}  # recordId → (content hash, reason)
        self.rejected_unchanged = 0  # a record sent again unchanged after a rejection (must stay 0)
        self.nonces: dict[str, float] = {}
        self.log: list[Received] = []
        self.faults: list[Fault] = []
        self.auth_failures: list[str] = []

    # -- checks --------------------------------------------------------------------------------

    def authenticate(self, headers: Mapping[str, str], body: bytes) -> str | None:
        """None when the request is signed as the contract says, else why it is refused (401)."""
        app_id = headers.get("x-hcp-appid", "")
        timestamp = headers.get("x-hcp-timestamp", "")
        nonce = headers.get("x-hcp-nonce", "")
        given = headers.get("x-hcp-signature", "")
        if app_id != self.app_id:
            return "unknown X-HCP-AppId"
        if not timestamp.isdigit():
            return "X-HCP-Timestamp must be Unix time in milliseconds"
        now = self.clock.seconds()
        if abs(now * 1000 - int(timestamp)) > CLOCK_SKEW_MS:
            return "X-HCP-Timestamp is more than 300 s away from the platform's clock"
        if not _NONCE.fullmatch(nonce):
            return "X-HCP-Nonce must be 16 to 64 hex characters"
        message = "\n".join((app_id, timestamp, nonce, hashlib.sha256(body).hexdigest()))
        expected = hmac.new(self.secret.encode(), message.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, given):
            return "X-HCP-Signature does not match"
        for seen, at in list(self.nonces.items()):
            if now - at > NONCE_MEMORY:
                del self.nonces[seen]
        if nonce in self.nonces:
            return "X-HCP-Nonce was already used"
        self.nonces[nonce] = now
        return None

    def parse_batch(self, headers: Mapping[str, str], body: bytes) -> tuple[int, dict[str, Any], str, list[Any]]:
        """(status, error answer, batchId, records): status 0 when the batch itself is well formed."""
        content_type = headers.get("content-type", "").replace(" ", "").lower()
        if content_type not in ("application/json", "application/json;charset=utf-8"):
            return 415, {"code": 415, "error": "Content-Type must be application/json; charset=utf-8"}, "", []
        try:
            batch = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return 400, {"code": 400, "error": "the body is not UTF-8 JSON"}, "", []
        if not isinstance(batch, dict):
            return 400, {"code": 400, "error": "the body must be an object"}, "", []
        if batch.get("appId") != headers.get("x-hcp-appid"):
            return 400, {"code": 400, "error": "appId differs from X-HCP-AppId"}, "", []
        if not isinstance(batch.get("batchId"), str) or not batch["batchId"]:
            return 400, {"code": 400, "error": "batchId is required"}, "", []
        records = batch.get("records")
        if not isinstance(records, list) or not 1 <= len(records) <= MAX_RECORDS:
            return 400, {"code": 400, "error": "records must be a list of 1 to 500 records"}, batch["batchId"], []
        for index, record in enumerate(records):
            if not isinstance(record, dict) or not isinstance(record.get("recordId"), str):
                return 400, {"code": 400, "error": f"records[{index}] has no recordId"}, batch["batchId"], []
        return 0, {}, batch["batchId"], records

    def take(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Validate, dedup and keep the records; the 200 answer."""
        accepted: list[str] = []
        duplicates: list[str] = []
        rejected: list[dict[str, str]] = []
        now = datetime.fromtimestamp(self.clock.seconds(), SHANGHAI)
        for record in records:
            record_id = record["recordId"]
            if record_id in self.records:
                duplicates.append(record_id)
                continue
            digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
            try:
                if not _ID.fullmatch(record_id):
                    raise Invalid("recordId: must be 1 to 64 characters without spaces")
                if record.get("recordType") == "evaluation":
                    validate_evaluation(record, now)
                elif record.get("recordType") == "case":
                    validate_case(record)
                else:
                    raise Invalid("recordType: must be evaluation or case")
            except Invalid as error:
                previous = self.rejected.get(record_id)
                if previous is not None and previous[0] == digest:
                    self.rejected_unchanged += 1
                self.rejected[record_id] = (digest, str(error))
                rejected.append({"recordId": record_id, "reason": str(error)})
                continue
            self.records[record_id] = record
            self.rejected.pop(record_id, None)
            accepted.append(record_id)
            if record["recordType"] == "case":
                known = self.cases.get(record["caseNo"])
                if known is None or known["version"] < record["version"]:
                    self.cases[record["caseNo"]] = record  # an older version is acknowledged and ignored
        return {"code": 0, "accepted": accepted, "duplicates": duplicates, "rejected": rejected}

    def reconciliation(self, day: str) -> dict[str, Any]:
        """Records held with that assessTime date, per channel (pf) and level (PLATFORM.md)."""
        counts: dict[str, dict[str, int]] = {}
        total = 0
        for record in self.records.values():
            if record["recordType"] != "evaluation" or not record["assessTime"].startswith(day):
                continue
            levels = counts.setdefault(record["pf"], {})
            level = str(record["satisfaction"])
            levels[level] = levels.get(level, 0) + 1
            total += 1
        return {"date": day, "counts": counts, "total": total}

    # -- evidence ------------------------------------------------------------------------------

    def next_fault(self) -> Fault | None:
        if not self.faults:
            return None
        fault = self.faults[0]
        fault.count -= 1
        if fault.count <= 0:
            self.faults.pop(0)
        return fault

    def acknowledgements(self) -> set[tuple[str, str]]:
        """(batchId, recordId) of every acknowledgement that reached the wire."""
        return {
            (entry.batch_id, record_id)
            for entry in self.log
            if entry.delivered and entry.status == 200
            for record_id in entry.accepted + entry.duplicates
        }

    def summary(self) -> dict[str, Any]:
        """What a test asserts on: how often each record arrived and was acknowledged."""
        received: Counter[str] = Counter()
        acknowledged: Counter[str] = Counter()
        for entry in self.log:
            received.update(entry.record_ids)
            if entry.delivered and entry.status == 200:
                acknowledged.update(entry.accepted + entry.duplicates)
        return {
            "held": len(self.records),
            "requests": len(self.log),
            "received": sum(received.values()),
            "receivedMoreThanOnce": sorted(r for r, n in received.items() if n > 1),
            "acknowledgedMoreThanOnce": sorted(r for r, n in acknowledged.items() if n > 1),
            "rejected": {r: reason for r, (_, reason) in self.rejected.items()},
            "rejectedUnchanged": self.rejected_unchanged,
            "authFailures": len(self.auth_failures),
        }


def _headers(request: server.Request) -> dict[str, str]:
    return {
        name.decode("latin-1").lower(): values[-1].decode("latin-1")
        for name, values in request.requestHeaders.getAllRawHeaders()
    }


def _json(request: server.Request, status: int, answer: Any, extra: Mapping[str, str] | None = None) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    for name, value in (extra or {}).items():
        request.setHeader(name.encode(), value.encode())
    return json.dumps(answer, ensure_ascii=False).encode()


class PlatformResource(resource.Resource):
    """The platform's HTTP side: the contract's two endpoints and the test controls."""

    isLeaf = True

    def __init__(self, platform: CentralPlatform, server_control: PlatformServer | None = None) -> None:
        super().__init__()
        self.platform = platform
        self.control = server_control

    def render(self, request: server.Request) -> bytes | int:
        path = (request.path or b"").decode("latin-1")
        method = request.method
        body = request.content.read() if request.content else b""
        if path.endswith("/evaluations/batch") and method == b"POST":
            return self._batch(request, body)
        if path.endswith("/reconciliation") and method == b"GET":
            return self._reconciliation(request)
        if "/_control/" in path:
            return self._control(request, path.rsplit("/_control/", 1)[1], body)
        return _json(request, 404, {"code": 404, "error": "no such endpoint"})

    def _batch(self, request: server.Request, body: bytes) -> bytes | int:
        platform = self.platform
        headers = _headers(request)
        if len(body) > MAX_BODY:
            platform.log.append(Received(len(platform.log) + 1, [], 413))
            return _json(request, 413, {"code": 413, "error": "the body is larger than 1 MiB"})
        refused = platform.authenticate(headers, body)
        if refused:
            platform.auth_failures.append(refused)
            platform.log.append(Received(len(platform.log) + 1, [], 401))
            return _json(request, 401, {"code": 401, "error": refused})
        status, error, batch_id, records = platform.parse_batch(headers, body)
        entry = Received(len(platform.log) + 1, [r["recordId"] for r in records], status or 200, batch_id=batch_id)
        platform.log.append(entry)
        if status:
            return _json(request, status, error)
        fault = platform.next_fault()
        if fault is not None and fault.kind == "down" and self.control is not None:
            entry.status, entry.delivered = 0, False
            self.control.down(fault.seconds)
            return server.NOT_DONE_YET
        if fault is not None and fault.kind == "status":
            entry.status = fault.status
            extra = {"Retry-After": fault.retry_after} if fault.retry_after else None
            return _json(request, fault.status, {"code": fault.status, "error": "injected fault"}, extra)
        answer = platform.take(records)
        entry.accepted, entry.duplicates = answer["accepted"], answer["duplicates"]
        entry.rejected = [r["recordId"] for r in answer["rejected"]]
        if fault is not None and fault.kind == "drop":
            entry.delivered = False
            request.transport.abortConnection()  # taken, but the gateway never hears it
            return server.NOT_DONE_YET
        if fault is not None and fault.kind == "delay":
            entry.delivered = False
            payload = _json(request, 200, answer)

            def late() -> None:
                if not request.finished and not getattr(request, "_disconnected", False):
                    entry.delivered = True
                    request.write(payload)
                    request.finish()

            platform.clock.callLater(fault.seconds, late)
            return server.NOT_DONE_YET
        return _json(request, 200, answer)

    def _reconciliation(self, request: server.Request) -> bytes:
        refused = self.platform.authenticate(_headers(request), b"")
        if refused:
            self.platform.auth_failures.append(refused)
            return _json(request, 401, {"code": 401, "error": refused})
        day = (request.args.get(b"date") or [b""])[0].decode("latin-1")
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", day):
            return _json(request, 400, {"code": 400, "error": "date must be YYYY-MM-DD"})
        return _json(request, 200, self.platform.reconciliation(day))

    def _control(self, request: server.Request, action: str, body: bytes) -> bytes:
        platform = self.platform
        if action == "faults" and request.method == b"POST":
            for item in json.loads(body or b"[]"):
                platform.faults.append(Fault(**item))
            return _json(request, 200, {"faults": len(platform.faults)})
        if action == "down" and request.method == b"POST" and self.control is not None:
            seconds = float((request.args.get(b"seconds") or [b"1"])[0])
            platform.clock.callLater(0.01, self.control.down, seconds)
            return _json(request, 200, {"down": seconds})
        if action == "log":
            return _json(request, 200, [entry.as_json() for entry in platform.log])
        if action == "summary":
            return _json(request, 200, platform.summary())
        if action == "records":
            return _json(request, 200, platform.records)
        if action == "reset" and request.method == b"POST":
            platform.reset()
            return _json(request, 200, {"reset": True})
        return _json(request, 404, {"error": "unknown control"})


class _TrackingSite(server.Site):
    """A site that knows its open connections, so that going down really drops them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.channels: weakref.WeakSet[Any] = weakref.WeakSet()

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        self.channels.add(channel)
        return channel


class PlatformServer:
    """The test platform listening on loopback; it can go down and come back on the same port."""

    def __init__(
        self,
        reactor: Any,
        *,
        app_id: str = "gw-test",
        secret: str = "test-secret",
        port: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        self.reactor = reactor
        self.host = host
        self.platform = CentralPlatform(app_id, secret, reactor)
        self.site = _TrackingSite(PlatformResource(self.platform, self), reactor=reactor)
        self.site.noisy = False
        self.port = port
        self._listening: IListeningPort | None = None
        self.started_at = 0.0

    def start(self) -> PlatformServer:
        tcp: IReactorTCP = self.reactor
        self._listening = tcp.listenTCP(self.port, self.site, interface=self.host)
        self.port = self._listening.getHost().port
        self.started_at = self.reactor.seconds()
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> Any:
        listening, self._listening = self._listening, None
        return listening.stopListening() if listening else None

    def drop_connections(self) -> None:
        for channel in list(self.site.channels):
            transport = getattr(getattr(channel, "_channel", channel), "transport", None)
            if transport is not None:
                transport.abortConnection()

    def down(self, seconds: float | None = None) -> None:
        """Stop listening and drop every connection; listen again after ``seconds`` if given."""
        self.stop()
        self.drop_connections()
        if seconds is not None:
            self.reactor.callLater(seconds, self.start)


def listen(reactor: Any, *, app_id: str = "gw-test", secret: str = "test-secret", port: int = 0) -> PlatformServer:
    """Start a test platform on 127.0.0.1 (port 0: a free one); ``.url`` is its base URL."""
    return PlatformServer(reactor, app_id=app_id, secret=secret, port=port).start()


def seed_call_ratings(store: Store, count: int, *, start: int = 0, rated_at: datetime | None = None) -> list[str]:
    """``count`` voice ratings of hotline calls awaiting the push, written in bulk (tests, benchmarks).

    The same rows as :meth:`storage.store.Store.add_rating` writes for a counted rating (service
    record, rating, outbox row), a thousand per statement instead of seven statements each, so
    that tens of thousands take seconds, also on PostgreSQL. Returns the recordIds.
    """
    from sqlalchemy import insert

    from storage import ids
    from storage.schema import outbox, ratings, service_records

    now = datetime.now(UTC)
    rated_at = rated_at or now
    record_ids: list[str] = []
    for chunk_start in range(start, start + count, 1000):
        numbers = range(chunk_start, min(chunk_start + 1000, start + count))
        with store.engine.begin() as connection:
            calls = [
                {
                    "external_id": f"1795{n:06d}.{n % 97}",
                    "kind": "call",
                    "call_id": f"1795{n:06d}.{n % 97}",
                    "linked_id": f"1795{n:06d}.{n % 97}0",
                    "agent_id": f"A{n % 40}",
                    "work_order": f"GD{n:08d}",
                    "completed_at": rated_at - timedelta(seconds=30),
                    "created_at": now,
                    "updated_at": now,
                }
                for n in numbers
            ]
            keys = dict(
                connection.execute(
                    insert(service_records).returning(service_records.c.external_id, service_records.c.id), calls
                ).all()
            )
            rows = [
                {
                    "record_id": ids.new_id("ev"),
                    "service_record_id": keys[call["external_id"]],
                    "level": 1 + n % 5,
                    "channel": "voice",
                    "raw_input": str(5 - n % 5),
                    "is_default": False,
                    "is_follow_up": False,
                    "is_attempt": False,
                    "overall": False,
                    "rated_at": rated_at,
                    "created_at": now,
                }
                for n, call in zip(numbers, calls, strict=True)
            ]
            rating_ids = dict(
                connection.execute(insert(ratings).returning(ratings.c.record_id, ratings.c.id), rows).all()
            )
            connection.execute(
                insert(outbox),
                [
                    {
                        "record_id": row["record_id"],
                        "record_type": "evaluation",
                        "rating_id": rating_ids[row["record_id"]],
                        "status": "pending",
                        "attempts": 0,
                        "next_attempt_at": now,
                        "created_at": now,
                    }
                    for row in rows
                ],
            )
        record_ids.extend(row["record_id"] for row in rows)
    return record_ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="strict test platform (PLATFORM.md contract v1)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--app-id", default="gw-test")
    parser.add_argument("--secret", default="test-secret")
    args = parser.parse_args(argv)
    from twisted.internet import reactor

    running = PlatformServer(reactor, app_id=args.app_id, secret=args.secret, port=args.port, host=args.host).start()
    print(f"event=platform.listening url={running.url} port={running.port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
