"""The dialogue's settings from the ``[agi]`` configuration, for both AGI adapters."""

from __future__ import annotations

from datetime import timedelta

from gateway.config import Config
from gateway.ivr.dialogue import DialogueSettings
from gateway.rating import Level


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


#: How long a bad rating's push waits for its reasons and comment (SPEC R2.5) if the call's end
#: is never seen (a crash): the push goes out then, without them, rather than never.
DETAIL_HOLD = timedelta(minutes=10)


def details_may_follow(settings: DialogueSettings, level: Level) -> bool:
    """Whether the caller will be asked for reasons or a comment after this rating (SPEC R2.5).

    Such a rating is pushed when the call ends, so that the platform gets it with its
    evalDetail (a pushed record cannot be amended, PLATFORM.md).
    """
    return level.is_bad and (settings.reason_menu or settings.voice_comment)
