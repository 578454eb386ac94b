"""A floor for the benchmark: a bare asyncio FastAGI handler, ratings kept in memory.

No framework, no store, no checks beyond what the dialogue needs: the same commands as the
gateway and the pyst2 reference (GET OPTION with every key as escape digit, a hint and retry
on a wrong key or silence, SET VARIABLE, a thank-you), ``HANGUP`` lines skipped. What it costs
per call is close to the least any Python server can spend, so its round trip on the same
machine shows how much of a server's figure is the load generator's own (it shares the cores).

    python bench/peers/asyncio_fastagi.py PORT RESULTS.json

SIGTERM writes ``{call_id: key}`` to RESULTS.json and exits.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from urllib.parse import parse_qsl

KEYS = {"1", "2", "3", "4", "5"}
MENU = b'GET OPTION hcp/hcp-rating-menu "0123456789*#" 5000\n'
ratings: dict[str, str] = {}


class Hangup(Exception):
    pass


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    async def command(line: bytes) -> str:
        writer.write(line)
        while True:
            answer = await reader.readline()
            if not answer:
                raise Hangup
            if answer != b"HANGUP\n":
                break
        if not answer.startswith(b"200 result="):
            raise Hangup
        result = answer[11:].split(b" ", 1)[0]
        if result == b"-1":
            raise Hangup
        return result.decode()

    try:
        env = {}
        while (line := await reader.readline()) not in (b"\n", b""):
            key, _, value = line.decode("utf-8", "replace").rstrip("\n").partition(": ")
            env[key] = value
        params = dict(parse_qsl(env.get("agi_network_script", "").partition("?")[2]))
        call_id = params.get("call_id") or env.get("agi_uniqueid", "")
        # The gateway's dialogue: a key pressed during a hint answers the next attempt.
        pressed = ""
        for attempt in range(1, 4):
            if not pressed:
                code = int(await command(MENU))
                pressed = chr(code) if code else ""
            key, pressed = pressed, ""
            if key in KEYS:
                ratings[call_id] = key
                await command(b'SET VARIABLE HCP_RATING "' + key.encode() + b'"\n')
                await command(b'STREAM FILE hcp/hcp-rating-thanks ""\n')
                return
            if attempt == 3:
                break
            code = int(await command(b'STREAM FILE hcp/hcp-rating-%s "0123456789*#"\n' % (b"invalid" if key else b"timeout")))
            pressed = chr(code) if code else ""
        await command(b'STREAM FILE hcp/hcp-rating-goodbye ""\n')
    except (Hangup, ValueError, OSError):
        return
    finally:
        writer.close()


async def main() -> None:
    port, results = int(sys.argv[1]), sys.argv[2]

    def stop() -> None:
        with open(results, "w", encoding="utf-8") as handle_:
            json.dump(ratings, handle_)
        os._exit(0)

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop)
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
