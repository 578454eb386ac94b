"""``gateway run``'s composition: services start in order, and a failed start stops what had started."""

from __future__ import annotations

import pytest
from twisted.application import service

from gateway.app import SequentialMultiService, ServiceStartError


class RecordingService(service.Service):
    def __init__(self, name: str, events: list[str], *, fails: bool = False) -> None:
        self.setName(name)
        self.events = events
        self.fails = fails

    def startService(self) -> None:
        super().startService()
        if self.fails:
            raise OSError(f"{self.name} cannot start")
        self.events.append(f"start {self.name}")

    def stopService(self) -> None:
        super().stopService()
        self.events.append(f"stop {self.name}")


def test_services_stop_in_reverse_order_of_start() -> None:
    events: list[str] = []
    root = SequentialMultiService()
    for name in ("store", "agi", "http"):
        RecordingService(name, events).setServiceParent(root)
    root.startService()
    root.stopService()
    assert events == ["start store", "start agi", "start http", "stop http", "stop agi", "stop store"]


def test_a_service_that_cannot_start_is_named_and_only_what_started_is_stopped() -> None:
    """A busy AGI port left the store running and HTTP never started, with no exit (review issue 1)."""
    events: list[str] = []
    root = SequentialMultiService()
    RecordingService("store", events).setServiceParent(root)
    RecordingService("agi", events, fails=True).setServiceParent(root)
    RecordingService("http", events).setServiceParent(root)
    with pytest.raises(ServiceStartError) as caught:
        root.startService()
    assert caught.value.service_name == "agi"
    root.stopService()
    assert events == ["start store", "stop agi", "stop store"]
