"""A whole gateway (``build_gateway``) on a reactor of its own in a background thread, on loopback.

Tests talk to it as clients do, over real sockets (``urllib``, schemathesis, the simulated
Asterisk), and reach into its parts (store, metrics, pusher) when they must look behind them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.internet import threads
from twisted.internet.selectreactor import SelectReactor

from gateway.app import Gateway, build_gateway
from gateway.config import load_config
from tests.http_client import http_request


class LiveGateway:
    """``with LiveGateway(tmp_path) as live: live.get("/health")``."""

    def __init__(self, data_dir: Path, environ: Mapping[str, str] | None = None) -> None:
        env = {
            "GATEWAY_STORE_DATA_DIR": str(data_dir),
            "GATEWAY_HTTP_PORT": "0",
            "GATEWAY_AGI_PORT": "0",
            **(environ or {}),
        }
        self.config = load_config(None, environ=env)
        self.reactor = SelectReactor()
        self.gateway: Gateway = build_gateway(self.config, self.reactor)
        for service in self.gateway.root:  # listeners built without a reactor use the global one
            if hasattr(service, "reactor") and getattr(service, "method", None) == "TCP":
                service.reactor = self.reactor
        self._thread = threading.Thread(target=self.reactor.run, kwargs={"installSignalHandlers": False}, daemon=True)

    def __enter__(self) -> LiveGateway:
        self._thread.start()
        self.call(self.gateway.root.startService)
        deadline = time.monotonic() + 20
        while self.get("/health")[0] not in (200, 503):
            if time.monotonic() > deadline:
                raise AssertionError("the gateway did not answer /health within 20 s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.call(self.gateway.root.stopService)
        self.reactor.callFromThread(self.reactor.stop)
        self._thread.join(timeout=20)

    def call(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``function`` on the reactor thread and wait for its (Deferred) result."""
        return threads.blockingCallFromThread(self.reactor, function, *args, **kwargs)

    def port(self, service: str) -> int:
        return int(self.gateway.root.getServiceNamed(service)._port.getHost().port)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port('http')}"

    def token(self, role: str, name: str = "") -> str:
        return self.gateway.store.create_token(role, name or f"test-{role}")

    def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        body: Any = None,
        raw: bytes | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, dict[str, str], bytes]:
        try:
            return http_request(self.base + path, method, token=token, body=body, raw=raw, content_type=content_type)
        except OSError:
            return 0, {}, b""

    def get(self, path: str, token: str | None = None) -> tuple[int, Any]:
        status, _, body = self.request("GET", path, token=token)
        return status, (json.loads(body) if body else None)
