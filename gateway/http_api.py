"""The HTTP API (twisted.web): health, metrics, OpenAPI document, service intake, operators' look-ups.

Every route but ``/health``, ``/openapi.json`` and ``/metrics`` needs a bearer token whose role
may use it (SPEC R5.2); ``/metrics`` needs one too unless asked from loopback. Bodies are JSON,
bounded in size; errors are JSON sentences that say what is wrong and where. Store calls go
through :class:`storage.deferred.DeferredStore`. Phones are masked in every answer but the
supervisors' call-back view, which is audited (SPEC R5.1). Listings are paged by an opaque
``cursor`` (see :mod:`storage.queries`): each page gives ``next``, the link to the one after.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from gateway.health import is_down
from gateway.intake import FieldError, ServiceRecordInput, parse_service_record, parse_timestamp
from gateway.openapi import build_openapi
from storage import queries
from storage.deferred import DeferredStore

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.metrics import GatewayMetrics

log = logging.getLogger("gateway.http")

MAX_RECORDS_PER_REQUEST = 1000
INTAKE_ROLES = frozenset({"intake", "admin"})
LOOKUP_ROLES = frozenset({"operator", "supervisor", "admin"})
#: SPEC R5.1, R5.2: only those who must call the citizen back see the number.
CONTACT_ROLES = frozenset({"supervisor"})
ADMIN_ROLES = frozenset({"admin"})
RECONCILIATION_ROLES = frozenset({"admin", "supervisor", "platform"})
#: With a token; from loopback /metrics needs none.
METRICS_ROLES = frozenset({"admin", "platform"})
RATING_FILTERS = tuple(queries.SERVICE_FILTERS)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"})


class ApiError(Exception):
    """An error answered to the client as ``{"error": message, "details": [...]}``."""

    def __init__(self, status: int, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details or []


class BoundedRequest(Request):
    """A request that stops buffering a body past the configured limit (answered with 413)."""

    max_body_bytes = 1024 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.body_too_large = False
        self._body_bytes = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body_bytes:
            self.body_too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._body_bytes += len(data)
        if self._body_bytes > self.max_body_bytes:
            self.body_too_large = True
            return
        if not self.body_too_large:
            super().handleContentChunk(data)


@dataclass
class _Route:
    method: bytes
    parts: tuple[str, ...]  # "{name}" is a path parameter
    handler: Callable[..., Any]
    roles: frozenset[str] | None  # None: no authentication


@dataclass(frozen=True)
class RawBody:
    """A response body that is not JSON."""

    payload: bytes
    content_type: str


class GatewayApi(Resource):
    """All routes in one small table; each handler returns (status, JSON-able body)."""

    isLeaf = True

    def __init__(
        self,
        store: DeferredStore,
        reactor: IReactorTime,
        *,
        health: Callable[[], defer.Deferred[dict[str, Any]]] | None = None,
        default_country_code: str = "86",
        token_cache_seconds: float = 30.0,
        config: Config | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        super().__init__()
        self.store = store
        self.reactor = reactor
        self.default_country_code = default_country_code
        self.config = config
        self.metrics = metrics
        self._health = health
        self._token_cache: dict[str, tuple[float, tuple[str, str] | None]] = {}
        self._token_cache_seconds = token_cache_seconds
        self._openapi = json.dumps(build_openapi(), ensure_ascii=False).encode()
        self.routes = [
            _Route(b"GET", ("health",), self.get_health, None),
            _Route(b"GET", ("openapi.json",), self.get_openapi, None),
            _Route(b"GET", ("metrics",), self.get_metrics, None),  # its own check: loopback or a token
            _Route(b"POST", ("v1", "service-records"), self.post_service_records, INTAKE_ROLES),
            _Route(b"GET", ("v1", "service-records", "{id}"), self.get_service_record, INTAKE_ROLES | LOOKUP_ROLES),
            _Route(b"GET", ("v1", "service-records", "{id}", "contact"), self.get_service_contact, CONTACT_ROLES),
            _Route(b"GET", ("v1", "ratings"), self.get_ratings, LOOKUP_ROLES),
            _Route(b"GET", ("v1", "ratings", "{record_id}", "contact"), self.get_rating_contact, CONTACT_ROLES),
            _Route(b"GET", ("v1", "outbox", "rejected"), self.get_rejected, ADMIN_ROLES),
            _Route(b"GET", ("v1", "reconciliation"), self.get_reconciliation, RECONCILIATION_ROLES),
        ]

    # -- plumbing ------------------------------------------------------------------------------

    def render(self, request: Request) -> Any:
        started = time.monotonic()
        deferred = defer.maybeDeferred(self._dispatch, request)
        deferred.addErrback(self._error_body)
        deferred.addCallback(self._write, request, started)
        return NOT_DONE_YET

    def _dispatch(self, request: Request) -> Any:
        if getattr(request, "body_too_large", False):
            raise ApiError(413, f"the request body is larger than {BoundedRequest.max_body_bytes} bytes")
        parts = tuple(p.decode("utf-8", "replace") for p in request.postpath if p)
        allowed: list[bytes] = []
        for route in self.routes:
            params = _match(route.parts, parts)
            if params is None:
                continue
            if route.method != request.method:
                allowed.append(route.method)
                continue
            if route.roles is None:
                return route.handler(request, **params)
            return self._authenticate(request, route.roles).addCallback(
                lambda principal, route=route, params=params: route.handler(request, principal=principal, **params)
            )
        if allowed:
            request.setHeader(b"Allow", b", ".join(allowed))
            raise ApiError(
                405, f"{request.method.decode()} is not allowed here; use {', '.join(a.decode() for a in allowed)}"
            )
        raise ApiError(404, "no such resource; see /openapi.json")

    def _authenticate(self, request: Request, roles: frozenset[str]) -> defer.Deferred[tuple[str, str]]:
        header = (request.getHeader(b"authorization") or b"").decode("latin-1").strip()
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="gateway"')
            return defer.fail(ApiError(401, "missing bearer token: send 'Authorization: Bearer <token>'"))
        token = token.strip()
        now = self.reactor.seconds()
        cached = self._token_cache.get(token)
        if cached and cached[0] > now:
            lookup: defer.Deferred[Any] = defer.succeed(cached[1])
        else:
            lookup = self.store.call("authenticate", token)

            def remember(principal: Any) -> Any:
                if len(self._token_cache) > 10000:
                    self._token_cache.clear()
                self._token_cache[token] = (now + self._token_cache_seconds, principal)
                return principal

            lookup.addCallback(remember)

        def check(principal: tuple[str, str] | None) -> tuple[str, str]:
            if principal is None:
                request.setHeader(b"WWW-Authenticate", b'Bearer realm="gateway", error="invalid_token"')
                raise ApiError(401, "the bearer token is unknown or revoked")
            if principal[0] not in roles:
                raise ApiError(
                    403, f"role {principal[0]!r} may not use this; it needs one of: {', '.join(sorted(roles))}"
                )
            return principal

        return lookup.addCallback(check)

    def _error_body(self, failure: Failure) -> tuple[int, dict[str, Any]]:
        if failure.check(ApiError):
            error: ApiError = failure.value  # type: ignore[assignment]
            return error.status, {"error": error.message, "details": error.details}
        log.error("event=http.error error=%s", failure.getErrorMessage(), exc_info=failure.value)
        return 500, {"error": "internal error; the request was not completed, retry later", "details": []}

    def _write(self, result: tuple[int, Any], request: Request, started: float) -> None:
        status, body = result
        if request._disconnected:  # the client went away
            return
        request.setResponseCode(status)
        content_type = b"application/json; charset=utf-8"
        if isinstance(body, RawBody):
            payload, content_type = body.payload, body.content_type.encode()
        elif isinstance(body, bytes):
            payload = body
        else:
            payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        request.setHeader(b"Content-Type", content_type)
        request.setHeader(b"Cache-Control", b"no-store")
        request.write(payload)
        request.finish()
        log.debug(
            "event=http.request method=%s status=%s ms=%.1f",
            request.method.decode(),
            status,
            (time.monotonic() - started) * 1000,
        )

    def _json_body(self, request: Request) -> Any:
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if content_type != b"application/json":
            raise ApiError(415, "send the body as Content-Type: application/json")
        request.content.seek(0)
        raw = request.content.read()
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ApiError(400, "the body is not UTF-8") from None
        except json.JSONDecodeError as error:
            raise ApiError(
                400, f"the body is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
            ) from None
        except RecursionError:
            raise ApiError(400, "the body nests arrays or objects too deeply") from None

    def access_line(self, timestamp: str, request: Request) -> str:
        """Twisted's access log line: the route's pattern, never the path or query (SPEC R5.1).

        A path or query may carry what a client should not have put there (a phone as an id,
        a name as a search); the pattern (``/v1/ratings/{record_id}/contact``) tells enough.
        """
        parts = tuple(p.decode("utf-8", "replace") for p in (request.path or b"").split(b"?")[0].split(b"/") if p)
        route = next((r for r in self.routes if _match(r.parts, parts) is not None), None)
        pattern = "/" + "/".join(route.parts) if route else "(no route)"
        method = request.method.decode("latin-1") if request.method in _METHODS else "(other)"
        host = getattr(request.getClientAddress(), "host", "-")
        return (
            f"event=http.access method={method} route={pattern} status={request.code} "
            f"bytes={request.sentLength} client={host}"
        )

    # -- routes --------------------------------------------------------------------------------

    def get_health(self, request: Request) -> Any:
        if self._health is None:
            return 200, {"status": "ok", "components": {}}

        def answer(report: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            return (503 if is_down(report) else 200), report

        return self._health().addCallback(answer)

    def get_openapi(self, request: Request) -> tuple[int, bytes]:
        return 200, self._openapi

    def post_service_records(self, request: Request, principal: tuple[str, str]) -> Any:
        """One record, or ``{"records": [...]}`` (SPEC R1.3); idempotent on each record's id."""
        body = self._json_body(request)
        now = datetime.fromtimestamp(self.reactor.seconds()).astimezone()
        single = isinstance(body, dict) and "records" not in body
        if single:
            items = [body]
        elif isinstance(body, dict) and isinstance(body.get("records"), list):
            extra = sorted(set(body) - {"records"})
            if extra:
                raise ApiError(422, f"unknown field(s) beside records: {', '.join(extra)}")
            items = body["records"]
            if not items:
                raise ApiError(422, "records is empty")
            if len(items) > MAX_RECORDS_PER_REQUEST:
                raise ApiError(413, f"at most {MAX_RECORDS_PER_REQUEST} records per request")
        else:
            raise ApiError(422, 'the body must be a service record object or {"records": [ ... ]}')

        parsed: list[ServiceRecordInput] = []
        outcome: list[dict[str, Any]] = []
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                outcome.append(
                    {
                        "index": index,
                        "id": None,
                        "status": "rejected",
                        "errors": [{"field": "(record)", "message": "must be a JSON object"}],
                    }
                )
                continue
            result = parse_service_record(item, now=now, default_country_code=self.default_country_code)
            record_id = item.get("id") if isinstance(item.get("id"), str) else None
            if isinstance(result, list):
                outcome.append({"index": index, "id": record_id, "status": "rejected", "errors": _errors(result)})
            else:
                parsed.append(result)
                outcome.append({"index": index, "id": result.id, "status": None, "errors": []})

        def merge(results: list[Any]) -> tuple[int, dict[str, Any]]:
            stored = iter(results)
            for entry in outcome:
                if entry["status"] is None:
                    result = next(stored)
                    entry["status"] = result.status
                    if result.reason:
                        field, _, message = result.reason.partition(": ")
                        entry["errors"] = [{"field": field, "message": message}]
            if single:
                entry = outcome[0]
                status = {"created": 201, "updated": 200, "unchanged": 200}.get(entry["status"], 422)
                del entry["index"]
                return status, entry
            counts = {
                k: sum(1 for e in outcome if e["status"] == k) for k in ("created", "updated", "unchanged", "rejected")
            }
            return 200, {"counts": counts, "results": outcome}

        if not parsed:
            return merge([])
        return self.store.call("upsert_service_records", parsed).addCallback(merge)

    def get_service_record(self, request: Request, principal: tuple[str, str], id: str) -> Any:
        def answer(record: dict[str, Any] | None) -> tuple[int, Any]:
            if record is None:
                raise ApiError(404, f"no service record with id {id!r}")
            return 200, record

        return self.store.call("get_service_record", id).addCallback(answer)

    def get_ratings(self, request: Request, principal: tuple[str, str]) -> Any:
        """Operators' look-up of ratings by call, linked id, work order, agent, matter, department,
        service record and rating time (SPEC R5.2), oldest first, phone masked (SPEC R5.1)."""
        args = _query_args(request, {*RATING_FILTERS, "from", "to", "limit", "offset", "cursor"})
        filters = {name: _text_arg(args, name) for name in RATING_FILTERS if name in args}
        since = _time_arg(args, "from")
        until = _time_arg(args, "to")
        if not filters and since is None and until is None:
            raise ApiError(400, f"give at least one of {', '.join(RATING_FILTERS)}, from, to")
        if since is not None and until is not None and until <= since:
            raise ApiError(400, "to must be later than from")
        limit = _int_arg(args, "limit", 100, 1, 1000)
        offset = _int_arg(args, "offset", 0, 0, 10**6)
        cursor = _text_arg(args, "cursor") if "cursor" in args else None
        if cursor is not None and offset:
            raise ApiError(400, "give cursor or offset, not both")

        def answer(page: queries.Page) -> tuple[int, dict[str, Any]]:
            return 200, {
                "ratings": [row.as_json() for row in page.items],
                "limit": limit,
                "offset": offset,
                "nextCursor": page.next_cursor,
                "next": _next_link(request, args, page.next_cursor),
            }

        return self._page(
            queries.find_ratings_page,
            filters,
            since=since,
            until=until,
            limit=limit,
            offset=offset,
            cursor=cursor,
        ).addCallback(answer)

    def get_rating_contact(self, request: Request, principal: tuple[str, str], record_id: str) -> Any:
        """SPEC R4.1, R5.1: a supervisor calls the citizen back; the view is audited."""
        _query_args(request, set())
        return self._contact(principal, rating_record_id=record_id)

    def get_service_contact(self, request: Request, principal: tuple[str, str], id: str) -> Any:
        _query_args(request, set())
        return self._contact(principal, service_id=id)

    def _contact(self, principal: tuple[str, str], **which: str) -> Any:
        role, name = principal
        what = "rating" if "rating_record_id" in which else "service record"
        (value,) = which.values()

        def answer(view: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
            if view is None:
                raise ApiError(404, f"no {what} with id {value!r}")
            return 200, view

        found = self.store.run(
            queries.contact_view, self.store.store, actor=f"{role}:{name or '(unnamed token)'}", role=role, **which
        )
        return found.addCallback(answer)

    def get_rejected(self, request: Request, principal: tuple[str, str]) -> Any:
        """SPEC R7.2: records the platform refused as invalid, with its reason (admins)."""
        args = _query_args(request, {"limit", "cursor"})
        limit = _int_arg(args, "limit", 100, 1, 1000)
        cursor = _text_arg(args, "cursor") if "cursor" in args else None

        def answer(page: queries.Page) -> tuple[int, dict[str, Any]]:
            return 200, {
                "rejected": page.items,
                "limit": limit,
                "nextCursor": page.next_cursor,
                "next": _next_link(request, args, page.next_cursor),
            }

        return self._page(queries.rejected_records_page, limit=limit, cursor=cursor).addCallback(answer)

    def _page(self, query: Callable[..., queries.Page], *args: Any, **kwargs: Any) -> defer.Deferred[queries.Page]:
        def bad_cursor(failure: Failure) -> None:
            failure.trap(queries.BadCursor)
            raise ApiError(400, str(failure.value))

        return self.store.run(query, self.store.store, *args, **kwargs).addErrback(bad_cursor)

    def get_reconciliation(self, request: Request, principal: tuple[str, str]) -> Any:
        """SPEC R7.3: a day's totals per channel and level, stored, pushed and the platform's.

        What ``gateway reconcile --json`` answers (:func:`gateway.platform.reconcile.reconcile`),
        in two blocking halves run side by side off the reactor: the store's totals in a store
        thread, the platform's counts (urllib, up to ``[platform] timeout``) in the reactor's
        thread pool, so that a slow platform never holds the store's thread (SQLite has one).
        """
        from gateway.platform.reconcile import (
            PlatformUnavailable,
            Reconciliation,
            fetch_platform_counts,
            platform_configured,
        )
        from storage.outbox import Outbox

        args = _query_args(request, {"date"})
        if "date" not in args:
            raise ApiError(400, "give date=YYYY-MM-DD (the assessTime date, Asia/Shanghai)")
        try:
            if not _DAY.match(args["date"]):
                raise ValueError
            day = date.fromisoformat(args["date"])
        except ValueError:
            raise ApiError(400, f"date {args['date']!r} is not a day; write it YYYY-MM-DD") from None
        if not 1970 <= day.year <= 9998:
            raise ApiError(400, f"date {args['date']!r} is not a day the gateway can have ratings of")
        if self.config is None:
            raise ApiError(404, "reconciliation is not available in this process")
        platform = self.config.platform
        totals = self.store.run(Outbox(self.store.store).day_totals, day)
        if platform_configured(platform):
            pool = self.reactor.getThreadPool()  # type: ignore[attr-defined]
            asked = threads.deferToThreadPool(self.reactor, pool, fetch_platform_counts, platform, day)  # type: ignore[arg-type]
            asked.addCallback(lambda counts: ("ok", counts, None))

            def unavailable(failure: Failure) -> tuple[str, None, str]:
                failure.trap(PlatformUnavailable)
                return "unavailable", None, str(failure.value)

            asked.addErrback(unavailable)
        else:
            asked = defer.succeed(("not configured", None, None))

        def report(results: list[Any]) -> tuple[int, dict[str, Any]]:
            day_totals, (status, counts, error) = results
            return 200, Reconciliation(day, day_totals, counts, status, error).as_json()

        both = defer.gatherResults([totals, asked], consumeErrors=True)
        return both.addErrback(lambda failure: failure.value.subFailure).addCallback(report)

    def get_metrics(self, request: Request) -> Any:
        """Prometheus metrics: from loopback without a token, else with an admin or platform token."""
        if self.metrics is None:
            raise ApiError(404, "metrics are not available in this process")
        _query_args(request, set())
        if request.getHeader(b"authorization") is None and _is_loopback(request):
            allowed: defer.Deferred[Any] = defer.succeed(None)
        else:
            allowed = self._authenticate(request, METRICS_ROLES)
        metrics = self.metrics
        from gateway.metrics import CONTENT_TYPE

        allowed.addCallback(lambda _: metrics.scrape())
        return allowed.addCallback(lambda text: (200, RawBody(text, CONTENT_TYPE)))


def _is_loopback(request: Request) -> bool:
    host = getattr(request.getClientAddress(), "host", None)
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _query_args(request: Request, known: set[str]) -> dict[str, str]:
    """The query's parameters (the first of repeated ones); unknown ones are refused."""
    args = {k.decode("utf-8", "replace"): v[0].decode("utf-8", "replace") for k, v in request.args.items() if v}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ApiError(400, f"unknown query parameter(s): {', '.join(unknown)}")
    return args


def _text_arg(args: dict[str, str], name: str) -> str:
    value = args[name]
    if not value or len(value) > 200 or _CONTROL.search(value):
        raise ApiError(400, f"{name} must be 1 to 200 characters, none of them control characters")
    return value


def _time_arg(args: dict[str, str], name: str) -> datetime | None:
    """``from`` (inclusive) or ``to``: a time (exclusive) or a date alone (that whole day, inclusive)."""
    if name not in args:
        return None
    try:
        moment = parse_timestamp(args[name])
        if name == "to" and len(args[name].strip()) == 10:
            moment += timedelta(days=1)  # a date alone means the whole day
        if not 1900 <= moment.year <= 9000:
            raise ValueError("is out of range: give a time in the years 1900 to 9000")
    except (ValueError, OverflowError) as error:
        raise ApiError(400, f"{name}: {error}") from None
    return moment


def _next_link(request: Request, args: dict[str, str], cursor: str | None) -> str | None:
    if cursor is None:
        return None
    query = {k: v for k, v in args.items() if k not in ("cursor", "offset")}
    query["cursor"] = cursor
    path = "/" + "/".join(p.decode("utf-8", "replace") for p in request.prepath + request.postpath if p)
    return f"{path}?{urllib.parse.urlencode(query)}"


def _match(pattern: tuple[str, ...], parts: tuple[str, ...]) -> dict[str, str] | None:
    if len(pattern) != len(parts):
        return None
    params: dict[str, str] = {}
    for want, got in zip(pattern, parts, strict=True):
        if want.startswith("{"):
            if len(got) > 200 or _CONTROL.search(got):
                return None  # no id is like this
            params[want[1:-1]] = got
        elif want != got:
            return None
    return params


def _errors(errors: list[FieldError]) -> list[dict[str, str]]:
    return [{"field": e.field, "message": e.message} for e in errors]


def _int_arg(args: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    if name not in args:
        return default
    try:
        value = int(args[name])
    except ValueError:
        raise ApiError(400, f"{name} must be a whole number") from None
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low} and {high}")
    return value


def make_site(api: GatewayApi, max_body_bytes: int, reactor: Any = None) -> server.Site:
    """A Site whose requests refuse bodies over ``max_body_bytes``."""
    request_class = type("GatewayRequest", (BoundedRequest,), {"max_body_bytes": max_body_bytes})
    site = server.Site(api, requestFactory=request_class, reactor=reactor, logFormatter=api.access_line)
    site.displayTracebacks = False
    site.noisy = False
    return site
