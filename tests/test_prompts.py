"""The voice prompts match their texts and are in a format Asterisk plays (SPEC R2.6).

Every prompt named in `prompts/prompts.toml` has `prompts/zh/<name>.wav`: 8000 Hz, mono,
16-bit PCM, long enough to be speech; no WAV is left without its text. The names are the
contract with the dialogue code, so the set of names is pinned here.
"""

from __future__ import annotations

import tomllib
import wave
from pathlib import Path

import pytest

PROMPTS = Path(__file__).resolve().parents[1] / "prompts"
CATALOGUE = PROMPTS / "prompts.toml"
AUDIO = PROMPTS / "zh"

EXPECTED_NAMES = {
    "hcp-rating-menu",
    "hcp-rating-invalid",
    "hcp-rating-timeout",
    "hcp-rating-thanks",
    "hcp-rating-goodbye",
    "hcp-rating-reason-menu",
    "hcp-rating-comment",
    "hcp-rating-comment-thanks",
}


def _catalogue() -> dict[str, dict[str, str]]:
    with CATALOGUE.open("rb") as f:
        return tomllib.load(f)


def test_prompt_names_are_exactly_those_the_dialogue_plays():
    assert set(_catalogue()) == EXPECTED_NAMES


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_every_prompt_has_a_mandarin_text_and_a_purpose(name):
    prompt = _catalogue()[name]

    assert isinstance(prompt["text"], str)
    assert any("\u4e00" <= char <= "\u9fff" for char in prompt["text"]), "text is Mandarin"
    assert isinstance(prompt["purpose"], str)
    assert prompt["purpose"].strip()
    assert "\n" not in prompt["purpose"]


def test_menu_offers_the_five_levels_in_hotline_order():
    """SPEC R1.2: 1 = 非常满意 … 5 = 非常不满意 on the voice menu."""
    text = _catalogue()["hcp-rating-menu"]["text"]

    assert text == "请您对本次服务进行评价：非常满意请按1，满意请按2，基本满意请按3，不满意请按4，非常不满意请按5。"


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_every_prompt_has_a_wav_asterisk_plays(name):
    with wave.open(str(AUDIO / f"{name}.wav"), "rb") as audio:
        assert audio.getframerate() == 8000
        assert audio.getnchannels() == 1
        assert audio.getsampwidth() == 2
        assert audio.getcomptype() == "NONE"
        assert audio.getnframes() / audio.getframerate() > 0.5


def test_no_wav_is_left_without_its_text():
    assert {path.stem for path in AUDIO.glob("*.wav")} == set(_catalogue())
