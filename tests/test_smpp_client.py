"""The SMPP client against real peers on loopback: the project's fault-injecting SMSC and node-smpp.

Each test runs on a fresh reactor of its own, with a LoopingCall ticking every 10 ms beside the
client to prove the reactor is never blocked. Per fault, it asserts that every submit's Deferred
fires exactly once with the right kind of outcome, that no part the SMSC acknowledged ESME_ROK
is sent again, and that throttled parts arrive later. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import pytest
from twisted.internet import defer, task
from twisted.python.failure import Failure

from gateway.config import load_config
from gateway.sms.smpp import (
    DeliverSm,
    NotSubmitted,
    SmppClient,
    SubmitOutcomeUnknown,
    SubmitPart,
    SubmitRejected,
    SubmitTimedOut,
)
from gateway.sms.text import encode_ucs2_parts
from gateway.testing import smsc as smsc_module
from gateway.testing.node_smsc import NodeSmsc
from gateway.testing.reactor import run_on_reactor, sleep
from gateway.testing.smsc import Fault, Smsc, during, encode_pdu, nth

# -- harness -------------------------------------------------------------------------------------


def smpp_config(port: int, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "enabled": True,
        "host": "127.0.0.1",
        "port": port,
        "system_id": "gateway",
        "password": "secret",
        "window": 10,
        "rate": 1000.0,
        "response_timeout": 1.0,
        "enquire_link_interval": 5.0,
        "reconnect_min_delay": 0.05,
        "reconnect_max_delay": 0.4,
        "throttle_delay": 0.1,
        "throttle_max_delay": 0.4,
        "throttle_recovery": 0.5,
    }
    values.update(overrides)
    return dataclasses.replace(load_config(environ={}).smpp, **values)


async def until(reactor: Any, condition: Callable[[], object], timeout: float, what: str) -> None:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await sleep(reactor, 0.01)


class Ticker:
    """A LoopingCall every 10 ms; ``max_gap`` says how long the reactor was ever kept busy.

    While it ticks, the heap built before it (the whole test session's) is frozen out of the
    cyclic garbage collector, as ``gateway run`` freezes its start-up heap: late in the suite a
    full collection of it took 100-300 ms, a pause of the reactor that is not the code under
    test blocking it.
    """

    def __init__(self, reactor: Any) -> None:
        gc.freeze()
        self.last = time.monotonic()
        self.max_gap = 0.0
        self.ticks = 0
        self.loop = task.LoopingCall(self.tick)
        self.loop.clock = reactor
        self.loop.start(0.01)

    def tick(self) -> None:
        now = time.monotonic()
        self.max_gap = max(self.max_gap, now - self.last)
        self.last = now
        self.ticks += 1

    def stop(self) -> None:
        self.loop.stop()
        gc.unfreeze()


class Outcomes:
    """Collects how each submit's Deferred fired, and fails the test if one fires twice."""

    def __init__(self) -> None:
        self.results: dict[int, Any] = {}

    def watch(self, index: int, deferred: defer.Deferred[str]) -> defer.Deferred[None]:
        def record(result: Any) -> None:
            assert index not in self.results, f"submit {index} resolved twice"
            self.results[index] = result.value if isinstance(result, Failure) else result

        return deferred.addBoth(record)

    def of_kind(self, kind: type) -> list[int]:
        return sorted(i for i, r in self.results.items() if isinstance(r, kind))

    def ids(self) -> dict[int, str]:
        return {i: r for i, r in self.results.items() if isinstance(r, str)}


def part(number: int, text: str = "您好，请评价") -> SubmitPart:
    (only,) = encode_ucs2_parts(text, 0)
    return SubmitPart(f"1380000{number:04d}", "106900123450001", only.short_message, only.esm_class)


async def stored(_message: DeliverSm) -> None:
    return None


async def submit_all(
    reactor: Any, client: SmppClient, parts: list[SubmitPart], timeout: float = 8.0
) -> tuple[Outcomes, list[defer.Deferred[None]]]:
    outcomes = Outcomes()
    watched = [outcomes.watch(i, client.submit(p)) for i, p in enumerate(parts)]
    await until(reactor, lambda: len(outcomes.results) == len(parts), timeout, "every submit resolved")
    return outcomes, watched


def assert_consistent_with(smsc: Smsc, outcomes: Outcomes, parts: list[SubmitPart]) -> None:
    """What the client says was accepted, the SMSC accepted; and no part was accepted twice.

    The SMSC may also have accepted parts whose answer never reached the client: those must
    have failed with SubmitOutcomeUnknown (never NotSubmitted, never rejected).
    """
    assert smsc.acknowledged_twice() == []
    accepted = {record.message_id: record for record in smsc.accepted()}
    for index, message_id in outcomes.ids().items():
        record = accepted.pop(message_id)
        assert record.destination == parts[index].destination
        assert record.short_message == parts[index].short_message
    unknown = {parts[i].destination for i in outcomes.of_kind(SubmitOutcomeUnknown)}
    assert {record.destination for record in accepted.values()} <= unknown


def with_client(
    smsc_options: dict[str, Any],
    scenario: Callable[[Any, Any, SmppClient, Ticker], Awaitable[Any]],
    *,
    on_deliver: Callable[[DeliverSm], Any] = stored,
    peer: Callable[..., Any] = Smsc,
    **config: Any,
) -> Any:
    with peer(**smsc_options) as smsc:

        async def run(reactor: Any) -> Any:
            client = SmppClient(
                smpp_config(smsc.port, **config), reactor, lambda m: defer.ensureDeferred(on_deliver(m))
            )
            ticker = Ticker(reactor)
            client.startService()
            try:
                return await scenario(reactor, smsc, client, ticker)
            finally:
                await client.stopService()
                ticker.stop()
                assert ticker.max_gap < 0.25, f"the reactor was blocked for {ticker.max_gap:.3f} s"

        return run_on_reactor(run)


# -- a well-behaved SMSC -----------------------------------------------------------------------


def test_parts_are_submitted_within_the_window_and_each_gets_its_message_id() -> None:
    parts = [part(i) for i in range(60)]
    in_use: list[int] = []

    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> None:
        watch = task.LoopingCall(lambda: in_use.append(client.state()["window_in_use"]))
        watch.clock = reactor
        watch.start(0.001)
        outcomes, _ = await submit_all(reactor, client, parts)
        watch.stop()
        assert len(outcomes.ids()) == 60
        assert_consistent_with(smsc, outcomes, parts)
        state = client.state()
        assert state["bound"] and state["submitted_total"] == 60 and state["queued"] == 0
        assert state["bind_mode"] == "transceiver" and smsc.binds == 1
        assert smsc.pdus()[0]["sequence"] == 1  # smpplib's own counter would start at 2

    with_client({}, scenario, window=4, rate=300.0)
    assert max(in_use) <= 4


def test_a_long_chinese_message_goes_as_udh_parts() -> None:
    text = (
        "【12345热线】您办理的“不动产登记”事项已办结，请您评价：回复1非常满意，2满意，3基本满意，"
        "4不满意，5非常不满意。请于2月24日18:30前回复，逾期默认“基本满意”。回复TD退订😀"
    )
    pieces = encode_ucs2_parts(text, 42)
    parts = [SubmitPart("13800000001", "106900123459", p.short_message, p.esm_class) for p in pieces]

    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> None:
        outcomes, _ = await submit_all(reactor, client, parts)
        assert len(outcomes.ids()) == len(parts) == 2
        records = smsc.accepted()
        assert [r.concatenation.sequence for r in records if r.concatenation] == [1, 2]
        assert all(r.esm_class == 0x40 and r.data_coding == 8 and r.registered_delivery == 1 for r in records)
        assert "".join(r.text for r in records) == text

    with_client({}, scenario)


def test_the_configured_rate_is_held() -> None:
    parts = [part(i) for i in range(130)]
    arrived: list[float] = []

    def on_record(kind: str, _value: object) -> None:
        if kind == "submit":
            arrived.append(time.monotonic())

    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> None:
        await client.when_bound()
        outcomes, _ = await submit_all(reactor, client, parts)
        assert len(outcomes.ids()) == 130

    with_client({"on_record": on_record}, scenario, rate=100.0, window=50)
    # after the small burst allowance (1 + 50 ms worth), submits arrive at 100/s
    steady = arrived[10:]
    rate = (len(steady) - 1) / (steady[-1] - steady[0])
    assert abs(rate - 100.0) <= 5.0
    assert arrived[-1] - arrived[0] >= 1.1  # 124 intervals of 10 ms after the burst, less thread jitter


def test_transmitter_receiver_pair_sends_on_one_and_receives_on_the_other() -> None:
    received: list[DeliverSm] = []

    async def on_deliver(message: DeliverSm) -> None:
        received.append(message)

    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> None:
        await client.when_bound()
        outcomes, _ = await submit_all(reactor, client, [part(1)])
        (message_id,) = outcomes.ids().values()
        await until(reactor, lambda: any(m.is_receipt for m in received), 5, "the receipt")
        receipt = next(m for m in received if m.is_receipt)
        assert receipt.receipted_message_id == message_id and receipt.message_state == 2
        smsc.send_mo("13800000001", "106900123450001", "4 窗口态度不好")
        await until(reactor, lambda: any(not m.is_receipt for m in received), 5, "the reply")
        reply = next(m for m in received if not m.is_receipt)
        assert reply.short_message.decode("utf-16-be") == "4 窗口态度不好"
        assert reply.source_addr == "13800000001" and reply.data_coding == 8
        assert smsc.binds == 2
        modes = {r.connection for r in smsc.accepted()} | {d.connection for d in smsc.deliveries()}
        assert len(modes) == 2  # submits on the transmitter, deliveries on the receiver
        await until(reactor, lambda: all(d.status == 0 for d in smsc.deliveries()), 5, "both acknowledged")

    with_client({}, scenario, on_deliver=on_deliver, bind_mode="transmitter_receiver")


# -- incoming messages (SPEC R3.7a) --------------------------------------------------------------


def test_a_deliver_sm_is_acknowledged_only_after_it_is_stored_and_refused_if_storing_fails() -> None:
    storing: list[defer.Deferred[None]] = []

    async def on_deliver(message: DeliverSm) -> None:
        waiting: defer.Deferred[None] = defer.Deferred()
        storing.append(waiting)
        await waiting

    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> None:
        await client.when_bound()
        smsc.send_mo("13800000002", "1069001234500", "5")
        smsc.send_mo("13800000003", "1069001234500", "1")
        await until(reactor, lambda: len(storing) == 2, 5, "both handed to the gateway")
        await sleep(reactor, 0.1)
        assert [d.status for d in smsc.deliveries()] == [None, None]  # not before it is stored
        storing[1].callback(None)
        await until(reactor, lambda: smsc.deliveries()[1].status == 0, 5, "ESME_ROK once stored")
        assert smsc.deliveries()[0].status is None
        storing[0].errback(RuntimeError("the store is down"))
        await until(reactor, lambda: smsc.deliveries()[0].status == 0x64, 5, "ESME_RX_T_APPN")

    with_client({}, scenario, on_deliver=on_deliver)


def test_replies_are_acknowledged_ahead_of_the_queued_bulk() -> None:
    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> None:
        await client.when_bound()
        watched = [client.submit(part(i)) for i in range(30)]  # 10 s of bulk at 3/s
        await until(reactor, lambda: len(smsc.submits()) >= 2, 5, "bulk started")
        smsc.send_mo("13800000002", "1069001234500", "5")
        started = time.monotonic()
        await until(reactor, lambda: smsc.deliveries()[0].status == 0, 2, "the reply acknowledged")
        assert time.monotonic() - started < 0.3  # not behind the 28 queued submits
        assert client.state()["queued"] >= 20
        for waiting in watched:
            waiting.addErrback(lambda f: f.trap(NotSubmitted))  # the stop at the end drops the rest

    with_client({}, scenario, rate=3.0)


def test_the_smscs_enquire_link_is_answered_and_an_unknown_command_gets_generic_nack() -> None:
    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> None:
        await client.when_bound()
        smsc.send_raw(encode_pdu("enquire_link", 777))
        smsc.send_raw(struct.pack(">LLLL", 16, 0x00000099, 0, 778))
        await until(
            reactor,
            lambda: {p.get("command") for p in smsc.pdus()} >= {"enquire_link_resp", "generic_nack"},
            5,
            "both answered",
        )
        answers = {p["command"]: p for p in smsc.pdus() if p.get("command") in ("enquire_link_resp", "generic_nack")}
        assert answers["enquire_link_resp"]["sequence"] == 777
        assert answers["generic_nack"]["sequence"] == 778 and answers["generic_nack"]["status"] == 0x03
        outcomes, _ = await submit_all(reactor, client, [part(1)])  # the link goes on
        assert len(outcomes.ids()) == 1 and client.state()["reconnects"] == 0

    with_client({}, scenario)


def test_the_client_keeps_the_link_alive_with_enquire_link() -> None:
    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> None:
        await client.when_bound()
        await until(
            reactor,
            lambda: sum(p.get("command") == "enquire_link" for p in smsc.pdus()) >= 2,
            3,
            "two enquire_links",
        )
        assert client.state()["bound"] and client.state()["reconnects"] == 0

    with_client({}, scenario, enquire_link_interval=0.2)


# -- faults ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["throttled", "queue_full"])
def test_throttled_parts_are_sent_again_later_and_the_pace_drops(fault: str) -> None:
    parts = [part(i) for i in range(20)]

    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> None:
        outcomes, _ = await submit_all(reactor, client, parts)
        assert len(outcomes.ids()) == 20  # nothing dropped, nothing failed
        assert_consistent_with(smsc, outcomes, parts)
        state = client.state()
        assert state["throttled_total"] == 3 and state["errors_total"] == 0
        submits = smsc.submits()
        for number in (3, 4, 5):
            refused = submits[number - 1]
            assert refused.status in (0x58, 0x14)
            again = [r for r in submits if r.accepted and r.destination == refused.destination]
            assert len(again) == 1 and again[0].number > refused.number  # sent again once, later
        refused = [submits[n - 1].destination for n in (3, 4, 5)]
        resent = [r.destination for r in submits[5:] if r.destination in refused]
        assert resent == refused  # sent again, in their order
        assert state["pace"] < state["rate"]  # slowed down, recovering
        await sleep(reactor, 0.7)
        assert client.state()["pace"] == client.state()["rate"]  # recovered

    with_client({"fault": Fault(**{fault: nth(3, 4, 5)})}, scenario)


def test_disconnect_after_n_pdus_leaves_the_in_flight_parts_unknown_once_and_the_rest_go_through() -> None:
    parts = [part(i) for i in range(30)]

    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> None:
        outcomes, _ = await submit_all(reactor, client, parts)
        unknown = outcomes.of_kind(SubmitOutcomeUnknown)
        assert 1 <= len(unknown) <= 10  # what was in the window when the SMSC closed
        assert len(outcomes.ids()) + len(unknown) == 30
        assert_consistent_with(smsc, outcomes, parts)
        assert smsc.binds == 2 and client.state()["reconnects"] == 1

    with_client({"fault": Fault(disconnect_after_pdus=6)}, scenario)


def test_a_submit_never_answered_is_unknown_after_the_response_timeout() -> None:
    parts = [part(i) for i in range(5)]

    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> None:
        started = time.monotonic()
        outcomes, _ = await submit_all(reactor, client, parts)
        assert outcomes.of_kind(SubmitOutcomeUnknown) == [1]
        assert time.monotonic() - started >= 0.5
        assert len(outcomes.ids()) == 4
        assert_consistent_with(smsc, outcomes, parts)
        assert client.state()["errors_total"] == 1 and client.state()["bound"]

    with_client({"fault": Fault(unanswered=nth(2))}, scenario, response_timeout=0.5)


def test_slow_answers_fill_the_window_but_every_part_is_accepted() -> None:
    parts = [part(i) for i in range(20)]

    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> None:
        seen: list[int] = []
        watch = task.LoopingCall(lambda: seen.append(client.state()["window_in_use"]))
        watch.clock = reactor
        watch.start(0.01)
        outcomes, _ = await submit_all(reactor, client, parts)
        watch.stop()
        assert len(outcomes.ids()) == 20
        assert_consistent_with(smsc, outcomes, parts)
        assert max(seen) == 5

    with_client({"fault": Fault(response_delay=0.2)}, scenario, window=5)


def test_a_wrong_password_is_said_clearly_backed_off_and_nothing_is_sent(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="gateway.sms.smpp")

    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> None:
        pending = Outcomes()
        watched = pending.watch(0, client.submit(part(1)))
        await until(reactor, lambda: client.state()["reconnects"] >= 2, 5, "two failed binds")
        state = client.state()
        assert not state["bound"] and "ESME_RINVPASWD" in state["last_error"]
        assert "password" in state["last_error"] and state["queued"] == 1
        assert smsc.submits() == []
        await client.stopService()
        await watched
        assert isinstance(pending.results[0], NotSubmitted)

    with_client({"password": "other"}, scenario)
    assert any("ESME_RINVPASWD" in r.getMessage() and "password" in r.getMessage() for r in caplog.records)
    assert all("secret" not in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("garbage", ["INVALID_COMMAND_LENGTH", "NOT_SMPP", "UNKNOWN_COMMAND_ID"])
def test_garbage_from_the_smsc_never_loses_an_answer_it_can_still_read(garbage: str) -> None:
    parts = [part(i) for i in range(30)]

    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> None:
        outcomes, _ = await submit_all(reactor, client, parts)
        assert_consistent_with(smsc, outcomes, parts)
        # Answers behind the garbage are found again (a submit_sm_resp to a request in flight),
        # so no part's outcome is unknown; then the link is wound down and bound again.
        assert outcomes.of_kind(SubmitOutcomeUnknown) == []
        assert len(outcomes.ids()) == 30
        if garbage == "UNKNOWN_COMMAND_ID":  # a well-framed PDU: generic_nack, the link goes on
            assert client.state()["reconnects"] == 0 and smsc.binds == 1
            assert any(p.get("command") == "generic_nack" for p in smsc.pdus())
        else:  # the peer sends garbage on every connection: each time a clean reconnect
            assert client.state()["reconnects"] >= 1 and smsc.binds >= 2
            assert "not SMPP" in client.state()["last_error"]

    fault = Fault(garbage_after_pdus=4, garbage=getattr(smsc_module, garbage))
    with_client({"fault": fault}, scenario, rate=200.0)


def test_an_unbind_from_the_smsc_is_answered_and_the_client_binds_again() -> None:
    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> None:
        first, _ = await submit_all(reactor, client, [part(i) for i in range(5)])
        assert len(first.ids()) == 5
        smsc.unbind()
        await until(reactor, lambda: any(p.get("command") == "unbind_resp" for p in smsc.pdus()), 5, "unbind_resp")
        await until(reactor, lambda: smsc.binds == 2 and client.state()["bound"], 5, "bound again")
        more, _ = await submit_all(reactor, client, [part(99)])
        assert len(more.ids()) == 1
        assert smsc.acknowledged_twice() == []

    with_client({}, scenario)


class RejectingFault(Fault):
    """Refuses the second submit with ESME_RINVDSTADR and the third with ESME_RSYSERR."""

    def submit_status(self, number: int, elapsed: float) -> int | None:
        return {2: 0x0B, 3: 0x08}.get(number, 0)


def test_a_rejected_part_fails_with_the_status_and_whether_it_is_permanent() -> None:
    parts = [part(i) for i in range(4)]

    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> None:
        outcomes, _ = await submit_all(reactor, client, parts)
        assert outcomes.of_kind(SubmitRejected) == [1, 2]
        invalid, busy = outcomes.results[1], outcomes.results[2]
        assert (invalid.status, invalid.name, invalid.permanent) == (0x0B, "ESME_RINVDSTADR", True)
        assert (busy.status, busy.name, busy.permanent) == (0x08, "ESME_RSYSERR", False)
        assert len(outcomes.ids()) == 2 and client.state()["errors_total"] == 2
        assert len(smsc.submits()) == 4  # a rejected part is not sent again by the client

    with_client({"fault": RejectingFault()}, scenario)


# -- stopping -------------------------------------------------------------------------------------


def test_stopping_fails_queued_parts_as_not_submitted_waits_for_those_in_flight_and_unbinds() -> None:
    parts = [part(i) for i in range(40)]

    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> None:
        await client.when_bound()
        outcomes = Outcomes()
        watched = [outcomes.watch(i, client.submit(p)) for i, p in enumerate(parts)]
        await until(reactor, lambda: len(smsc.submits()) >= 3, 5, "some submits written")
        await client.stopService()
        await defer.DeferredList(watched)
        assert len(outcomes.results) == 40
        not_sent = outcomes.of_kind(NotSubmitted)
        assert not_sent and len(outcomes.ids()) + len(not_sent) == 40  # slow answers still came in time
        assert len(smsc.submits()) == len(outcomes.ids())
        assert any(p.get("command") == "unbind" for p in smsc.pdus())
        late = Outcomes()
        await late.watch(0, client.submit(part(100)))
        assert isinstance(late.results[0], NotSubmitted)
        assert client.state()["phase"] == "stopped"

    with_client({"fault": Fault(response_delay=0.1)}, scenario, rate=50.0, window=3)


def test_in_flight_parts_that_stay_unanswered_at_stop_are_unknown_after_the_response_timeout() -> None:
    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> None:
        await client.when_bound()
        outcomes = Outcomes()
        watched = [outcomes.watch(i, client.submit(part(i))) for i in range(3)]
        await until(reactor, lambda: len(smsc.submits()) == 3, 5, "all written")
        started = time.monotonic()
        await client.stopService()
        await defer.DeferredList(watched)
        assert 0.3 <= time.monotonic() - started < 2.0
        assert outcomes.of_kind(SubmitOutcomeUnknown) == [0, 1, 2]

    with_client({"fault": Fault(unanswered=lambda n, e: True)}, scenario, response_timeout=0.4)


def test_a_client_that_never_started_fails_its_submits_as_not_submitted() -> None:
    async def scenario(reactor: Any) -> None:
        client = SmppClient(smpp_config(1), reactor, lambda m: defer.ensureDeferred(stored(m)))
        outcomes = Outcomes()
        watched = outcomes.watch(0, client.submit(part(1)))
        await client.stopService()
        await watched
        assert isinstance(outcomes.results[0], NotSubmitted)

    run_on_reactor(scenario)


def test_answers_behind_an_smsc_unbind_are_still_read() -> None:
    parts = [part(i) for i in range(20)]

    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> None:
        outcomes, _ = await submit_all(reactor, client, parts)
        assert outcomes.of_kind(SubmitOutcomeUnknown) == []  # read before the SMSC closed
        assert len(outcomes.ids()) == 20
        assert_consistent_with(smsc, outcomes, parts)
        assert smsc.binds >= 2

    with_client({"fault": Fault(unbind_after_pdus=3)}, scenario)


def test_a_connection_closed_in_the_middle_of_an_answer_leaves_those_in_flight_unknown_exactly_once() -> None:
    parts = [part(i) for i in range(20)]

    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> None:
        outcomes, _ = await submit_all(reactor, client, parts)
        unknown = outcomes.of_kind(SubmitOutcomeUnknown)
        assert unknown  # at least the part whose answer was cut in half
        assert len(outcomes.ids()) + len(unknown) == 20
        assert_consistent_with(smsc, outcomes, parts)
        assert client.state()["reconnects"] >= 1

    with_client({"fault": Fault(close_mid_pdu_after_pdus=5)}, scenario)


# -- node-smpp: an SMSC that is not this project's code -------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("bind_mode", ["transceiver", "transmitter_receiver"])
def test_against_node_smpp_a_long_invitation_its_receipts_and_a_reply(bind_mode: str) -> None:
    text = (
        "【12345热线】您办理的“不动产登记”事项已办结，请您评价：回复1非常满意，2满意，3基本满意，"
        "4不满意，5非常不满意。请于2月24日18:30前回复，逾期默认“基本满意”。回复TD退订"
    )
    pieces = encode_ucs2_parts(text, 7)
    parts = [SubmitPart("13800000009", "106900123450042", p.short_message, p.esm_class) for p in pieces]
    received: list[DeliverSm] = []

    async def on_deliver(message: DeliverSm) -> None:
        received.append(message)

    async def scenario(reactor: Any, smsc: NodeSmsc, client: SmppClient, ticker: Ticker) -> None:
        await client.when_bound()
        outcomes, _ = await submit_all(reactor, client, parts)
        assert len(outcomes.ids()) == len(parts) == 2
        records = smsc.accepted()
        assert [r.message_id for r in records] == [outcomes.ids()[0], outcomes.ids()[1]]
        assert [r.concatenation.sequence for r in records if r.concatenation] == [1, 2]
        assert all(r.concatenation and r.concatenation.reference == 7 for r in records)
        assert all(r.data_coding == 8 and r.esm_class == 0x40 for r in records)
        assert "".join(r.text for r in records) == text
        await until(reactor, lambda: sum(m.is_receipt for m in received) == 2, 5, "both receipts")
        receipts = {m.receipted_message_id for m in received if m.is_receipt}
        assert receipts == set(outcomes.ids().values())
        smsc.send_mo("13800000009", "106900123450042", "１ 很满意")
        await until(reactor, lambda: any(not m.is_receipt for m in received), 5, "the reply")
        reply = next(m for m in received if not m.is_receipt)
        assert reply.short_message.decode("utf-16-be") == "１ 很满意"
        assert reply.destination_addr == "106900123450042"
        await until(reactor, lambda: all(d.status == 0 for d in smsc.deliveries()), 5, "all acknowledged")
        assert len(smsc.deliveries()) == 3

    with_client({"receipt_delay": 0.05}, scenario, on_deliver=on_deliver, peer=NodeSmsc, bind_mode=bind_mode)


@pytest.mark.slow
def test_against_node_smpp_an_unbind_or_a_dropped_session_is_followed_by_a_new_bind() -> None:
    async def scenario(reactor: Any, smsc: NodeSmsc, client: SmppClient, ticker: Ticker) -> None:
        first, _ = await submit_all(reactor, client, [part(i) for i in range(20)])
        assert len(first.ids()) == 20
        smsc.unbind()
        await until(reactor, lambda: client.state()["reconnects"] == 1, 5, "unbound")
        await until(reactor, lambda: client.state()["bound"], 5, "bound again")
        smsc.close_connection()
        await until(reactor, lambda: client.state()["reconnects"] == 2, 5, "dropped")
        second, _ = await submit_all(reactor, client, [part(i) for i in range(20, 40)])
        assert len(second.ids()) == 20
        assert smsc.acknowledged_twice() == []
        assert any(p.get("command") == "unbind_resp" for p in smsc.pdus())

    with_client({}, scenario, peer=NodeSmsc)


# -- the reactor side alone, with a Clock: no thread, no socket -----------------------------------


def test_each_submit_resolves_once_even_if_the_thread_reported_twice() -> None:
    client = SmppClient(smpp_config(1), task.Clock(), lambda m: defer.succeed(None))
    outcomes = Outcomes()
    for index in range(4):
        outcomes.watch(index, client.submit(part(index)))
    assert client.state()["queued"] == 4
    client._handle_events(
        [
            ("ok", 1, "a1"),
            ("rejected", 2, 0x0B),
            ("unknown", 3, "the link dropped"),
            ("not_submitted", 4),
            ("ok", 1, "again"),
            ("unknown", 2, "late"),
        ]
    )
    assert outcomes.results[0] == "a1"
    assert isinstance(outcomes.results[1], SubmitRejected) and outcomes.results[1].permanent
    assert isinstance(outcomes.results[2], SubmitOutcomeUnknown)
    assert isinstance(outcomes.results[3], NotSubmitted)
    assert client.state()["queued"] == 0


def test_a_deliver_sm_is_acknowledged_after_its_deferred_and_ahead_of_nothing_else() -> None:
    storing: list[defer.Deferred[None]] = []

    def on_deliver(message: DeliverSm) -> defer.Deferred[None]:
        storing.append(defer.Deferred())
        return storing[-1]

    client = SmppClient(smpp_config(1), task.Clock(), on_deliver)
    message = DeliverSm("13800000001", "1069001234500", 0, 8, "5".encode("utf-16-be"))
    client._handle_events([("deliver", 7, 41, message, "deliver_sm_resp"), ("deliver", 7, 42, message, "data_sm_resp")])
    assert len(storing) == 2 and client._link.commands.qsize() == 0  # nothing answered yet
    storing[1].callback(None)
    storing[0].errback(RuntimeError("disk full"))
    answers = [client._link.commands.get_nowait() for _ in range(2)]
    assert answers == [("ack", 7, 42, 0x00, "data_sm_resp"), ("ack", 7, 41, 0x64, "deliver_sm_resp")]


def test_a_delivery_receipt_is_told_from_a_reply() -> None:
    receipt = DeliverSm("138", "1069", 0x04, 0, b"id:a0001 stat:DELIVRD", "a0001", 2)
    intermediate = DeliverSm("138", "1069", 0x08, 0, b"", "a0001", 1)
    reply = DeliverSm("138", "1069", 0x40, 8, b"\x05\x00\x03\x01\x02\x01\x00\x35")
    assert receipt.is_receipt and intermediate.is_receipt and not reply.is_receipt


# -- an SMSC that goes silent (a small fixture of this file) -------------------------------------


class SilentSmsc:
    """Accepts connections, answers the bind (unless ``answer_bind`` is false), then reads and never answers."""

    def __init__(self, *, answer_bind: bool = True) -> None:
        self.answer_bind = answer_bind
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.commands: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> SilentSmsc:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.listener.close()

    def _serve(self) -> None:
        open_socks: list[socket.socket] = []
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                sock, _ = self.listener.accept()
                sock.settimeout(0.05)
                open_socks.append(sock)
                self.connections += 1
            for sock in list(open_socks):
                try:
                    data = sock.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    open_socks.remove(sock)
                    sock.close()
                    continue
                _, command_id, _, sequence = struct.unpack_from(">LLLL", data)
                self.commands.append(command_id)
                if command_id == 0x09 and self.answer_bind:
                    sock.sendall(encode_pdu("bind_transceiver_resp", sequence, system_id="silent"))
        for sock in open_socks:
            sock.close()


@pytest.mark.parametrize(
    ("answer_bind", "reason"),
    [(True, "stopped answering"), (False, "did not answer the transceiver bind")],
)
def test_an_smsc_that_goes_silent_is_noticed_and_reconnected(answer_bind: bool, reason: str) -> None:
    with SilentSmsc(answer_bind=answer_bind) as silent:

        async def scenario(reactor: Any) -> None:
            config = smpp_config(silent.port, enquire_link_interval=0.1, response_timeout=0.3)
            client = SmppClient(config, reactor, lambda m: defer.succeed(None))
            ticker = Ticker(reactor)
            client.startService()
            pending = Outcomes()
            watched = pending.watch(0, client.submit(part(1)))
            await until(reactor, lambda: client.state()["reconnects"] >= 2, 5, "two reconnects")
            assert reason in client.state()["last_error"]
            assert silent.connections >= 2
            await client.stopService()
            await watched
            ticker.stop()
            assert ticker.max_gap < 0.25
            # bound: the part went out and was never answered; never bound: it was never sent
            expected = SubmitOutcomeUnknown if answer_bind else NotSubmitted
            assert isinstance(pending.results[0], expected)
            if answer_bind:
                assert 0x15 in silent.commands  # enquire_link

        run_on_reactor(scenario)


@pytest.mark.parametrize(
    "command", ["deliver_sm_resp", "data_sm_resp", "enquire_link_resp", "unbind_resp", "generic_nack"]
)
@pytest.mark.parametrize(("sequence", "status"), [(1, 0), (0x7FFFFFFF, 0x64), (4242, 0x03)])
def test_answers_are_the_bytes_smpplib_builds(command: str, sequence: int, status: int) -> None:
    import smpplib.smpp

    from gateway.sms.smpp import _PARSING, _response

    reference = smpplib.smpp.make_pdu(command, client=_PARSING, status=status)
    reference.sequence = sequence
    assert _response(command, sequence, status) == reference.generate()


def test_no_wake_up_is_lost_when_a_command_comes_while_the_wake_socket_is_drained() -> None:
    """The reactor puts a command at the worst moment: while the I/O thread drains its wake-up
    socket. That command is taken, and the next one still wakes the thread at once (a lost
    wake-up left it waiting for select's one-second timeout)."""
    import random
    import select

    from gateway.sms.smpp import _Link

    link = _Link(smpp_config(1), lambda events: None, time.monotonic, random.Random(1))
    part = SubmitPart("13800138000", "10690012345", "好".encode("utf-16-be"), 0)
    wake = link._wake_r

    class RacingSocket:
        raced = False

        def recv(self, size: int) -> bytes:
            if not self.raced:
                self.raced = True
                link.command("submit", 2, part)
            return wake.recv(size)

        def fileno(self) -> int:
            return wake.fileno()

    try:
        link.command("submit", 1, part)
        link._wake_r = RacingSocket()  # type: ignore[assignment]
        link._drain_wake()
        link._take_commands(time.monotonic())
        assert [queued.token for queued in link.pending] == [1, 2]
        link.command("submit", 3, part)
        assert select.select([wake], [], [], 0)[0] == [wake]
    finally:
        wake.close()
        link._wake_w.close()


def test_answers_that_arrived_before_the_smsc_reset_the_connection_are_taken_before_the_drop() -> None:
    """SPEC R3.7: a part the SMSC acknowledged is not sent again, even when the send that finds
    the connection reset comes before the read. The SMSC answers, then closes with our next
    submit unread (so its kernel resets the connection); our send fails; the drop still reads
    the answer that sits in the socket, so only the unanswered part has an unknown outcome."""
    import random

    from gateway.sms.smpp import LinkDropped, _Client, _Connection, _Link, _Queued

    events: list[tuple[Any, ...]] = []
    link = _Link(smpp_config(1), events.extend, time.monotonic, random.Random(1))
    part = SubmitPart("13800138000", "10690012345", "好".encode("utf-16-be"), 0)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname(), timeout=5)
        theirs, _ = listener.accept()
    ours.setblocking(False)
    conn = _Connection(1, "transceiver", _Client("127.0.0.1", 1, 1.0), ours, phase="bound")
    link.connections, link.phase = [conn], "bound"
    now = time.monotonic()
    link.window.open(7, _Queued(1, part), now)
    link.window.open(8, _Queued(2, part), now)
    try:
        ours.send(encode_pdu("submit_sm", 8, 0, destination_addr="13800138000"))  # unread by the SMSC
        theirs.sendall(encode_pdu("submit_sm_resp", 7, 0, message_id="a0007"))
        time.sleep(0.05)
        theirs.close()  # unread data: the kernel answers with a reset, not a FIN
        time.sleep(0.05)
        conn.out += b"x" * 64
        with pytest.raises(LinkDropped, match="while writing") as dropped:
            link._write(conn)
        link._drop(str(dropped.value))
        link._flush_events()
    finally:
        link._wake_r.close()
        link._wake_w.close()
    assert ("ok", 1, "a0007") in events
    assert [event[:2] for event in events if event[0] == "unknown"] == [("unknown", 2)]


# -- the SMSC's other answers (found in review) ------------------------------------------------------


class _OneFullQueueSmsc(Smsc):
    """ESME_RMSGQFUL for one destination only: its store-and-forward queue is full."""

    full = "13800000000"

    def _submit(self, connection: Any, pdu: Any) -> Any:
        if pdu.fields.get("destination_addr") == self.full:
            self._record_submit(connection, pdu)
            return 0.0, encode_pdu("submit_sm_resp", pdu.sequence, smsc_module.ESME_RMSGQFUL)
        return super()._submit(connection, pdu)


def test_one_full_destination_queue_does_not_hold_the_link() -> None:
    """Issue 4: queue full slows down and drops nothing; the same part full again is its
    destination's queue, so it waits behind the others and the link keeps its pace."""

    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> Any:
        await client.when_bound()
        outcomes = Outcomes()
        outcomes.watch(-1, client.submit(part(0)))
        started = time.monotonic()
        for i in range(1, 41):
            outcomes.watch(i, client.submit(part(i)))
        await until(reactor, lambda: len([k for k in outcomes.ids() if k > 0]) == 40, 10, "the others submitted")
        took = time.monotonic() - started

        def tries() -> int:
            return len([r for r in smsc.submits() if r.destination == _OneFullQueueSmsc.full])

        await until(reactor, lambda: tries() >= 3, 10, "the full one tried again")
        return took, -1 in outcomes.results

    took, resolved = with_client({}, scenario, peer=_OneFullQueueSmsc, rate=200.0, window=10)
    assert took < 2.0 and not resolved  # the others were not held up; it is tried again, never dropped


class _LostSessionSmsc(Smsc):
    """Answers every submit of the first bind with ESME_RINVBNDSTS, as after an SMSC failover."""

    def _submit(self, connection: Any, pdu: Any) -> Any:
        if self.binds == 1:
            self._record_submit(connection, pdu)
            return 0.0, encode_pdu("submit_sm_resp", pdu.sequence, smsc_module.ESME_RINVBNDSTS)
        return super()._submit(connection, pdu)


def test_an_smsc_that_lost_the_session_gets_a_new_bind_and_the_parts_again() -> None:
    parts = [part(i) for i in range(5)]

    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> Any:
        outcomes, _ = await submit_all(reactor, client, parts)
        return outcomes, smsc.binds

    outcomes, binds = with_client({}, scenario, peer=_LostSessionSmsc)
    assert binds == 2 and len(outcomes.ids()) == 5  # none rejected, none an attempt lost


class _NackThrottlingSmsc(Smsc):
    """Throttles the first submit with a generic_nack, as some SMSCs do."""

    nacked = False

    def _submit(self, connection: Any, pdu: Any) -> Any:
        if not self.nacked:
            self.nacked = True
            self._record_submit(connection, pdu)
            return 0.0, encode_pdu("generic_nack", pdu.sequence, smsc_module.ESME_RTHROTTLED)
        return super()._submit(connection, pdu)


def test_throttling_by_generic_nack_is_throttling() -> None:
    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> Any:
        outcomes, _ = await submit_all(reactor, client, [part(1)])
        return outcomes.results[0], client.state()["throttled_total"]

    result, throttled = with_client({}, scenario, peer=_NackThrottlingSmsc)
    assert isinstance(result, str) and throttled == 1


def test_a_submit_answered_after_the_timeout_is_reported_as_timed_out() -> None:
    """The link stayed up: the service then spaces and bounds its copies (tests/test_sms_service.py)."""

    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> Any:
        outcomes, _ = await submit_all(reactor, client, [part(1)])
        return outcomes.results[0]

    result = with_client({"fault": Fault(response_delay=0.6)}, scenario, response_timeout=0.3)
    assert isinstance(result, SubmitTimedOut)


def test_answers_go_ahead_of_the_bulk_parts_waiting_and_bulk_can_be_withdrawn() -> None:
    """SPEC R3.7a: replies ahead of bulk; R3.2: bulk not written yet goes back when asked."""
    bulk = [part(i) for i in range(8)]
    answer = dataclasses.replace(part(99), urgent=True)

    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> Any:
        await client.when_bound()
        outcomes = Outcomes()
        for i, p in enumerate(bulk):
            outcomes.watch(i, client.submit(p))
        outcomes.watch(99, client.submit(answer))
        await sleep(reactor, 0.25)  # at 10/s, two or three bulk parts went first
        client.withdraw_bulk()
        await until(reactor, lambda: len(outcomes.results) == 9, 5, "every submit resolved")
        return outcomes, [r.destination for r in smsc.submits()]

    outcomes, order = with_client({}, scenario, rate=10.0)
    assert order.index(answer.destination) <= 2  # not behind the eight bulk parts
    withdrawn = outcomes.of_kind(NotSubmitted)
    assert withdrawn and 99 not in withdrawn and len(outcomes.ids()) + len(withdrawn) == 9
    assert {bulk[i].destination for i in withdrawn}.isdisjoint(order)  # never written


class _HalfOpenSmsc(Smsc):
    """After the bind nothing comes back: a firewall or NAT dropped the flow, the socket stays open."""

    def _answer(self, connection: Any, pdu: Any) -> Any:
        return super()._answer(connection, pdu) if pdu.command.startswith("bind_") else None


def test_a_dead_link_is_told_from_a_slow_smsc() -> None:
    """A submit unanswered in time is a SubmitTimedOut (spaced, bounded copies) only if a probe
    shows the link alive; on a dead link its outcome is unknown, and it goes again on the next."""

    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> Any:
        outcomes, _ = await submit_all(reactor, client, [part(1)])
        return outcomes.results[0]

    result = with_client({}, scenario, peer=_HalfOpenSmsc, response_timeout=0.3, enquire_link_interval=5.0)
    assert isinstance(result, SubmitOutcomeUnknown) and not isinstance(result, SubmitTimedOut)


def test_a_part_to_a_full_handset_waits_longer_each_time() -> None:
    """Issue 4: never dropped, but not sent again as fast as the pace allows either."""

    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> Any:
        await client.when_bound()
        outcomes = Outcomes()
        outcomes.watch(0, client.submit(part(0)))
        await sleep(reactor, 2.0)
        return len([r for r in smsc.submits() if r.destination == _OneFullQueueSmsc.full]), dict(outcomes.results)

    tries, results = with_client({}, scenario, peer=_OneFullQueueSmsc, rate=50.0, window=10)
    assert 2 <= tries < 10 and results == {}  # still waiting for its turn, not given up


def test_an_smsc_wide_queue_full_slows_the_link_like_throttling() -> None:
    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> Any:
        await client.when_bound()
        outcomes = Outcomes()
        for i in range(3):
            outcomes.watch(i, client.submit(part(i)))
        await sleep(reactor, 2.0)
        return len(smsc.submits())

    submits = with_client(
        {"fault": Fault(queue_full=during(0, 2.0))}, scenario, rate=50.0, window=10, throttle_delay=0.5
    )
    assert submits < 20


def test_an_smsc_that_takes_a_while_to_find_the_session_again_gets_the_parts_at_last() -> None:
    """ESME_RINVBNDSTS is the link's trouble, not the message's: rebinds, backing off, never a refusal."""

    class LostUntilFifthBind(Smsc):
        def _submit(self, connection: Any, pdu: Any) -> Any:
            if self.binds <= 4:
                self._record_submit(connection, pdu)
                return 0.0, encode_pdu("submit_sm_resp", pdu.sequence, smsc_module.ESME_RINVBNDSTS)
            return super()._submit(connection, pdu)

    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> Any:
        outcomes, _ = await submit_all(reactor, client, [part(i) for i in range(5)])
        return outcomes, smsc.binds

    outcomes, binds = with_client({}, scenario, peer=LostUntilFifthBind, window=10, rate=1000.0)
    assert binds == 5 and len(outcomes.ids()) == 5


class _SlowInOrderSmsc(Smsc):
    """A busy SMSC answering in order: the keep-alive's answer comes after the submit's late one."""

    def _answer(self, connection: Any, pdu: Any) -> Any:
        if pdu.command == "enquire_link":
            return 0.25, encode_pdu("enquire_link_resp", pdu.sequence)
        return super()._answer(connection, pdu)


def test_a_late_acknowledgement_before_the_probe_answers_is_kept() -> None:
    """SPEC R3.7: the SMSC took the part; its late ESME_ROK must not be dropped and the part sent again."""

    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> Any:
        outcomes, _ = await submit_all(reactor, client, [part(1)])
        return outcomes.results[0], [r.status for r in smsc.submits()]

    result, statuses = with_client(
        {"fault": Fault(response_delay=0.5)}, scenario, peer=_SlowInOrderSmsc, response_timeout=0.3
    )
    assert statuses == [0] and isinstance(result, str)


def test_a_part_full_a_thousand_times_still_waits_its_turn(caplog: pytest.LogCaptureFixture) -> None:
    """The pause stops growing: 2**1024 overflowed a float and stopped the link's loop."""

    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> Any:
        await client.when_bound()
        outcomes = Outcomes()
        outcomes.watch(0, client.submit(part(0)))

        def tries() -> int:
            return len([r for r in smsc.submits() if r.destination == _OneFullQueueSmsc.full])

        await until(reactor, lambda: tries() >= 1030 or "loop_error" in caplog.text, 60, "a thousand tries")
        return dict(outcomes.results)

    results = with_client(
        {}, scenario, peer=_OneFullQueueSmsc, rate=20000.0, window=10, throttle_delay=1e-5, throttle_max_delay=2e-5
    )
    assert "loop_error" not in caplog.text and results == {}


def test_a_nack_on_the_receiver_of_a_pair_is_no_answer_to_a_submit() -> None:
    """Both binds of a pair number their requests from 1: the receiver's enquire_link refused by
    generic_nack must not fail the transmitter's submit of the same sequence number."""

    class NackReceiverKeepAlive(Smsc):
        nacked: ClassVar[list[int]] = []

        def _answer(self, connection: Any, pdu: Any) -> Any:
            if pdu.command == "enquire_link" and connection.mode == "receiver":
                self.nacked.append(pdu.sequence)
                return 0.0, encode_pdu("generic_nack", pdu.sequence, smsc_module.ESME_RINVCMDID)
            return super()._answer(connection, pdu)

    parts = [part(i) for i in range(6)]

    async def scenario(reactor: Any, smsc: Smsc, client: SmppClient, ticker: Ticker) -> Any:
        await client.when_bound()
        outcomes, _ = await submit_all(reactor, client, parts)  # answered late: the receiver's keep-alive goes first
        return outcomes, list(NackReceiverKeepAlive.nacked)

    outcomes, nacked = with_client(
        {"fault": Fault(response_delay=0.3)},
        scenario,
        peer=NackReceiverKeepAlive,
        bind_mode="transmitter_receiver",
        enquire_link_interval=0.05,
    )
    assert nacked and len(outcomes.ids()) == 6
