"""One HTTP request to a gateway under test, as the tests' clients all make it (stdlib only)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def http_request(
    url: str,
    method: str,
    *,
    token: str | None = None,
    body: Any = None,
    raw: bytes | None = None,
    content_type: str = "application/json",
    timeout: float = 20.0,
    ensure_ascii: bool = True,
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of ``method url``; an HTTP error status is an answer, not an exception.

    ``body`` is sent as JSON, ``raw`` as it is; ``token`` as a bearer token.
    """
    data = raw
    if data is None and body is not None:
        data = json.dumps(body, ensure_ascii=ensure_ascii).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", content_type)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()
