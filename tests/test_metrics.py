"""Prometheus metrics (issue 5 §4): one registry per gateway, store figures on scrape, live figures.

The store's figures are read in a store thread at most once per interval; the push latency comes
from the pusher as each request ends; AGI sessions from the FastAGI factory; the SMPP link's
state from :func:`gateway.metrics.observe_smpp`. ``/metrics`` is open on loopback, else admin or
platform tokens only.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from gateway.http_api import GatewayApi
from gateway.ivr.fastagi import CallStats
from gateway.metrics import CONTENT_TYPE, GatewayMetrics, observe_smpp
from gateway.platform.pusher import HttpAnswer
from gateway.rating import Channel, Level, ServiceKind
from gateway.testing.asterisk import place_call
from storage.outbox import Outbox
from storage.queries import StoreFigureCounter, store_figures
from storage.store import Store
from tests.live_gateway import LiveGateway
from tests.test_operator_api import add_rating
from tests.test_pusher import ScriptedPlatform, SyncStore, ack, add_call_ratings, make_pusher

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: bytes | str) -> Samples:
    if isinstance(text, bytes):
        text = text.decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def scrape(metrics: GatewayMetrics) -> Samples:
    done: list[bytes] = []
    metrics.scrape().addCallback(done.append)
    assert done, "the scrape did not finish"
    return samples(done[0])


class CountingStore(SyncStore):
    """Runs store calls at once, counting them; can be told to fail or to hold the answer."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.calls = 0
        self.fail = False
        self.held: list[defer.Deferred[Any]] = []
        self.hold = False

    def run(self, function: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        self.calls += 1
        if self.fail:
            return defer.fail(RuntimeError("database is locked"))
        if self.hold:
            result = function(*args, **kwargs)
            held: defer.Deferred[Any] = defer.Deferred()
            self.held.append(held)
            held.addCallback(lambda _: result)
            return held
        return super().run(function, *args, **kwargs)


def test_each_gateway_has_its_own_registry() -> None:
    """Tests (and the lead) can build several gateways in one process: no global registry."""
    one, two = GatewayMetrics(None, Clock()), GatewayMetrics(None, Clock())
    one.observe_push(0.02, "200")
    assert value(scrape(one), "hcp_push_request_duration_seconds_count", outcome="200") == 1
    assert ("hcp_push_request_duration_seconds_count", frozenset({("outcome", "200")})) not in scrape(two)


def test_ratings_by_channel_and_level_and_the_outbox_come_from_the_store(sqlite_store: Store) -> None:
    """Right whichever process stored the ratings: counted from the store (attempts excluded, SPEC R1.4)."""
    rated = datetime(2026, 11, 20, 2, 0, tzinfo=UTC)
    voice = [add_rating(sqlite_store, f"C-{n}", level=Level(1 + n % 2), rated_at=rated) for n in range(4)]
    add_rating(sqlite_store, "C-0", level=Level.VERY_SATISFIED, rated_at=rated)  # an attempt
    sms = add_rating(sqlite_store, "M-1", kind=ServiceKind.MATTER, channel=Channel.SMS, level=Level.SATISFIED)
    outbox = Outbox(sqlite_store)
    outbox.mark_pushed(voice[:2], "batch-1")
    outbox.mark_rejected({sms: "deptCode: bad"})
    clock = Clock()
    oldest = min(row_created(sqlite_store, record_id) for record_id in voice[2:])
    clock.advance(oldest.timestamp() + 42.5)
    found = scrape(GatewayMetrics(SyncStore(sqlite_store), clock))
    assert value(found, "hcp_ratings_total", channel="voice", level="1") == 2
    assert value(found, "hcp_ratings_total", channel="voice", level="2") == 2
    assert value(found, "hcp_ratings_total", channel="sms", level="4") == 1
    assert ("hcp_ratings_total", frozenset({("channel", "voice"), ("level", "5")})) not in found
    assert value(found, "hcp_outbox_records", status="pending") == 2
    assert value(found, "hcp_outbox_records", status="pushed") == 2
    assert value(found, "hcp_outbox_records", status="rejected") == 1
    assert value(found, "hcp_outbox_oldest_pending_age_seconds") == pytest.approx(42.5, abs=0.01)
    assert value(found, "hcp_store_up") == 1


def row_created(store: Store, record_id: str) -> datetime:
    from sqlalchemy import select

    from storage.schema import outbox

    with store.engine.connect() as connection:
        return connection.execute(select(outbox.c.created_at).where(outbox.c.record_id == record_id)).scalar_one()


def test_the_store_is_asked_at_most_once_per_interval_and_scrapes_meanwhile_share_one_query(
    sqlite_store: Store,
) -> None:
    store, clock = CountingStore(sqlite_store), Clock()
    metrics = GatewayMetrics(store, clock, store_interval=5)
    scrape(metrics)
    clock.advance(4.9)
    assert value(scrape(metrics), "hcp_outbox_records", status="pending") == 0 and store.calls == 1
    add_call_ratings(sqlite_store, 3)
    clock.advance(0.1)
    store.hold = True
    first, second = metrics.scrape(), metrics.scrape()
    assert store.calls == 2 and not first.called and not second.called
    store.held[0].callback(None)
    texts: list[bytes] = []
    first.addCallback(texts.append)
    second.addCallback(texts.append)
    assert [value(samples(t), "hcp_outbox_records", status="pending") for t in texts] == [3, 3]


def test_a_store_that_fails_keeps_the_last_figures_and_says_so(sqlite_store: Store) -> None:
    add_call_ratings(sqlite_store, 2)
    store, clock = CountingStore(sqlite_store), Clock()
    metrics = GatewayMetrics(store, clock, store_interval=1)
    assert value(scrape(metrics), "hcp_store_up") == 1
    store.fail = True
    clock.advance(2)
    found = scrape(metrics)
    assert value(found, "hcp_store_up") == 0 and value(found, "hcp_outbox_records", status="pending") == 2
    store.fail = False
    assert value(scrape(metrics), "hcp_store_up") == 1  # asked again at once


def test_agi_sessions_are_read_from_the_fastagi_factory() -> None:
    metrics = GatewayMetrics(None, Clock())
    stats = CallStats(active=3, started=120, rated=100, not_rated=17, store_failures=2)
    metrics.watch_agi(stats)
    found = scrape(metrics)
    assert value(found, "hcp_agi_sessions_active") == 3 and value(found, "hcp_agi_sessions_total") == 120
    assert value(found, "hcp_agi_calls_total", outcome="rated") == 100
    assert value(found, "hcp_agi_calls_total", outcome="not_rated") == 17
    assert value(found, "hcp_agi_store_failures_total") == 2
    stats.active = 0
    assert value(scrape(metrics), "hcp_agi_sessions_active") == 0


def test_push_latency_and_outcomes_come_from_the_pusher(sqlite_store: Store) -> None:
    """Each POST's time to its complete answer, by outcome; acknowledged and rejected records."""
    ids = add_call_ratings(sqlite_store, 3)
    platform = ScriptedPlatform()
    clock = Clock()
    slow: defer.Deferred[HttpAnswer] = defer.Deferred()
    platform.script.extend([HttpAnswer(503, b"", retry_after="1"), slow])
    pusher = make_pusher(sqlite_store, platform, clock)
    metrics = GatewayMetrics(None, clock)
    metrics.watch_pusher(pusher)
    pusher.startService()
    clock.advance(1)  # Retry-After, then the second request waits for its answer
    clock.advance(0.3)
    slow.callback(ack(accepted=ids[:2], rejected=[{"recordId": ids[2], "reason": "taskCode: unknown"}]))
    found = scrape(metrics)
    assert value(found, "hcp_push_request_duration_seconds_count", outcome="503") == 1
    assert value(found, "hcp_push_request_duration_seconds_count", outcome="200") == 1
    assert value(found, "hcp_push_request_duration_seconds_bucket", outcome="200", le="0.25") == 0
    assert value(found, "hcp_push_request_duration_seconds_bucket", outcome="200", le="0.5") == 1
    assert value(found, "hcp_push_request_duration_seconds_sum", outcome="200") == pytest.approx(0.3)
    assert value(found, "hcp_push_records_total", outcome="acknowledged") == 2
    assert value(found, "hcp_push_records_total", outcome="rejected") == 1
    assert value(found, "hcp_push_requests_total") == 2 and value(found, "hcp_push_failures_total") == 1
    assert value(found, "hcp_push_consecutive_failures") == 0
    assert value(found, "hcp_push_last_success_timestamp_seconds") == pytest.approx(1.3)
    pusher.stopService()


def test_observe_smpp_sets_the_link_figures() -> None:
    """The SMS service reports its link: bound, window in use, window, rate, submits and errors."""
    metrics = GatewayMetrics(None, Clock())
    assert not any(name.startswith("hcp_smpp") for name, _ in scrape(metrics))
    observe_smpp(
        metrics,
        {"bound": True, "window_in_use": 7, "window": 10, "rate": 50.0, "submitted_total": 1234, "errors_total": 5},
    )
    found = scrape(metrics)
    assert value(found, "hcp_smpp_bound") == 1 and value(found, "hcp_smpp_window_in_use") == 7
    assert value(found, "hcp_smpp_window") == 10 and value(found, "hcp_smpp_rate_per_second") == 50.0
    assert value(found, "hcp_smpp_submitted_total") == 1234 and value(found, "hcp_smpp_errors_total") == 5
    observe_smpp(metrics, {"bound": False, "window": 10})
    found = scrape(metrics)
    assert value(found, "hcp_smpp_bound") == 0 and value(found, "hcp_smpp_window_in_use") == 0


def test_scrape_hooks_run_before_each_scrape() -> None:
    metrics = GatewayMetrics(None, Clock())
    state = {"bound": True, "window_in_use": 0, "window": 5, "rate": 10.0, "submitted_total": 0, "errors_total": 0}
    metrics.scrape_hooks.append(lambda: observe_smpp(metrics, state))
    state["submitted_total"] = 9
    assert value(scrape(metrics), "hcp_smpp_submitted_total") == 9


# -- /metrics over HTTP ----------------------------------------------------------------------------


def test_metrics_on_loopback_need_no_token_and_elsewhere_an_admin_or_platform_one(tmp_path: Path) -> None:
    with LiveGateway(tmp_path) as live:
        add_rating(live.gateway.store, "L-1", level=Level.VERY_SATISFIED)
        status, headers, body = live.request("GET", "/metrics")
        assert status == 200 and headers["Content-Type"] == CONTENT_TYPE
        found = samples(body)
        assert value(found, "hcp_ratings_total", channel="voice", level="5") == 1
        assert value(found, "hcp_agi_sessions_active") == 0
        assert live.request("GET", "/metrics", token=live.token("operator"))[0] == 403
        assert live.request("GET", "/metrics", token="hcp_wrong")[0] == 401
        for role in ("admin", "platform"):
            assert live.request("GET", "/metrics", token=live.token(role))[0] == 200
        assert live.request("GET", "/metrics?x=1")[0] == 400

        # From another host (a request object with that client address): a token is needed.
        api = live.gateway.api
        assert api is not None
        assert from_remote(live, api, None)[0] == 401
        assert from_remote(live, api, live.token("operator"))[0] == 403
        status, payload = from_remote(live, api, live.token("admin"))
        assert status == 200 and b"hcp_ratings_total" in payload


def from_remote(live: LiveGateway, api: GatewayApi, token: str | None) -> tuple[int, bytes]:
    request = DummyRequest([b"metrics"])
    request.method = b"GET"
    request.client = IPv4Address("TCP", "192.0.2.7", 40000)
    request._disconnected = False
    if token:
        request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {token}".encode()])

    def render() -> defer.Deferred[None]:
        finished = request.notifyFinish()
        api.render(request)
        return finished

    live.call(render)
    return request.responseCode or 200, b"".join(request.written)


def test_a_call_through_fastagi_shows_in_the_agi_metrics(tmp_path: Path) -> None:
    with LiveGateway(tmp_path) as live:
        before = samples(live.request("GET", "/metrics")[2])
        result = live.call(
            place_call,
            live.reactor,
            "127.0.0.1",
            live.port("agi"),
            "rating?call_id=1795370491.71&agent=A1024",
            "w1 d2",
            time_scale=0.02,
            timeout=20,
        )
        assert result.variables.get("HCP_RATING") == "4"  # key 2: 满意, level code 4 (SPEC R1.2)
        after = samples(live.request("GET", "/metrics")[2])
        assert value(after, "hcp_agi_sessions_total") == value(before, "hcp_agi_sessions_total") + 1
        assert value(after, "hcp_agi_calls_total", outcome="rated") == 1
        assert value(after, "hcp_agi_sessions_active") == 0


def test_metrics_answer_in_the_exposition_format_with_help_for_every_family(tmp_path: Path) -> None:
    with LiveGateway(tmp_path) as live:
        observe_smpp(live.gateway.metrics, {"bound": True, "window": 10, "rate": 50.0})  # type: ignore[arg-type]
        text = live.request("GET", "/metrics")[2].decode()
    families = list(text_string_to_metric_families(text))
    names = {family.name for family in families}
    assert {"hcp_ratings", "hcp_outbox_records", "hcp_outbox_oldest_pending_age_seconds", "hcp_store_up"} <= names
    assert {"hcp_agi_sessions_active", "hcp_agi_sessions", "hcp_smpp_window_in_use", "hcp_smpp_bound"} <= names
    assert all(family.documentation for family in families)


def test_the_store_figures_are_counted_incrementally_and_agree_with_a_full_count(store: Store) -> None:
    """A scrape after a year costs what the first one did: only rows new since the last settled id
    are counted, and rows younger than the settling time are counted afresh each time."""
    counter = StoreFigureCounter(settle_seconds=60)
    add_call_ratings(store, 5)
    age_rows(store, seconds=30)  # not settled yet: counted afresh, not taken into the totals
    assert counter.figures(store) == store_figures(store)
    assert counter._ratings_through == 0
    age_rows(store, seconds=120)
    first = counter.figures(store)
    assert counter._ratings_through == 5 and sum(first.ratings.values()) == 5
    outbox = Outbox(store)
    pending = outbox.pending_ids()
    outbox.mark_pushed(pending[:3], "batch-1")
    outbox.mark_rejected({pending[3]: "bad"})
    add_call_ratings(store, 4, start=5)
    again = counter.figures(store)
    assert again == store_figures(store)
    assert again.outbox == {"pending": 5, "pushed": 3, "rejected": 1}
    assert sum(again.ratings.values()) == 9


def age_rows(store: Store, *, seconds: float) -> None:
    from sqlalchemy import update

    from storage.schema import outbox, ratings

    then = datetime.now(UTC) - timedelta(seconds=seconds)
    with store.engine.begin() as connection:
        connection.execute(update(ratings).values(created_at=then))
        connection.execute(update(outbox).values(created_at=then))
