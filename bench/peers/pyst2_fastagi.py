"""The reference peer: a minimal pyst2 thread-per-call FastAGI handler, ratings kept in memory.

What a site would write with the AGI library it knows: ``socketserver.ThreadingTCPServer``,
one ``asterisk.agi.AGI`` per connection, the same commands as the gateway's dialogue (
GET OPTION with every key as escape digit, a hint and retry on a wrong key or silence, SET
VARIABLE, a thank-you). pyst2's SIGHUP handler cannot be installed off the main thread, so
it is skipped there (the one adaptation needed to run it threaded at all).

    python bench/peers/pyst2_fastagi.py PORT RESULTS.json

SIGTERM writes ``{call_id: key}`` to RESULTS.json and exits.
"""

from __future__ import annotations

import json
import os
import signal
import socketserver
import sys
import threading
from urllib.parse import parse_qsl

from asterisk.agi import AGI, AGIException

KEYS = {"1", "2", "3", "4", "5"}
ratings: dict[str, str] = {}
lock = threading.Lock()
_signal = signal.signal


def _signal_off_main_thread(signum, handler):  # pyst2 calls this in AGI.__init__
    if threading.current_thread() is threading.main_thread():
        return _signal(signum, handler)
    return None


signal.signal = _signal_off_main_thread


class Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        reader = self.request.makefile("r", encoding="utf-8", newline="\n")
        writer = self.request.makefile("w", encoding="utf-8", newline="\n")
        try:
            with open(os.devnull, "w") as quiet:
                agi = AGI(stdin=reader, stdout=writer, stderr=quiet)
                script = agi.env.get("agi_network_script", "")
                params = dict(parse_qsl(script.partition("?")[2]))
                call_id = params.get("call_id") or agi.env.get("agi_uniqueid", "")
                # The gateway's dialogue: a key pressed during a hint answers the next attempt.
                pressed = ""
                for attempt in range(1, 4):
                    key = pressed or agi.get_option("hcp/hcp-rating-menu", "0123456789*#", 5000)
                    pressed = ""
                    if key in KEYS:
                        with lock:
                            ratings[call_id] = key
                        agi.set_variable("HCP_RATING", key)
                        agi.stream_file("hcp/hcp-rating-thanks")
                        return
                    if attempt == 3:
                        break
                    hint = "hcp/hcp-rating-invalid" if key else "hcp/hcp-rating-timeout"
                    pressed = agi.stream_file(hint, "0123456789*#")
                agi.stream_file("hcp/hcp-rating-goodbye")
        except (AGIException, ValueError, OSError):
            return  # hang-up, or pyst2 reading a HANGUP line as a result
        finally:
            for stream in (reader, writer):
                try:
                    stream.close()
                except OSError:
                    pass


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # the same backlog as the gateway, so only the handler differs


def main() -> None:
    port, results = int(sys.argv[1]), sys.argv[2]
    server = Server(("127.0.0.1", port), Handler)

    def stop(*_: object) -> None:
        with lock, open(results, "w", encoding="utf-8") as handle:
            json.dump(ratings, handle)
        os._exit(0)

    _signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
