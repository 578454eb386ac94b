"""The SMS channel whole: store → SMPP client → a real SMSC → receipts and replies → store.

Two SMSCs: the npm ``smpp`` package's server (third-party code, gateway/testing/node_smsc) and
the project's fault-injecting peer (gateway/testing/smsc.py). The gateway's own parts are the
real ones: SQLite store in worker threads, :class:`SmsService`, :class:`SmppClient`, each test
on a reactor of its own. In every fault case: every accepted invitation reaches the SMSC, and
no part acknowledged by the SMSC is sent again (SPEC R3.7).
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from gateway.config import load_config
from gateway.intake import ServiceRecordInput
from gateway.rating import ServiceKind
from gateway.sms.service import build_sms_service
from gateway.sms.text import encode_ucs2_parts
from gateway.testing.node_smsc import NodeSmsc
from gateway.testing.reactor import run_on_reactor, sleep, wait_until
from gateway.testing.smsc import Fault, Smsc, every, nth
from gateway.workdays import SHANGHAI, WorkingDayCalendar
from storage.deferred import DeferredStore
from storage.schema import message_parts, messages, ratings
from storage.sms import concat_reference
from storage.store import Store

pytestmark = pytest.mark.timeout(90)


def config_for(port: int, **smpp: str) -> Any:
    environ = {
        "GATEWAY_SMPP_ENABLED": "true",
        "GATEWAY_SMPP_HOST": "127.0.0.1",
        "GATEWAY_SMPP_PORT": str(port),
        "GATEWAY_SMPP_SYSTEM_ID": "gateway",
        "GATEWAY_SMPP_PASSWORD": "secret",
        "GATEWAY_SMPP_RATE": "500",
        "GATEWAY_SMPP_WINDOW": "10",
        "GATEWAY_SMPP_RESPONSE_TIMEOUT": "1s",
        "GATEWAY_SMPP_RECONNECT_MIN_DELAY": "0.1s",
        "GATEWAY_SMPP_RECONNECT_MAX_DELAY": "0.5s",
        "GATEWAY_SMPP_THROTTLE_DELAY": "0.05s",
        "GATEWAY_SMPP_THROTTLE_MAX_DELAY": "0.2s",
        "GATEWAY_SMS_INVITE_DELAY": "0s",
        "GATEWAY_SMS_QUIET_HOURS": "",
        **{f"GATEWAY_SMPP_{key.upper()}": value for key, value in smpp.items()},
    }
    return load_config(None, environ=environ)


def complete_records(store: Store, count: int, *, at: datetime | None = None) -> None:
    at = at or datetime.now(UTC) - timedelta(minutes=1)
    store.upsert_service_records(
        [
            ServiceRecordInput(
                id=f"M-{n}",
                kind=ServiceKind.MATTER,
                completed_at=at,
                mobile=f"+86138{n:08d}",
                matter_name="不动产登记",
            )
            for n in range(count)
        ]
    )


def count(store: Store, table: Any, *where: Any) -> int:
    with store.engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(table).where(*where)).scalar() or 0)


class Running:
    """The SMS service on a reactor, with the store in its threads."""

    def __init__(self, reactor: Any, store: Store, config: Any) -> None:
        self.store = store
        self.deferred_store = DeferredStore(store, reactor, 4)
        self.sms = build_sms_service(config, reactor, store, self.deferred_store, WorkingDayCalendar())
        self.sms.interval = 0.2

    def start(self) -> None:
        self.deferred_store.startService()
        self.sms.startService()

    async def stop(self) -> None:
        await self.sms.stopService()
        await self.deferred_store.stopService()


def parts_of_all(store: Store) -> set[tuple[str, int]]:
    """(destination, part text) of every part the store holds to send."""
    with store.engine.connect() as connection:
        rows = connection.execute(select(messages.c.id, messages.c.body, messages.c.phone_enc)).all()
    expected = set()
    for message_id, body, phone_enc in rows:
        destination = store.protector.decrypt(phone_enc).removeprefix("+86")
        for part in encode_ucs2_parts(body, concat_reference(message_id, 0)):
            expected.add((destination, part.short_message))
    return expected


def test_long_chinese_invitation_receipt_and_reply_through_the_npm_smpp_server(tmp_path: Path) -> None:
    store = Store.from_config(load_config(None, environ={"GATEWAY_STORE_URL": f"sqlite:///{tmp_path / 'g.db'}"}))
    complete_records(store, 1)
    with NodeSmsc(receipt_delay=0.05) as smsc:
        config = config_for(smsc.port)

        async def scenario(reactor: Any) -> None:
            running = Running(reactor, store, config)
            running.start()
            try:
                await wait_until(reactor, lambda: count(store, messages, messages.c.status == "delivered") == 1)
                submits = smsc.submits()
                assert len(submits) == 2  # the invitation: two concatenated UCS2 parts (SPEC R3.1)
                assert all(s.data_coding == 8 and s.esm_class & 0x40 for s in submits)
                udh = [s.concatenation for s in submits]
                assert [(c.total, c.sequence) for c in udh] == [(2, 1), (2, 2)]  # type: ignore[union-attr]
                assert udh[0].reference == udh[1].reference  # type: ignore[union-attr]
                text = "".join(s.text for s in submits)
                assert text.startswith("【12345热线】") and "不动产登记" in text
                assert submits[0].destination == "13800000000"
                source = submits[0].source
                assert count(store, message_parts, message_parts.c.status == "delivered") == 2  # per part (R3.7)

                smsc.send_mo("8613800000000", source, "1 办事很快")  # to the extension code (R3.6)
                await wait_until(reactor, lambda: count(store, ratings) == 1)
                await wait_until(reactor, lambda: len(smsc.submits()) == 3)
                assert "已收到" in smsc.submits()[2].text  # thanked
                replies = [d for d in smsc.deliveries() if d.kind == "mo"]
                await wait_until(reactor, lambda: all(d.status == 0 for d in smsc.deliveries() if d.kind == "mo"))
                assert replies and smsc.acknowledged_twice() == []
            finally:
                await running.stop()

        run_on_reactor(scenario, timeout=30)
    with store.engine.connect() as connection:
        rating = connection.execute(select(ratings)).mappings().one()
    assert rating["level"] == 5 and rating["channel"] == "sms" and rating["comment"] == "办事很快"


FAULTS = {
    "disconnect_after_5_pdus": Fault(disconnect_after_pdus=5, disconnect_times=2),
    "throttled_every_3rd": Fault(throttled=every(3)),
    "queue_full_2nd_to_6th": Fault(queue_full=nth(2, 3, 4, 5, 6)),
    "no_response_to_4th": Fault(unanswered=nth(4)),
    "slow_responses": Fault(response_delay=0.2),
    "garbage_after_7_pdus": Fault(garbage_after_pdus=7),
    "smsc_unbinds_after_6": Fault(unbind_after_pdus=6),
    "closed_mid_pdu_after_8": Fault(close_mid_pdu_after_pdus=8),
}

#: Faults where the SMSC accepts a part but its answer never reaches the gateway whole (cut in
#: half). After garbage or the SMSC's own unbind the client still reads the answers that come.
ANSWERS_CUT = {"closed_mid_pdu_after_8"}


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_faults_lose_nothing_and_never_resend_an_acknowledged_part(tmp_path: Path, name: str) -> None:
    store = Store.from_config(load_config(None, environ={"GATEWAY_STORE_URL": f"sqlite:///{tmp_path / 'g.db'}"}))
    complete_records(store, 12)
    with Smsc(fault=FAULTS[name]) as smsc:
        config = config_for(smsc.port)

        async def scenario(reactor: Any) -> None:
            running = Running(reactor, store, config)
            running.start()
            try:
                await wait_until(
                    reactor,
                    lambda: count(store, messages, messages.c.status.in_(("submitted", "delivered"))) == 12,
                    timeout=20,
                    what="every invitation submitted",
                )
            finally:
                await running.stop()

        run_on_reactor(scenario, timeout=40)
        accepted = smsc.accepted()
        keys = Counter((s.destination, s.short_message) for s in accepted)
        assert set(keys) == parts_of_all(store)  # every part of every invitation arrived
        # The gateway re-sends a part only while it has read no answer for it, so the answer it
        # kept is the last one the SMSC gave for each part (R3.7).
        with store.engine.connect() as connection:
            kept = set(connection.execute(select(message_parts.c.smsc_id_raw)).scalars())
        last_by_key = {(s.destination, s.short_message): s.message_id for s in accepted}
        assert kept == set(last_by_key.values())
        if name not in ANSWERS_CUT:
            assert smsc.acknowledged_twice() == []  # every answer was readable: nothing sent twice
    assert count(store, message_parts) == len(keys)


def test_wrong_password_sends_nothing_and_says_why(tmp_path: Path) -> None:
    store = Store.from_config(load_config(None, environ={"GATEWAY_STORE_URL": f"sqlite:///{tmp_path / 'g.db'}"}))
    complete_records(store, 2)
    with Smsc(password="other") as smsc:
        config = config_for(smsc.port)

        async def scenario(reactor: Any) -> dict[str, Any]:
            running = Running(reactor, store, config)
            running.start()
            try:
                await sleep(reactor, 1.0)
                return running.sms.state()
            finally:
                await running.stop()

        state = run_on_reactor(scenario, timeout=20)
        assert smsc.accepted() == []
    assert state["bound"] is False and state["status"] == "down"
    assert "RINVPASWD" in str(state["last_error"]) or "password" in str(state["last_error"]).lower()
    assert count(store, messages, messages.c.status == "queued") == 2  # kept, not lost


def test_reply_in_two_parts_through_the_npm_server_becomes_one_rating(tmp_path: Path) -> None:
    store = Store.from_config(load_config(None, environ={"GATEWAY_STORE_URL": f"sqlite:///{tmp_path / 'g.db'}"}))
    complete_records(store, 1, at=datetime.now(SHANGHAI) - timedelta(minutes=1))
    with NodeSmsc() as smsc:
        config = config_for(smsc.port)

        async def scenario(reactor: Any) -> None:
            running = Running(reactor, store, config)
            running.start()
            try:
                await wait_until(
                    reactor, lambda: count(store, messages, messages.c.status.in_(("submitted", "delivered"))) == 1
                )
                text = "4 " + "排队时间太长了，" * 10
                raw = text.encode("utf-16-be")
                for seq, chunk in enumerate((raw[:134], raw[134:]), start=1):
                    smsc.send_mo("13800000000", "10690012345", payload=chunk, udh=bytes([5, 0, 3, 42, 2, seq]))
                await wait_until(reactor, lambda: count(store, ratings) == 1)
            finally:
                await running.stop()

        run_on_reactor(scenario, timeout=30)
    with store.engine.connect() as connection:
        rating = connection.execute(select(ratings)).mappings().one()
    assert rating["level"] == 2 and rating["comment"].startswith("排队时间太长了")


@pytest.mark.postgresql
def test_two_instances_on_postgresql_send_each_invitation_once(postgresql_fresh_url: str) -> None:
    stores = [
        Store.from_config(load_config(None, environ={"GATEWAY_STORE_URL": postgresql_fresh_url})) for _ in range(2)
    ]
    complete_records(stores[0], 40)
    with Smsc() as smsc:
        config = config_for(smsc.port)

        async def scenario(reactor: Any) -> None:
            instances = [Running(reactor, store, config) for store in stores]
            for instance in instances:
                instance.start()
            try:
                await wait_until(
                    reactor,
                    lambda: count(stores[0], messages, messages.c.status.in_(("submitted", "delivered"))) == 40,
                    timeout=20,
                )
            finally:
                for instance in instances:
                    await instance.stop()

        run_on_reactor(scenario, timeout=40)
        assert smsc.acknowledged_twice() == []
        assert len(smsc.accepted()) == len(parts_of_all(stores[0])) == 80
        assert smsc.binds >= 2  # both instances were connected and sending
    assert count(stores[0], messages) == 40


def test_gateway_run_sends_resumes_after_a_restart_and_records_the_reply(tmp_path: Path) -> None:
    """``gateway run`` with [smpp] enabled: intake → invitation → SIGTERM mid-way → restart → reply."""
    import signal
    import time
    import urllib.request

    from tests.test_gateway_process import start_gateway

    with Smsc(fault=Fault(response_delay=0.05)) as smsc:
        env = {
            "GATEWAY_SMPP_ENABLED": "true",
            "GATEWAY_SMPP_PORT": str(smsc.port),
            "GATEWAY_SMPP_SYSTEM_ID": "gateway",
            "GATEWAY_SMPP_PASSWORD": "secret",
            "GATEWAY_SMPP_RATE": "10",  # slow enough to stop it mid-way on a loaded machine
            "GATEWAY_SMS_INVITE_DELAY": "0s",
            "GATEWAY_SMS_QUIET_HOURS": "",
        }
        first = start_gateway(tmp_path, env)
        try:
            token = first.cli("token", "create", "--role", "intake", "--name", "crm").stdout.strip()
            completed_at = datetime.now(SHANGHAI).isoformat()
            records = [
                {"id": f"R-{n}", "kind": "matter", "mobile": f"138{n:08d}", "completed_at": completed_at}
                for n in range(30)
            ]
            status, body = first.request("POST", "/v1/service-records", {"records": records}, token=token)
            assert status in (200, 201, 207), body
            smsc.wait_for(lambda: len(smsc.accepted()) >= 10, timeout=20)
            first.process.send_signal(signal.SIGTERM)
            assert first.process.wait(timeout=30) == 0
        finally:
            if first.process.poll() is None:  # a failed assertion must not leave it running
                first.process.kill()
                first.process.wait(timeout=10)
        sent_before = len(smsc.accepted())
        assert sent_before < 60  # stopped mid-way: 30 invitations are 60 parts

        second = start_gateway(tmp_path, env)
        try:
            smsc.wait_for(lambda: len(smsc.accepted()) >= 60, timeout=30)
            time.sleep(0.5)
            assert len(smsc.accepted()) == 60 and smsc.acknowledged_twice() == []
            status, health = second.request("GET", "/health")
            assert health["components"]["smsc"]["bound"] is True
            counts = health["components"]["smsc"]["messages"]
            assert counts.get("submitted", 0) + counts.get("delivered", 0) == 30
            with urllib.request.urlopen(second.base + "/metrics", timeout=10) as response:
                metrics = response.read().decode()
            assert "hcp_smpp_bound 1.0" in metrics and "hcp_smpp_window 10.0" in metrics
            assert "hcp_smpp_rate_per_second 10.0" in metrics
            smsc.send_mo("13800000007", smsc.accepted()[0].source[:11], "2")
            smsc.wait_for(lambda: len(smsc.accepted()) == 61, timeout=10)  # the thanks
            assert "已收到" in smsc.accepted()[-1].text
        finally:
            second.process.send_signal(signal.SIGTERM)
            second.process.wait(timeout=30)
        log = first.log.read_text() + second.log.read_text()
        assert "13800000007" not in log and "event=sms" in log
