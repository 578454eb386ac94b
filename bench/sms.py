"""SMS sending benchmark: named senders against the node SMSC (npm ``smpp``) on loopback.

    .venv/bin/python bench/sms.py                          # every sender, 20,000 messages each
    .venv/bin/python bench/sms.py --messages 5000 --senders smpplib-naive,aiosmpplib-window
    .venv/bin/python bench/sms.py --rate 200 --duration 60 --senders smpplib-window

Each sender sends N single-part UCS-2 Chinese invitations (data_coding 8, no receipt asked)
to distinct phones through one SMPP bind, and counts the ``submit_sm_resp`` it gets. The peers
persist nothing (issue 4 compares them with the gateway's durable sender):

- ``smpplib-naive``: smpplib 2.2.4, send one ``submit_sm``, wait for its response, repeat.
- ``smpplib-window``: smpplib, up to 100 submits outstanding, all I/O in one thread.
- ``aiosmpplib-window``: aiosmpplib 0.7.4 (the ``bench`` extra), 100 outstanding, with its
  correlator fixed (see :class:`DeleteOnMatchCorrelator`) and the parts made by
  :func:`gateway.sms.text.encode_ucs2_parts`, since its own splitting is unreliable.

Checked on every run: every message was acknowledged ESME_ROK, from the sender's side and from
the SMSC's own counts. ``--rate R --duration D`` paces the senders at R messages/s for D seconds
and reports the achieved rate and its deviation from R (:func:`rate_report`); the lead holds
the gateway's configured rate to within 2 % over a minute with the same function.

To add a sender: write ``def my_sender(target: Target, messages: list[Message], pace: Pacer | None)
-> SendResult`` and list it in :data:`SENDERS`.
"""

from __future__ import annotations

import argparse
import asyncio
import select
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.sms.text import encode_ucs2_parts  # noqa: E402
from gateway.testing.node_smsc import NodeSmsc  # noqa: E402

#: A short invitation that fits one UCS-2 part (at most 70 characters).
INVITATION = "【12345热线】您的来电已办结，请回复1-5评价：1非常满意2满意3基本满意4不满意5非常不满意。回复TD退订"
SERVICE_NUMBER = "10690012345"
WINDOW = 100
SYSTEM_ID = "bench"
PASSWORD = "bench"


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    system_id: str = SYSTEM_ID
    password: str = PASSWORD


@dataclass(frozen=True)
class Message:
    """One part to submit: its phone, the UDH-prefixed short message and esm_class."""

    destination: str
    short_message: bytes
    esm_class: int


@dataclass
class SendResult:
    acknowledged: int = 0  # submit_sm_resp with ESME_ROK
    errors: int = 0  # any other status
    send_times: list[float] = field(default_factory=list)  # time.monotonic() of each submit written
    # Set by a sender whose set-up is not sending (the gateway's store is created and filled
    # first): the seconds from its first submit to its last acknowledgement kept.
    seconds: float | None = None


def make_messages(count: int, text: str = INVITATION) -> list[Message]:
    messages = []
    for number in range(count):
        phone = f"138{number:08d}"
        for part in encode_ucs2_parts(text, reference=number % 256):
            messages.append(Message(phone, part.short_message, part.esm_class))
    return messages


class Pacer:
    """Sending at a configured rate: message i is due at ``start + i / rate``."""

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("The rate must be positive (messages per second).")
        self.rate = rate
        self.start: float | None = None  # the first call: a sender's set-up time is not owed back

    def wait_before(self, index: int) -> float:
        """Seconds until message ``index`` is due (0 when it is due already)."""
        now = time.monotonic()
        if self.start is None:
            self.start = now - index / self.rate
        return max(0.0, self.start + index / self.rate - now)


@dataclass(frozen=True)
class RateReport:
    target: float
    achieved: float  # messages/s over the whole window
    deviation: float  # (achieved - target) / target
    worst_slice: float  # the largest |deviation| of any full 10-second slice, 0 if none
    messages: int
    seconds: float


def rate_report(send_times: list[float], rate: float, duration: float | None = None, slice_seconds: float = 10.0):
    """How well a sender held ``rate``: the achieved messages/s over the window and its deviation.

    The window starts at the first send and lasts ``duration`` seconds (default: to the last
    send, counting intervals, so n sends over t seconds is (n - 1) / t). Only sends inside the
    window count, so a sender that runs long is not flattered. The issue's goal is
    ``abs(report.deviation) <= 0.02`` over a minute.
    """
    if len(send_times) < 2:
        raise ValueError("At least two send times are needed to measure a rate.")
    times = sorted(send_times)
    start = times[0]
    if duration is None:
        seconds = times[-1] - start
        count = len(times) - 1
    else:
        seconds = duration
        count = sum(1 for moment in times if moment < start + duration)
    achieved = count / seconds
    worst = 0.0
    slices = int(seconds // slice_seconds)
    for index in range(slices):
        low, high = start + index * slice_seconds, start + (index + 1) * slice_seconds
        in_slice = sum(1 for moment in times if low <= moment < high)
        worst = max(worst, abs(in_slice / slice_seconds - rate) / rate)
    return RateReport(rate, achieved, (achieved - rate) / rate, worst, count, seconds)


# ---------------------------------------------------------------------------------------------
# Senders
# ---------------------------------------------------------------------------------------------


def _smpplib_client(target: Target):
    import smpplib.client

    client = smpplib.client.Client(target.host, target.port, timeout=10, allow_unknown_opt_params=True)
    client.connect()
    client.bind_transceiver(system_id=target.system_id, password=target.password)
    return client


def _smpplib_submit(client, message: Message) -> None:
    client.send_message(
        source_addr=SERVICE_NUMBER,
        destination_addr=message.destination,
        short_message=message.short_message,
        esm_class=message.esm_class,
        data_coding=8,
        registered_delivery=0,
    )


def _smpplib_counting(client, result: SendResult) -> None:
    def sent(pdu, **_kwargs) -> None:
        if pdu.status == 0:
            result.acknowledged += 1
        else:
            result.errors += 1

    client.set_message_sent_handler(sent)
    client.set_error_pdu_handler(lambda pdu: None)  # error responses reach `sent` too (LIBRARIES.md)


def _smpplib_close(client) -> None:
    try:
        client.unbind()
    finally:
        client.disconnect()


def smpplib_naive(target: Target, messages: list[Message], pace: Pacer | None = None) -> SendResult:
    """Send one, wait for its response, send the next."""
    result = SendResult()
    client = _smpplib_client(target)
    _smpplib_counting(client, result)
    try:
        for index, message in enumerate(messages):
            if pace is not None:
                time.sleep(pace.wait_before(index))
            answered = result.acknowledged + result.errors
            result.send_times.append(time.monotonic())
            _smpplib_submit(client, message)
            while result.acknowledged + result.errors == answered:
                client.read_once()
    finally:
        _smpplib_close(client)
    return result


def smpplib_window(target: Target, messages: list[Message], pace: Pacer | None = None) -> SendResult:
    """Keep up to WINDOW submits outstanding; read a response whenever the window is full."""
    result = SendResult()
    client = _smpplib_client(target)
    _smpplib_counting(client, result)
    sent = 0
    try:
        while result.acknowledged + result.errors < len(messages):
            outstanding = sent - result.acknowledged - result.errors
            wait = pace.wait_before(sent) if pace is not None and sent < len(messages) else 0.0
            if sent < len(messages) and outstanding < WINDOW and wait == 0.0:
                result.send_times.append(time.monotonic())
                _smpplib_submit(client, messages[sent])
                sent += 1
                continue
            if outstanding == 0:
                time.sleep(wait)
                continue
            if wait > 0 and not select.select([client._socket], [], [], wait)[0]:
                continue
            client.read_once()
    finally:
        _smpplib_close(client)
    return result


class DeleteOnMatchCorrelator:
    """aiosmpplib's SimpleCorrelator, fixed for volume (LIBRARIES.md).

    Stock, it keeps every accepted submit for 3 days for receipt correlation and scans all it
    holds on every put and get, so throughput falls with volume. Here a submit that asked for
    no receipt is not kept, responses are still deleted as they match, and expired entries are
    swept at most once a second.
    """

    @staticmethod
    def create(name: str):
        from aiosmpplib.correlator import SimpleCorrelator

        class _Correlator(SimpleCorrelator):
            _last_sweep = 0.0

            async def put_delivery(self, smsc_message_id, submit_sm) -> None:
                if submit_sm.registered_delivery & 0x03:
                    await super().put_delivery(smsc_message_id, submit_sm)

            async def _remove_expired(self) -> None:
                now = time.monotonic()
                if now - self._last_sweep >= 1.0:
                    self._last_sweep = now
                    await super()._remove_expired()

        return _Correlator(name)


def aiosmpplib_window(target: Target, messages: list[Message], pace: Pacer | None = None) -> SendResult:
    """aiosmpplib's ESME with a window of WINDOW, enforced through its hook and broker."""
    return asyncio.run(_aiosmpplib_window(target, messages, pace))


async def _aiosmpplib_window(target: Target, messages: list[Message], pace: Pacer | None) -> SendResult:
    import logging

    from aiosmpplib import ESME, AbstractHook, PhoneNumber, SubmitSm, SubmitSmResp
    from aiosmpplib.broker import SimpleBroker

    result = SendResult()
    window = asyncio.Semaphore(WINDOW)
    done = asyncio.Event()

    class CountingHook(AbstractHook):
        async def sending(self, smpp_message, pdu, client_id) -> None:
            if isinstance(smpp_message, SubmitSm):
                result.send_times.append(time.monotonic())

        async def received(self, smpp_message, pdu, client_id) -> None:
            if isinstance(smpp_message, SubmitSmResp):
                if smpp_message.command_status == 0:
                    result.acknowledged += 1
                else:
                    result.errors += 1
                window.release()
                if result.acknowledged + result.errors == len(messages):
                    done.set()

        async def send_error(self, smpp_message, error, client_id) -> None:
            if error is not None:
                result.errors += 1
                window.release()

    broker = SimpleBroker(maxsize=WINDOW * 2)
    esme = ESME(
        smsc_host=target.host,
        smsc_port=target.port,
        system_id=target.system_id,
        password=target.password,
        hook=CountingHook(),
        broker=broker,
        correlator=DeleteOnMatchCorrelator.create(target.system_id),
        log_level=logging.WARNING,
        enquire_link_interval=300.0,
    )
    runner = asyncio.create_task(esme.start())
    source = PhoneNumber(SERVICE_NUMBER)
    for index, message in enumerate(messages):
        if pace is not None and (wait := pace.wait_before(index)) > 0:
            await asyncio.sleep(wait)
        await window.acquire()
        submit = SubmitSm(
            short_message="-",  # replaced by the encoded part below; never itself sent
            source=source,
            destination=PhoneNumber(message.destination),
            esm_class=message.esm_class,
            registered_delivery=0,
            encoding="ucs2",
            log_id=str(index),
        )
        submit.set_encoded_message(message.short_message)  # our parts: UDH and surrogates done right
        await broker.enqueue(submit)
    await asyncio.wait_for(done.wait(), timeout=600)
    await asyncio.wait_for(esme.stop(), timeout=10)
    runner.cancel()
    return result


def _gateway(receipts: bool) -> Callable[[Target, list[Message], Pacer | None], SendResult]:
    """The gateway's durable sender (bench/gateway_sender.py): store → SMSC → acknowledged → store."""

    def send(target: Target, messages: list[Message], pace: Pacer | None) -> SendResult:
        from gateway_sender import run_gateway_sender

        phones = list(dict.fromkeys(message.destination for message in messages))
        done, seconds, times = run_gateway_sender(
            target.host,
            target.port,
            target.system_id,
            target.password,
            phones,
            INVITATION,
            rate=pace.rate if pace else None,
            window=WINDOW,
            receipts=receipts,
        )
        return SendResult(acknowledged=done, send_times=times, seconds=seconds)

    return send


Sender = Callable[[Target, list[Message], "Pacer | None"], SendResult]
#: The table of senders, by name; the gateway's own durable sender joins it later.
SENDERS: dict[str, Sender] = {
    "smpplib-naive": smpplib_naive,
    "smpplib-window": smpplib_window,
    "aiosmpplib-window": aiosmpplib_window,
    # Durable: every message a store row first, marked submitted only on its submit_sm_resp.
    "gateway-durable": _gateway(receipts=False),
    # The same, asking a receipt per part and keeping each one (SPEC R3.7): twice the PDUs.
    "gateway-durable+receipts": _gateway(receipts=True),
}


# ---------------------------------------------------------------------------------------------
# The harness
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    sender: str
    messages: int
    seconds: float
    acknowledged: int
    smsc_accepted: int
    rate: RateReport | None = None

    @property
    def per_second(self) -> float:
        return self.acknowledged / self.seconds if self.seconds else 0.0

    @property
    def check(self) -> str:
        if self.acknowledged == self.messages == self.smsc_accepted:
            return "every message acknowledged"
        return f"MISSING: {self.messages - self.acknowledged} unacknowledged, SMSC accepted {self.smsc_accepted}"


def run_sender(name: str, smsc: NodeSmsc, messages: list[Message], pace_rate: float | None) -> Row:
    before = int(smsc.stats()["accepted"])  # type: ignore[call-overload]
    pace = Pacer(pace_rate) if pace_rate else None
    started = time.monotonic()
    result = SENDERS[name](Target(smsc.host, smsc.port), messages, pace)
    seconds = result.seconds if result.seconds is not None else time.monotonic() - started
    accepted = int(smsc.stats()["accepted"]) - before  # type: ignore[call-overload]
    row = Row(name, len(messages), seconds, result.acknowledged, accepted)
    if pace_rate and len(result.send_times) > 1:
        row.rate = rate_report(result.send_times, pace_rate)
    return row


def print_table(rows: list[Row]) -> None:
    header = "| sender | messages | seconds | msgs/s | check |"
    lines = [header, "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.sender} | {row.messages:,} | {row.seconds:.2f} | {row.per_second:,.0f} | {row.check} |")
    if any(row.rate for row in rows):
        lines += ["", "| sender | target msgs/s | achieved | deviation | worst 10 s slice |", "|---|---|---|---|---|"]
        for row in rows:
            if row.rate:
                report = row.rate
                lines.append(
                    f"| {row.sender} | {report.target:,.0f} | {report.achieved:,.2f} | {report.deviation:+.2%} "
                    f"| {report.worst_slice:.2%} |"
                )
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000, help="messages per sender (default 20,000)")
    parser.add_argument("--senders", default=",".join(SENDERS), help=f"comma-separated, of {', '.join(SENDERS)}")
    parser.add_argument("--rate", type=float, help="pace every sender at this many messages/s")
    parser.add_argument("--duration", type=float, default=60.0, help="with --rate: seconds to send for (default 60)")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.senders.split(",") if name.strip()]
    unknown = [name for name in names if name not in SENDERS]
    if unknown:
        parser.error(f"unknown sender(s) {', '.join(unknown)}; known: {', '.join(SENDERS)}")
    count = round(args.rate * args.duration) if args.rate else args.messages
    messages = make_messages(count)
    rows = []
    with NodeSmsc(system_id=SYSTEM_ID, password=PASSWORD, log_pdus=False) as smsc:
        for name in names:
            row = run_sender(name, smsc, messages, args.rate)
            print(f"{name}: {row.per_second:,.0f} msgs/s, {row.check}", file=sys.stderr, flush=True)
            rows.append(row)
    print_table(rows)
    return 0 if all(row.check == "every message acknowledged" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
