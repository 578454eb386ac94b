"""``gateway-agi``: the classic AGI script, for sites that run ``AGI(gateway-agi,key=value,...)``.

Asterisk starts it once per call with the AGI session on stdin/stdout. pyst2 (the AGI
library the users asked for) reads the environment and catches SIGHUP, which it may do
here: a classic script is single-threaded and owns its main thread. Everything after that
goes through the same :class:`gateway.ivr.call.RatingCall` as the FastAGI server, because
pyst2 mistakes ``HANGUP`` lines and 511 answers (see ``shared/LIBRARIES.md``); SIGHUP is
fed to it as the ``HANGUP`` notice a FastAGI session would have received.

The store is written directly (blocking is fine in a process of its own). Configuration:
``GATEWAY_CONFIG``, else ``/etc/hcp-gateway/gateway.toml`` if it exists, else the defaults.
Nothing personal is written to stderr, which Asterisk shows on its console.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from gateway.config import ConfigError, load_config
from gateway.ivr.call import Close, RatingCall, Write, describe
from gateway.ivr.dialogue import NotRated, StoreDetail, StoreRating
from gateway.ivr.settings import DETAIL_HOLD, details_may_follow, dialogue_settings
from storage.store import Store

log = logging.getLogger("gateway.ivr.classic")

DEFAULT_CONFIG = Path("/etc/hcp-gateway/gateway.toml")


#: Longest environment line read at once (the wire parser refuses lines over 8 KiB anyway).
MAX_ENVIRONMENT_LINE = 65536


class _EnvironmentReader:
    """The stdin pyst2 reads the environment from: keeps each line's bytes as they came.

    pyst2 decodes the lines as strict UTF-8 and would raise on a trunk's GBK caller name (the
    script would then exit 1 and the call stay unrecorded), so it is given each line as valid
    UTF-8; the call itself reads the bytes that came, as the FastAGI server does.
    """

    def __init__(self, stdin: BinaryIO) -> None:
        self.stdin = stdin
        self.raw = bytearray()

    def readline(self, size: int = -1) -> bytes:
        line = self.stdin.readline(MAX_ENVIRONMENT_LINE)
        self.raw += line
        return line.decode("utf-8", "replace").encode("utf-8")


def read_environment(stdin: BinaryIO, stderr: object) -> tuple[bytes, Callable[[], bool]]:
    """Let pyst2 read the environment block and install its SIGHUP handler.

    Returns the block as the wire bytes it was, and a function telling whether SIGHUP came.
    """
    from asterisk.agi import AGI

    reader = _EnvironmentReader(stdin)
    session = AGI(stdin=reader, stdout=sys.stdout, stderr=stderr)
    return bytes(reader.raw), lambda: bool(session._got_sighup)


def run_call(
    stdin: BinaryIO,
    stdout: BinaryIO,
    store: Store,
    call: RatingCall,
    environment: bytes,
    hung_up: Callable[[], bool] = lambda: False,
) -> int:
    """Play one call to its end; returns the exit status (0: the dialplan goes on)."""
    outputs = call.receive_data(environment)
    record_id: str | None = None
    push_held = False
    hangup_fed = False
    while True:
        queue = list(outputs)
        outputs = []
        while queue:
            output = queue.pop(0)
            if isinstance(output, Write):
                stdout.write(output.data)
                stdout.flush()
            elif isinstance(output, StoreRating):
                rated_at = datetime.now(UTC)
                push_held = details_may_follow(call.settings, output.level)
                try:
                    (result,) = store.write_together(
                        [
                            (
                                "call_rating",
                                {
                                    "hand_off": call.hand_off,
                                    "level": output.level,
                                    "key": output.key,
                                    "rated_at": rated_at,
                                    "push_after": rated_at + DETAIL_HOLD if push_held else None,
                                },
                            )
                        ]
                    )
                    if isinstance(result, Exception):
                        raise result
                    record_id, _ = result
                except Exception as error:
                    log.error("event=agi.store_failed call_id=%s error=%s", call.call_id, type(error).__name__)
                    queue.extend(call.store_failed(type(error).__name__))
                else:
                    queue.extend(call.store_done())
            elif isinstance(output, StoreDetail) and record_id:
                try:
                    store.record_rating_detail(record_id, reasons=output.reason, comment_ref=output.comment_ref)
                except Exception as error:
                    log.error("event=agi.store_failed call_id=%s error=%s", call.call_id, type(error).__name__)
            elif isinstance(output, Close):
                if push_held and record_id:
                    try:
                        store.write_together([("release_push", {"record_id": record_id})])
                    except Exception as error:
                        log.error("event=agi.store_failed call_id=%s error=%s", call.call_id, type(error).__name__)
                if isinstance(output.outcome, NotRated) and call.call_id:
                    try:
                        store.record_unrated_call(call.hand_off, reason=output.outcome.reason)
                    except Exception as error:
                        log.error("event=agi.store_failed call_id=%s error=%s", call.call_id, type(error).__name__)
                log.info("event=agi.call_end call_id=%s %s", call.call_id, describe(output.outcome))
                return 0
        if call.closed:
            return 0
        if hung_up() and not hangup_fed:
            hangup_fed = True
            outputs = call.receive_data(b"HANGUP\n")
            continue
        line = stdin.readline()
        outputs = call.receive_data(line if line else b"")
        if hung_up() and not hangup_fed:
            hangup_fed = True
            outputs += call.receive_data(b"HANGUP\n")


def main(early_hangup: Callable[[], bool] = lambda: False) -> int:
    """``early_hangup``: whether SIGHUP came before pyst2 took it over (see ``agi_script``)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="gateway-agi %(message)s")
    path = os.environ.get("GATEWAY_CONFIG") or (str(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else None)
    try:
        config = load_config(path)
    except ConfigError as error:
        for problem in error.problems:
            print(f"gateway-agi: configuration: {problem}", file=sys.stderr)
        return 1
    store = Store.from_config(config, upgrade=False)
    with open(os.devnull, "w") as quiet:  # pyst2 echoes the environment, caller number included
        environment, pyst2_hung_up = read_environment(sys.stdin.buffer, quiet)  # type: ignore[arg-type]

    def hung_up() -> bool:
        return early_hangup() or pyst2_hung_up()

    call = RatingCall(dialogue_settings(config), check_script=False)
    try:
        return run_call(sys.stdin.buffer, sys.stdout.buffer, store, call, environment, hung_up)
    except BrokenPipeError:
        return 0
    finally:
        store.engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
