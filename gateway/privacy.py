"""Personal data at rest: encryption, keyed lookup hashes, masking (SPEC R5.1).

Phone numbers, e-mail addresses and names are stored encrypted (AES-256-GCM) and found by
a keyed hash (HMAC-SHA256), so that neither a copy of the database nor a log line gives
them away. The keys come from configuration or from a key file generated once in the data
folder; never from the code.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import tomllib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_VERSION = b"\x01"


class KeyMaterialError(ValueError):
    """A key that is not 32 bytes of base64."""


class KeyFileError(ValueError):
    """A ``keys.toml`` the gateway cannot use; the message names the file and what to do."""


class InvalidPhoneNumber(ValueError):
    """Text that cannot be a phone number."""


def decode_key(text: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        raise KeyMaterialError(
            'is not base64; generate one with: python3 -c "import os,base64;'
            ' print(base64.b64encode(os.urandom(32)).decode())"'
        ) from None
    if len(key) != 32:
        raise KeyMaterialError(f"must be 32 bytes once decoded, not {len(key)}")
    return key


def normalise_phone(raw: str, default_country_code: str = "86") -> str:
    """E.164 form of a phone number (``+8613800138000``), the form that is hashed.

    Accepts the ways numbers reach us: ``13800138000``, ``+86 138-0013-8000``,
    ``008613800138000``, ``8613800138000``, full-width digits, and land lines with a
    trunk prefix (``010-12345678`` → ``+861012345678``).
    """
    text = raw.strip().translate(_FULL_WIDTH)
    if not text:
        raise InvalidPhoneNumber("the phone number is empty")
    plus = text.startswith("+")
    trunk = False
    digits = re.sub(r"[\s\-().]", "", text.lstrip("+"))
    if not digits.isdigit():
        raise InvalidPhoneNumber("a phone number may hold only digits, spaces, dashes and a leading +")
    if plus:
        number = digits
    elif digits.startswith("00"):
        number = digits[2:]
    elif default_country_code == "86" and len(digits) == 13 and digits.startswith("861"):
        number = digits
    elif digits.startswith("0"):
        number, trunk = default_country_code + digits[1:], True
    else:
        number = default_country_code + digits
    if number.startswith("861") and not trunk and len(number) != 13:
        raise InvalidPhoneNumber("a Chinese mobile number has 11 digits")
    if not 8 <= len(number) <= 15:
        raise InvalidPhoneNumber("a phone number has 8 to 15 digits with its country code")
    return "+" + number


_FULL_WIDTH = str.maketrans("０１２３４５６７８９＋－（）　", "0123456789+-() ")


def mask_phone(e164: str) -> str:
    """``+8613812345678`` → ``138****5678``: what operators see (SPEC R5.1).

    At least four digits are always hidden, and at most the first three and the last four
    shown: a land line without its area code (``87654321``) reads ``****4321``, not
    ``876*4321``.
    """
    national = e164[3:] if e164.startswith("+86") else e164.lstrip("+")
    if len(national) <= 7:
        return national[:1] + "*" * (len(national) - 1)
    hidden = max(4, len(national) - 7)
    shown = len(national) - 4 - hidden
    return national[:shown] + "*" * hidden + national[-4:]


def mask_email(address: str) -> str:
    local, _, domain = address.partition("@")
    return (local[:1] + "***@" + domain) if domain else "***"


@dataclass(frozen=True)
class DataProtector:
    """Encrypts personal data and computes its lookup hash with the deployment's keys."""

    encryption_key: bytes
    hash_key: bytes

    @cached_property
    def _aead(self) -> AESGCM:
        """One cipher object per key: it holds no per-message state and is safe across threads."""
        return AESGCM(self.encryption_key)

    def encrypt(self, text: str) -> bytes:
        nonce = os.urandom(12)
        return _VERSION + nonce + self._aead.encrypt(nonce, text.encode(), None)

    def decrypt(self, blob: bytes) -> str:
        if not blob or blob[:1] != _VERSION:
            raise ValueError("not a value encrypted by this gateway")
        try:
            return self._aead.decrypt(blob[1:13], blob[13:], None).decode()
        except InvalidTag:
            raise ValueError("cannot decrypt: the encryption key differs from the one used to store it") from None

    def lookup_hash(self, canonical: str) -> str:
        """HMAC-SHA256 hex of the canonical form (E.164 for phones; PLATFORM.md userPhoneHash)."""
        return hmac.new(self.hash_key, canonical.encode(), hashlib.sha256).hexdigest()

    @classmethod
    def from_settings(cls, encryption_key: str, phone_hash_key: str, data_dir: Path) -> DataProtector:
        """Keys from configuration, else from ``<data_dir>/keys.toml``, created on first use."""
        if encryption_key and phone_hash_key:
            return cls(decode_key(encryption_key), decode_key(phone_hash_key))
        path = data_dir / "keys.toml"
        stored = load_or_create_key_file(path)
        return cls(
            decode_key(encryption_key) if encryption_key else _stored_key(stored, "encryption_key", path),
            decode_key(phone_hash_key) if phone_hash_key else _stored_key(stored, "phone_hash_key", path),
        )


#: Said with every fault of the key file: new keys would not fix it, they would lose the data.
_RESTORE_KEY_FILE = (
    "restore it from the backup kept with the store (new keys would make the personal data stored so far unreadable)"
)


def _stored_key(stored: dict[str, Any], name: str, path: Path) -> bytes:
    if name not in stored:
        raise KeyFileError(f"the key file {path} has no {name}; {_RESTORE_KEY_FILE}")
    try:
        return decode_key(str(stored[name]))
    except KeyMaterialError as error:
        raise KeyFileError(f"the key file {path}: {name} {error}; {_RESTORE_KEY_FILE}") from None


def load_or_create_key_file(path: Path) -> dict[str, Any]:
    if path.exists():
        try:
            with open(path, "rb") as handle:
                return tomllib.load(handle)
        except OSError as error:
            raise KeyFileError(f"the key file {path} cannot be read: {error.strerror or error}") from None
        except UnicodeDecodeError:
            raise KeyFileError(f"the key file {path} is damaged (not UTF-8 text); {_RESTORE_KEY_FILE}") from None
        except tomllib.TOMLDecodeError as error:
            # The decoder's message gives a line and column, never the text: no key is shown.
            raise KeyFileError(f"the key file {path} is damaged ({error}); {_RESTORE_KEY_FILE}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = {name: base64.b64encode(os.urandom(32)).decode() for name in ("encryption_key", "phone_hash_key")}
    text = "# Generated by the gateway. Keep it secret; back it up with the store.\n" + "".join(
        f'{name} = "{value}"\n' for name, value in keys.items()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    return keys
