"""Stable, sortable record ids (ULID layout: 48-bit milliseconds + 80 random bits).

The platform takes ``recordId`` as its idempotency key (PLATFORM.md): an id is made once,
when the record is stored, and sent unchanged on every retry.
"""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32


def new_id(prefix: str, now_ms: int | None = None) -> str:
    """``ev-01JD3…``: 26 base32 characters after the prefix, ordered by creation time."""
    millis = int(time.time() * 1000) if now_ms is None else now_ms
    value = (millis << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        value, digit = divmod(value, 32)
        chars.append(_ALPHABET[digit])
    return f"{prefix}-{''.join(reversed(chars))}"
