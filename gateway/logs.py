"""Structured logs: one event per line, key=value or JSON, never personal data (SPEC R5.1).

Code logs events as ``log.info("event=agi.call outcome=rated level=%s", level)``; the values
are ids, codes and counts. Twisted's own log events are forwarded to the same handler.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import TextIO

from twisted.logger import STDLibLogObserver, globalLogBeginner


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        message = record.getMessage()
        for part in message.split(" "):
            key, sep, value = part.partition("=")
            if (sep and key.isidentifier()) or (sep and "." not in key and key.replace(".", "_").isidentifier()):
                entry[key] = value
        entry["message"] = message
        if record.exc_info and record.exc_info[0] is not None:
            entry["error_type"] = record.exc_info[0].__name__
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Alembic narrates every start (plugins, the DDL mode) in its own words; storage.migrate
    # logs what changed as one event instead.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))


def forward_twisted_logs() -> None:
    """Send Twisted's log events to the standard logging handlers (call once at start-up)."""
    globalLogBeginner.beginLoggingTo([STDLibLogObserver(name="twisted")], redirectStandardIO=False)
