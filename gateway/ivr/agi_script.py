"""The ``gateway-agi`` command's entry point: catch SIGHUP first, then load the script.

Asterisk sends SIGHUP when the caller hangs up. Loading the configuration, SQLAlchemy and pyst2
takes a moment, and until pyst2 installs its handler the default action would kill the script
before the call is recorded as not rated (SPEC R2.3). This module imports nothing heavy: its
handler is in place a few milliseconds after the interpreter starts, and what it saw is handed
to the script.
"""

from __future__ import annotations

import signal
import sys


def main() -> int:
    early: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, frame: early.append(signum))
    from gateway.ivr.classic import main as classic_main

    return classic_main(early_hangup=lambda: bool(early))


if __name__ == "__main__":
    sys.exit(main())
