"""A real third-party SMSC for tests: ``node_smsc/server.js`` on the npm ``smpp`` package.

Issue 4 asks for tests against SMPP code that is not the project's own. ``NodeSmsc`` starts
``node server.js`` on a free loopback port, reads what it logs (one JSON line per PDU) in a
thread, and drives it through JSON lines on its stdin. Its API matches
:class:`gateway.testing.smsc.Smsc` where they overlap (``submits``, ``accepted``,
``acknowledged_twice``, ``deliveries``, ``wait_for``, ``send_mo``, ``send_receipt``, ``unbind``,
``close_connection``, ``stop``), with the same record types, so a test can run against both::

    with NodeSmsc(receipt_delay=0.05) as smsc:
        client.connect(smsc.host, smsc.port)
        ...
        smsc.wait_for(lambda: smsc.deliveries(), timeout=5)

Node.js and the package are installed by ``bash scripts/bootstrap.sh --test``. Without node a
test using ``NodeSmsc`` is skipped with a message saying so, except in CI (``CI`` set), where
it fails: CI must never pass by testing nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gateway.sms.text import ESM_CLASS_UDHI
from gateway.testing.smsc import DeliveryRecord, SubmitRecord

SERVER_DIR = Path(__file__).with_name("node_smsc")
SERVER_JS = SERVER_DIR / "server.js"
INSTALL_HINT = (
    "run `bash scripts/bootstrap.sh --test` (it installs Node.js and runs `npm ci` in gateway/testing/node_smsc)"
)


class NodeUnavailable(RuntimeError):
    """Node.js or the npm ``smpp`` package is not installed here."""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _unavailable(reason: str) -> None:
    """Skip the running test (outside CI) or fail (in CI, or outside pytest)."""
    message = f"The node SMSC cannot run: {reason}; {INSTALL_HINT}."
    if not in_ci() and "pytest" in sys.modules:
        import pytest

        pytest.skip(message)
    raise NodeUnavailable(message)


class NodeSmsc:
    """``node server.js`` as a context manager; see the module docstring.

    ``message_id_format``: ``"hex"`` or ``"decimal"`` ids in submit_sm_resp;
    ``receipt_id_format``: how the ``id:`` of a receipt's text writes them (``"same"``, ``"hex"``,
    ``"decimal"`` zero-padded to 10 digits); ``receipt_delay`` in seconds; ``log_pdus=False``
    keeps only counts (for benchmarks: see :meth:`stats`); ``redeliver_delay`` (seconds, None:
    never) sends again a deliver_sm the client answered with an error, up to ``redeliver_times``
    more times (SPEC R3.7a).
    """

    def __init__(
        self,
        *,
        system_id: str = "gateway",
        password: str = "secret",
        message_id_format: str = "hex",
        receipt_id_format: str = "same",
        receipt_delay: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
        log_pdus: bool = True,
        redeliver_delay: float | None = None,
        redeliver_times: int = 3,
        node: str | None = None,
    ) -> None:
        self.system_id = system_id
        self.password = password
        self.message_id_format = message_id_format
        self.receipt_id_format = receipt_id_format
        self.receipt_delay = receipt_delay
        self.host = host
        self.port = port
        self.log_pdus = log_pdus
        self.redeliver_delay = redeliver_delay
        self.redeliver_times = redeliver_times
        self.node = node
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._changed = threading.Condition(threading.RLock())
        self._log: list[dict[str, object]] = []
        self._answers: dict[str, dict[str, object]] = {}
        self._refs = itertools.count(1)

    # --- life -----------------------------------------------------------------------------

    def __enter__(self) -> NodeSmsc:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = 10.0) -> NodeSmsc:
        node = self.node or shutil.which("node") or shutil.which("nodejs")
        if node is None:
            _unavailable("Node.js (`node`) is not on PATH")
        if not (SERVER_DIR / "node_modules" / "smpp").is_dir():
            _unavailable(f"the npm smpp package is not installed in {SERVER_DIR}")
        command = [
            str(node),
            str(SERVER_JS),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--system-id",
            self.system_id,
            "--password",
            self.password,
            "--message-id-format",
            self.message_id_format,
            "--receipt-id-format",
            self.receipt_id_format,
            "--receipt-delay-ms",
            str(round(self.receipt_delay * 1000)),
            "--redeliver-delay-ms",
            str(-1 if self.redeliver_delay is None else round(self.redeliver_delay * 1000)),
            "--redeliver-times",
            str(self.redeliver_times),
            "--log",
            "all" if self.log_pdus else "none",
        ]
        self._process = subprocess.Popen(
            command,
            cwd=SERVER_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read_stdout, name="node-smsc-stdout", daemon=True)
        self._reader.start()
        try:
            first = self._wait(lambda: self._log[0] if self._log else None, timeout)
        except TimeoutError:
            self.stop()
            raise
        if first.get("event") != "listening":
            self.stop()
            raise RuntimeError(f"The node SMSC did not start: {first}")
        self.port = int(first["port"])  # type: ignore[call-overload]
        return self

    def stop(self) -> None:
        """Close its stdin (server.js exits when stdin ends), then terminate it if it lingers."""
        process = self._process
        if process is None:
            return
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        try:
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._reader is not None:
            self._reader.join(timeout=2)
        if process.stderr is not None:
            self.stderr = process.stderr.read()
            process.stderr.close()
        self._process = None

    def _read_stdout(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                entry = {"event": "unparsed", "line": line.rstrip("\n")}
            with self._changed:
                self._log.append(entry)
                ref = entry.get("ref")
                if ref is not None and entry.get("event") != "pdu":
                    self._answers[str(ref)] = entry
                self._changed.notify_all()
        with self._changed:
            self._log.append({"event": "exited"})
            self._changed.notify_all()

    # --- what a test reads ----------------------------------------------------------------

    def log(self) -> list[dict[str, object]]:
        """Every JSON line server.js wrote, in order."""
        with self._changed:
            return list(self._log)

    def submits(self) -> list[SubmitRecord]:
        """Every submit_sm received, as :class:`SubmitRecord` (the same type the Python SMSC records)."""
        records = []
        number = 0
        for entry in self.log():
            if entry.get("event") != "pdu" or entry.get("command") != "submit_sm":
                continue
            number += 1
            response = entry.get("response") or {}
            optional = dict(entry.get("optional") or {})  # type: ignore[call-overload]
            if isinstance(optional.get("message_payload"), str):
                optional["message_payload"] = bytes.fromhex(optional["message_payload"])
            records.append(
                SubmitRecord(
                    sequence=int(entry["sequence"]),  # type: ignore[call-overload]
                    source=str(entry.get("source_addr", "")),
                    destination=str(entry.get("destination_addr", "")),
                    esm_class=int(entry.get("esm_class", 0)),  # type: ignore[call-overload]
                    data_coding=int(entry.get("data_coding") or 0),  # type: ignore[call-overload]
                    registered_delivery=int(entry.get("registered_delivery", 0)),  # type: ignore[call-overload]
                    short_message=bytes.fromhex(str(entry.get("short_message") or "")),
                    optional=optional,
                    status=response.get("status"),  # type: ignore[union-attr]
                    message_id=response.get("message_id"),  # type: ignore[union-attr]
                    connection=int(entry.get("connection", 0)),  # type: ignore[call-overload]
                    number=number,
                )
            )
        return records

    def accepted(self) -> list[SubmitRecord]:
        """The submits answered ESME_ROK."""
        return [record for record in self.submits() if record.accepted]

    def acknowledged_twice(self) -> list[SubmitRecord]:
        """Accepted submits whose part (destination, reference, total, part, payload) was accepted before."""
        seen: set[tuple[str, int | None, int, int, bytes]] = set()
        repeats = []
        for record in self.accepted():
            if record.part_key in seen:
                repeats.append(record)
            seen.add(record.part_key)
        return repeats

    def deliveries(self) -> list[DeliveryRecord]:
        """Every deliver_sm sent (MOs and receipts), with the status of the client's deliver_sm_resp."""
        records: list[DeliveryRecord] = []
        for entry in self.log():
            if entry.get("event") == "sent" and entry.get("command") == "deliver_sm":
                records.append(
                    DeliveryRecord(
                        sequence=int(entry["sequence"]),  # type: ignore[call-overload]
                        kind=str(entry["kind"]),
                        source=str(entry.get("source_addr", "")),
                        destination=str(entry.get("destination_addr", "")),
                        short_message=bytes.fromhex(str(entry.get("short_message", ""))),
                        message_id=entry.get("receipted_message_id"),  # type: ignore[arg-type]
                        connection=int(entry.get("connection", 0)),  # type: ignore[call-overload]
                        attempt=int(entry.get("attempt", 1)),  # type: ignore[call-overload]
                    )
                )
            elif entry.get("command") == "deliver_sm_resp":
                for record in reversed(records):
                    if record.sequence == entry.get("sequence") and record.connection == entry.get("connection"):
                        record.status = int(entry["status"])  # type: ignore[call-overload]
                        break
        return records

    def pdus(self) -> list[dict[str, object]]:
        """Every PDU received, as server.js logged it."""
        return [entry for entry in self.log() if entry.get("event") == "pdu"]

    def stats(self, timeout: float = 5.0) -> dict[str, object]:
        """Counts kept by server.js even with ``log_pdus=False``: submits, accepted, binds, deliver_sm."""
        return self._control({"op": "stats"}, timeout)

    def wait_for(self, predicate: Callable[[], object], timeout: float = 5.0) -> object:
        """Wait until ``predicate()`` is truthy and return its value; TimeoutError after ``timeout`` s."""
        return self._wait(predicate, timeout)

    def _wait(self, predicate: Callable[[], object], timeout: float) -> object:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not (value := predicate()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"the node SMSC did not see what was expected within {timeout} s")
                self._changed.wait(min(remaining, 0.1))
            return value

    # --- what a test does -----------------------------------------------------------------

    def send_mo(
        self,
        source: str,
        destination: str,
        text: str | None = None,
        *,
        payload: bytes | None = None,
        data_coding: int = 8,
        udh: bytes | None = None,
        esm_class: int | None = None,
    ) -> int:
        """Send a mobile-originated deliver_sm (UCS-2 ``text`` or raw ``payload``); its sequence number."""
        body = payload if payload is not None else (text or "").encode("utf-16-be")
        command: dict[str, object] = {
            "op": "mo",
            "source": source,
            "destination": destination,
            "hex": body.hex(),
            "data_coding": data_coding,
        }
        if udh:
            command["udh"] = udh.hex()
        command["esm_class"] = esm_class if esm_class is not None else (ESM_CLASS_UDHI if udh else 0)
        return int(self._control(command)["sequence"])  # type: ignore[call-overload]

    def send_receipt(
        self,
        message_id: str,
        state: str = "DELIVRD",
        *,
        source: str = "",
        destination: str = "",
        err: str = "000",
        text: str = "",
    ) -> int:
        """Send a delivery receipt for ``message_id`` (TLVs and standard text); its sequence number."""
        command = {
            "op": "receipt",
            "message_id": message_id,
            "state": state,
            "err": err,
            "source": source,
            "destination": destination,
            "text": text,
        }
        return int(self._control(command)["sequence"])  # type: ignore[call-overload]

    def unbind(self) -> None:
        """Send unbind on every open session (server.js closes it on the client's unbind_resp)."""
        self._control({"op": "unbind"})

    def close_connection(self) -> None:
        """Drop every open session at once."""
        self._control({"op": "close"})

    def _control(self, command: dict[str, object], timeout: float = 5.0) -> dict[str, object]:
        process = self._process
        if process is None or process.stdin is None:
            raise RuntimeError("The node SMSC is not running; use it inside `with NodeSmsc() as smsc:`.")
        ref = str(next(self._refs))
        process.stdin.write(json.dumps({**command, "ref": ref}, ensure_ascii=False) + "\n")
        process.stdin.flush()
        answer = self._wait(lambda: self._answers.get(ref), timeout)
        assert isinstance(answer, dict)
        if answer.get("event") == "error":
            raise RuntimeError(f"The node SMSC refused {command['op']}: {answer.get('error')}")
        return answer
