"""``gateway token``: create, list (never the secret) and revoke API tokens (SPEC R5.2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.cli import main


def test_token_commands_create_list_and_revoke(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_STORE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    assert main(["token", "create", "--role", "supervisor", "--name", "desk-7"]) == 0
    token = capsys.readouterr().out.strip()
    assert main(["token", "list", "--json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert listed["name"] == "desk-7" and listed["revokedAt"] is None and token not in json.dumps(listed)
    assert main(["token", "revoke"]) == 2  # names nothing
    assert main(["token", "revoke", str(listed["id"])]) == 0
    assert "1 token(s) revoked" in capsys.readouterr().out
    assert main(["token", "revoke", str(listed["id"])]) == 1  # nothing left to revoke
    assert main(["token", "list"]) == 0
    assert "revoked" in capsys.readouterr().out
