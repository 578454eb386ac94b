"""The gateway's own durable SMS sender, as a sender of bench/sms.py.

Unlike the peers it persists everything: the messages are rows in a SQLite store first; the
gateway's :class:`gateway.sms.service.SmsService` leases them, submits them through its
:class:`gateway.sms.smpp.SmppClient`, keeps each part's SMSC message id and marks each message
``submitted`` in group commits. The clock stops when the store says every message is
submitted: store → SMSC → acknowledged → store updated. The reactor is the one ``gateway run``
uses (epoll), a fresh one per run.
"""

from __future__ import annotations

import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select
from twisted.internet import defer
from twisted.internet.epollreactor import EPollReactor

from gateway.config import load_config
from gateway.privacy import normalise_phone
from gateway.sms.service import SmsService
from gateway.sms.settings import SmsSettings
from gateway.sms.smpp import SmppClient
from gateway.workdays import WorkingDayCalendar
from storage.deferred import DeferredStore
from storage.schema import messages
from storage.sms import SmsStore
from storage.store import Store


def queue_messages(store: Store, phones: list[str], body: str, source: str) -> None:
    """Put the messages in the store as the scheduler would: queued, due now."""
    now = datetime.now(UTC)
    protector = store.protector
    rows = []
    for phone in phones:
        e164 = normalise_phone(phone)
        rows.append(
            {
                "direction": "out",
                "kind": "invitation",
                "phone_enc": protector.encrypt(e164),
                "phone_hash": protector.lookup_hash(e164),
                "body": body,
                "status": "queued",
                "attempts": 0,
                "send_after": now,
                "priority": 5,
                "source_addr": source,
                "created_at": now,
                "updated_at": now,
            }
        )
    with store.engine.begin() as connection:
        for start in range(0, len(rows), 5000):
            connection.execute(insert(messages), rows[start : start + 5000])


def submitted(store: Store) -> int:
    with store.engine.connect() as connection:
        return int(
            connection.execute(
                select(func.count()).select_from(messages).where(messages.c.status.in_(("submitted", "delivered")))
            ).scalar()
            or 0
        )


class TimingClient:
    """The real client, noting when each part is acknowledged (for the rate report)."""

    def __init__(self, client: SmppClient) -> None:
        self.client = client
        self.acknowledged_at: list[float] = []

    def submit(self, part: Any) -> defer.Deferred[str]:
        def note(message_id: str) -> str:
            self.acknowledged_at.append(time.monotonic())
            return message_id

        return self.client.submit(part).addCallback(note)

    def state(self) -> dict[str, Any]:
        return self.client.state()


def run_gateway_sender(
    host: str,
    port: int,
    system_id: str,
    password: str,
    phones: list[str],
    body: str,
    *,
    rate: float | None,
    window: int = 100,
    receipts: bool = False,
    timeout: float = 900.0,
) -> tuple[int, float, list[float]]:
    """Send ``body`` to each phone through the gateway; (submitted, seconds, acknowledgement times)."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-sms-"))
    config = load_config(
        None,
        environ={
            "GATEWAY_STORE_DATA_DIR": str(workdir),
            "GATEWAY_STORE_URL": f"sqlite:///{workdir / 'gateway.sqlite3'}",
            "GATEWAY_SMPP_ENABLED": "true",
            "GATEWAY_SMPP_HOST": host,
            "GATEWAY_SMPP_PORT": str(port),
            "GATEWAY_SMPP_SYSTEM_ID": system_id,
            "GATEWAY_SMPP_PASSWORD": password,
            "GATEWAY_SMPP_WINDOW": str(window),
            "GATEWAY_SMPP_RATE": str(rate or 1_000_000),
            "GATEWAY_SMS_DELIVERY_RECEIPTS": "true" if receipts else "false",
            "GATEWAY_SMS_QUIET_HOURS": "",  # the queued invitations go at any hour of the run
        },
    )
    store = Store.from_config(config)
    settings = SmsSettings.from_config(config)
    queue_messages(store, phones, body, settings.source_addr)
    reactor = EPollReactor()
    outcome: dict[str, Any] = {}

    async def scenario() -> None:
        deferred_store = DeferredStore(store, reactor, config.store.threads)
        sms: list[SmsService] = []
        client = TimingClient(SmppClient(config.smpp, reactor, lambda pdu: sms[0].on_deliver(pdu)))
        in_flight = min(2000, max(window * 4, int((rate or 1e9) * 30)))
        service = SmsService(
            SmsStore(store, settings, WorkingDayCalendar()),
            deferred_store,
            client,
            reactor,
            max_in_flight=in_flight,
            claim_batch=1000,
        )
        sms.append(service)
        deferred_store.startService()
        client.client.startService()
        await client.client.when_bound()
        started = time.monotonic()
        service.startService()
        deadline = started + timeout
        while True:
            done = await deferred_store.run(submitted, store)
            if done >= len(phones) or time.monotonic() > deadline:
                break
            waiting: defer.Deferred[None] = defer.Deferred()
            reactor.callLater(0.02, waiting.callback, None)
            await waiting
        outcome["seconds"] = time.monotonic() - started
        outcome["submitted"] = done
        outcome["times"] = client.acknowledged_at
        await service.stopService()
        await client.client.stopService()
        await deferred_store.stopService()

    def run() -> None:
        defer.ensureDeferred(scenario()).addErrback(lambda f: outcome.setdefault("error", f)).addBoth(
            lambda _: reactor.stop()
        )

    reactor.callWhenRunning(run)
    reactor.run(installSignalHandlers=False)
    store.engine.dispose()
    if "error" in outcome:
        outcome["error"].raiseException()
    return outcome["submitted"], outcome["seconds"], outcome["times"]
