"""The SMS channel's settings as typed values, and the addressing rules (SPEC R3.6).

Pure: built once from the configuration, then passed to the store side and the service.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from gateway.config import Config
from gateway.sms.replies import ReplyRules
from gateway.sms.schedule import ScheduleSettings


@dataclass(frozen=True)
class SmsSettings:
    signature: str = "【12345热线】"
    source_addr: str = "10690012345"
    extension_digits: int = 4
    max_attempts: int = 3
    retry_delay: timedelta = timedelta(minutes=10)
    delivery_receipts: bool = True  # ask the SMSC for a receipt per part (SPEC R3.7)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    rules: ReplyRules = field(default_factory=ReplyRules)

    @classmethod
    def from_config(cls, config: Config) -> SmsSettings:
        return cls(
            signature=config.sms.signature,
            source_addr=config.smpp.source_addr,
            extension_digits=config.sms.extension_digits,
            max_attempts=config.sms.max_attempts,
            retry_delay=timedelta(seconds=config.sms.retry_delay),
            delivery_receipts=config.sms.delivery_receipts,
            schedule=ScheduleSettings.from_config(config.sms),
            rules=ReplyRules(key_map=config.agi.key_map),
        )

    def extension_code(self, service_record_id: int) -> str:
        """The record's extension code (扩展码): its id's last digits, fixed before any insert.

        Two open invitations to one phone share a code only when their records' ids are a
        multiple of 10**digits apart; correlation then takes the most recent (SPEC R3.6).
        """
        return str(service_record_id % 10**self.extension_digits).zfill(self.extension_digits)

    def source_for(self, extension_code: str | None) -> str:
        return self.source_addr + (extension_code or "")

    def extension_of(self, destination_addr: str) -> str | None:
        """The extension code in the address a reply was sent to, if it carries one."""
        address = destination_addr.strip().lstrip("+")
        if not address.startswith(self.source_addr):
            return None
        code = address[len(self.source_addr) :]
        return code if len(code) == self.extension_digits and code.isdigit() else None


def smpp_destination(e164: str) -> str:
    """The number as Chinese SMSCs take it: 11 national digits for +86 mobiles, else international."""
    digits = e164.lstrip("+")
    if digits.startswith("86") and len(digits) == 13:
        return digits[2:]
    return digits


def is_mobile(e164: str) -> bool:
    """Only mainland mobiles (+86 1xx…) can receive the invitation; land lines cannot (SPEC R3.1)."""
    return e164.startswith("+861") and len(e164) == 14
