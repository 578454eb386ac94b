"""The dialogue's settings from the ``[agi]`` configuration, for both AGI adapters."""

from __future__ import annotations

from gateway.config import Config
from gateway.ivr.dialogue import DialogueSettings


def dialogue_settings(config: Config) -> DialogueSettings:
    agi_config = config.agi
    return DialogueSettings(
        key_map=agi_config.key_map,
        max_attempts=agi_config.max_attempts,
        wait_ms=int(agi_config.wait * 1000),
        prompt_dir=agi_config.prompt_dir,
        reason_menu=agi_config.reason_menu,
        voice_comment=agi_config.voice_comment,
        comment_max_s=max(1, int(agi_config.comment_max)),
        answer_first=agi_config.answer,
        comment_path_template=agi_config.comment_dir.rstrip("/") + "/{call_id}",
    )
