"""Personal data protection (SPEC R5.1)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gateway.privacy import (
    DataProtector,
    InvalidPhoneNumber,
    KeyFileError,
    KeyMaterialError,
    decode_key,
    mask_phone,
    normalise_phone,
)


@pytest.mark.parametrize(
    ("raw", "e164"),
    [
        ("13812345678", "+8613812345678"),
        ("+86 138 1234 5678", "+8613812345678"),
        ("008613812345678", "+8613812345678"),
        ("8613812345678", "+8613812345678"),
        ("010-12345678", "+861012345678"),
        ("+85291234567", "+85291234567"),
    ],
)
def test_phone_numbers_are_normalised_to_e164(raw: str, e164: str) -> None:
    assert normalise_phone(raw) == e164


@pytest.mark.parametrize("raw", ["", "abc", "1381234567", "+8613812345678999999"])
def test_bad_phone_numbers_are_refused(raw: str) -> None:
    with pytest.raises(InvalidPhoneNumber):
        normalise_phone(raw)


@pytest.mark.parametrize(
    ("e164", "masked"),
    [
        ("+8613812345678", "138****5678"),  # a mobile: SPEC R5.1's example
        ("+8687654321", "****4321"),  # a land line written without its area code
        ("+862187654321", "21****4321"),  # 021-8765-4321
        ("+8675512345678", "755****5678"),  # 0755-1234-5678
        ("+447911123456", "447*****3456"),  # abroad: the country code shown, the middle hidden
    ],
)
def test_mask_hides_at_least_four_digits(e164: str, masked: str) -> None:
    assert mask_phone(e164) == masked
    assert masked.count("*") >= 4


def test_encryption_round_trip_is_randomised_and_key_bound() -> None:
    protector = DataProtector(os.urandom(32), os.urandom(32))
    one, two = protector.encrypt("+8613812345678"), protector.encrypt("+8613812345678")
    assert one != two
    assert protector.decrypt(one) == "+8613812345678"
    other = DataProtector(os.urandom(32), protector.hash_key)
    with pytest.raises(ValueError, match="key differs"):
        other.decrypt(one)
    assert other.lookup_hash("+8613812345678") == protector.lookup_hash("+8613812345678")


def test_keys_are_generated_once_in_the_data_folder_with_private_mode(tmp_path: Path) -> None:
    first = DataProtector.from_settings("", "", tmp_path)
    second = DataProtector.from_settings("", "", tmp_path)
    assert first == second
    assert stat.S_IMODE((tmp_path / "keys.toml").stat().st_mode) == 0o600


def test_configured_keys_must_be_32_bytes_of_base64() -> None:
    with pytest.raises(KeyMaterialError, match="32 bytes"):
        decode_key("c2hvcnQ=")
    with pytest.raises(KeyMaterialError, match="base64"):
        decode_key("not base64!")


GOOD_KEY = "A" * 43 + "="


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (f'encryption_key = "{GOOD_KEY}"\nphone_hash_key = "{GOOD_KEY[:20]}', "is damaged (Unterminated string"),
        (f'encryption_key = "{GOOD_KEY}"\n', "has no phone_hash_key"),
        (f'encryption_key = "{GOOD_KEY}"\nphone_hash_key = "{GOOD_KEY[:20]}"\n', "phone_hash_key must be 32 bytes"),
        ("\xff\xfe", "is damaged (not UTF-8 text)"),
    ],
)
def test_a_damaged_key_file_is_named_with_what_to_do_and_never_replaced(
    tmp_path: Path, content: str, words: str
) -> None:
    path = tmp_path / "keys.toml"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(KeyFileError) as caught:
        DataProtector.from_settings("", "", tmp_path)
    message = str(caught.value)
    assert str(path) in message and words in message and "restore it from the backup" in message
    assert GOOD_KEY[:20] not in message
    assert path.read_bytes() == content.encode("latin-1")


def test_a_key_set_in_the_configuration_needs_no_copy_in_the_key_file(tmp_path: Path) -> None:
    (tmp_path / "keys.toml").write_text(f'encryption_key = "{GOOD_KEY}"\n', encoding="utf-8")
    protector = DataProtector.from_settings("", "B" * 43 + "=", tmp_path)
    assert protector.encryption_key == decode_key(GOOD_KEY)
