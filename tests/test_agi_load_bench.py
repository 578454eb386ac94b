"""The FastAGI benchmark's figures: round trips as the generator saw them and at the wire."""

from __future__ import annotations

import importlib.util
import socket
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest


def _bench() -> ModuleType:
    if "bench_agi_load" not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "bench" / "agi_load.py"
        spec = importlib.util.spec_from_file_location("bench_agi_load", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_agi_load"] = module  # dataclasses look their module up while it loads
        spec.loader.exec_module(module)
    return sys.modules["bench_agi_load"]


def _empty_result() -> object:
    return _bench().LoadResult(0, 0.0, {}, [], 0)


def test_the_wire_round_trip_leaves_out_the_time_a_command_waited_for_the_generator() -> None:
    bench = _bench()
    transcript = [
        (0.0, "<<", b"agi_network: yes"),
        (1.0, ">>", b"STREAM FILE hcp/hcp-rating-intro 12345"),
        (1.5, "<<", b"200 result=0 endpos=8000"),
        (3.0, ">>", b"GET OPTION hcp/hcp-rating-menu 12345 5000"),
        (3.2, "<<", b"200 result=50 endpos=100"),
        (4.2, ">>", b"SET VARIABLE HCP_RATING 4"),
    ]
    out = _empty_result()
    # The GET OPTION sat 0.5 simulated seconds in the socket; the SET VARIABLE's read had no timestamp.
    bench.analyse("c-1", transcript, False, out, 0.01, {3.0: 0.5})
    assert out.round_trips_ms == pytest.approx([10.0, 15.0, 10.0])
    assert out.wire_round_trips_ms == pytest.approx([10.0, 10.0, 10.0])
    assert out.wire_by_command["GET OPTION"] == pytest.approx([10.0])
    assert out.delivered == {"c-1": "2"}


def test_without_timestamps_there_is_no_wire_figure() -> None:
    out = _empty_result()
    _bench().analyse("c-1", [(0.0, "<<", b"x"), (1.0, ">>", b"HANGUP")], False, out, 0.01)
    assert out.round_trips_ms == pytest.approx([10.0])
    assert out.wire_round_trips_ms == []
    assert _bench().quantiles_ms([]).split() == ["-", "-"]


def test_the_kernel_timestamps_a_read_with_the_time_its_bytes_arrived() -> None:
    bench = _bench()
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname(), timeout=5) as generator:
        server, _ = listener.accept()
        with server:
            generator.setsockopt(socket.SOL_SOCKET, bench.SO_TIMESTAMPNS, 1)
            buffer = bytearray(4096)
            waits = []
            for _ in range(3):  # the kernel may leave the very first read of a process unstamped
                server.sendall(b"GET OPTION hcp/hcp-rating-menu 12345 5000\n")
                time.sleep(0.05)
                size, ancillary, _, _ = generator.recvmsg_into([buffer], socket.CMSG_SPACE(bench.TIMESPEC.size))
                assert size
                if ancillary:
                    waits.append(bench.socket_wait(ancillary))
    assert waits, "no read carried a receive timestamp"
    assert all(0.04 <= wait < 2.0 for wait in waits)
    assert bench.socket_wait([]) == 0.0
