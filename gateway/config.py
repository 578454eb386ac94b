"""The gateway's configuration: one typed object, built once at start-up.

Sources, weakest first: the built-in defaults (``gateway/defaults.toml``, which is also the
documented example), the deployment's TOML file, and environment variables
``GATEWAY_<SECTION>_<KEY>``. Code below this module never reads the environment.
Every problem is collected and reported at once, in plain words: source, key, what is wrong.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import time
from importlib import resources
from pathlib import Path
from typing import Any

from gateway.rating import KeyMap, KeyMapError
from gateway.workdays import Period

ENV_PREFIX = "GATEWAY_"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the configuration, worded for the person who deploys."""

    source: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.key}: {self.message}"


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` lists every reason."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def parse_duration(text: str) -> float:
    """Seconds from ``"90s"``, ``"5m"``, ``"24h"``, ``"1d"``, ``"250ms"`` or a bare number."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", str(text))
    if not match:
        raise ValueError(f'{text!r} is not a duration; write e.g. "90s", "5m" or "24h"')
    number, unit = float(match[1]), match[2] or "s"
    return number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def parse_quiet_hours(text: str) -> tuple[time, time] | None:
    """``"21:00-08:00"`` → (21:00, 08:00); empty → None (SPEC R3.2)."""
    if not str(text).strip():
        return None
    match = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", str(text))
    if not match:
        raise ValueError(f'{text!r} is not a range of hours; write e.g. "21:00-08:00"')
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    try:
        return time(h1, m1), time(h2, m2)
    except ValueError:
        raise ValueError(f"{text!r} has an hour or minute out of range") from None


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{value!r} is not true or false")


def _parse_int(value: Any) -> int:
    if isinstance(value, bool | float):
        raise ValueError(f"{value!r} is not a whole number")
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number") from None


def _parse_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    try:
        return float(str(value).strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a number") from None


def _parse_str(value: Any) -> str:
    if isinstance(value, dict | list):
        raise ValueError("must be a single text value")
    return str(value)


#: A host name as resolvers take it (RFC 1123 labels; underscores, which some internal DNS uses).
_HOST_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST_NAME = re.compile(rf"(?=.{{1,253}}$){_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")


def _host(value: Any) -> str:
    """A host name, an IPv4 address or an IPv6 address, with or without brackets (``[::1]``).

    The brackets are taken off: Twisted's listeners and ``getaddrinfo`` want the bare address.
    A port written into the host (``127.0.0.1:2775``) is refused with a pointer to ``port``,
    rather than failing later as a name that does not resolve.
    """
    text = _parse_str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        if not _is_ipv6(text):
            raise ValueError(f"{value!r}: only an IPv6 address goes in brackets")
        return text
    if not text or _is_ipv6(text) or _HOST_NAME.fullmatch(text):
        return text  # empty: every interface (a listener)
    if re.fullmatch(r"\[?[^\s\]]*\]?:\d+", text):
        raise ValueError(f"{value!r} names a port: give the host alone and the port in `port`")
    raise ValueError(f"{value!r} is not a host name or an IP address")


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _port(value: Any) -> int:
    port = _parse_int(value)
    if not 0 <= port <= 65535:
        raise ValueError(f"{port} is not a TCP port (0-65535)")
    return port


def _positive_int(value: Any) -> int:
    number = _parse_int(value)
    if number < 1:
        raise ValueError(f"{number} must be at least 1")
    return number


def _positive_float(value: Any) -> float:
    number = _parse_float(value)
    if number <= 0:
        raise ValueError(f"{number} must be greater than 0")
    return number


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"{value!r} must be longer than 0")
    return seconds


def _key_wait(value: Any) -> float:
    """SPEC R2.3's wait for a key: Asterisk takes it in whole milliseconds, and 0 means no wait at all."""
    seconds = parse_duration(value)
    if seconds < 0.001:
        raise ValueError(f"{value!r} must be at least 1ms; the caller needs time to press a key")
    return seconds


def _key_map(value: Any) -> KeyMap:
    if not isinstance(value, Mapping):
        raise ValueError('must be a table of key = level code, e.g. [agi.key_map] "1" = 5')
    return KeyMap.from_config(value)


def _byte(value: Any) -> int:
    number = _parse_int(value)
    if not 0 <= number <= 255:
        raise ValueError(f"{number} is not an SMPP one-byte value (0-255)")
    return number


def _choice(*choices: str) -> Any:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"{value!r} is not one of: {', '.join(choices)}")
        return text

    return parse


def _period(value: Any) -> Period:
    return Period.parse(str(value))


def _opt(parse: Any, doc: str = "") -> Any:
    return field(metadata={"parse": parse, "doc": doc})


@dataclass(frozen=True)
class StoreConfig:
    data_dir: str = _opt(_parse_str)
    url: str = _opt(_parse_str)
    threads: int = _opt(_positive_int)
    group_commit_wait: float = _opt(parse_duration)
    group_commit_min: int = _opt(_positive_int)

    @property
    def effective_url(self) -> str:
        """The SQLAlchemy URL, with the embedded SQLite default filled in."""
        if self.url.strip():
            return self.url.strip()
        return f"sqlite:///{Path(self.data_dir).resolve() / 'gateway.sqlite3'}"


@dataclass(frozen=True)
class PrivacyConfig:
    encryption_key: str = _opt(_parse_str)
    phone_hash_key: str = _opt(_parse_str)
    default_country_code: str = _opt(_parse_str)


@dataclass(frozen=True)
class CalendarConfig:
    override_file: str = _opt(_parse_str)


@dataclass(frozen=True)
class HttpConfig:
    enabled: bool = _opt(_parse_bool)
    host: str = _opt(_host)
    port: int = _opt(_port)
    max_body_bytes: int = _opt(_positive_int)


@dataclass(frozen=True)
class AgiConfig:
    enabled: bool = _opt(_parse_bool)
    host: str = _opt(_host)
    port: int = _opt(_port)
    backlog: int = _opt(_positive_int)
    wait: float = _opt(_key_wait)
    max_attempts: int = _opt(_positive_int)
    prompt_dir: str = _opt(_parse_str)
    reason_menu: bool = _opt(_parse_bool)
    voice_comment: bool = _opt(_parse_bool)
    comment_max: float = _opt(parse_duration)
    comment_dir: str = _opt(_parse_str)
    idle_timeout: float = _opt(_positive_duration)
    shutdown_grace: float = _opt(parse_duration)
    answer: bool = _opt(_parse_bool)
    key_map: KeyMap = _opt(_key_map)


@dataclass(frozen=True)
class SmtpConfig:
    enabled: bool = _opt(_parse_bool)
    host: str = _opt(_host)
    port: int = _opt(_port)


@dataclass(frozen=True)
class SmppConfig:
    enabled: bool = _opt(_parse_bool)
    host: str = _opt(_host)
    port: int = _opt(_port)
    system_id: str = _opt(_parse_str)
    password: str = _opt(_parse_str)
    system_type: str = _opt(_parse_str)
    source_addr: str = _opt(_parse_str)
    bind_mode: str = _opt(_choice("transceiver", "transmitter_receiver"))
    window: int = _opt(_positive_int)
    rate: float = _opt(_positive_float)
    source_addr_ton: int = _opt(_byte)
    source_addr_npi: int = _opt(_byte)
    dest_addr_ton: int = _opt(_byte)
    dest_addr_npi: int = _opt(_byte)
    enquire_link_interval: float = _opt(_positive_duration)
    response_timeout: float = _opt(_positive_duration)
    reconnect_min_delay: float = _opt(_positive_duration)
    reconnect_max_delay: float = _opt(_positive_duration)
    throttle_delay: float = _opt(_positive_duration)
    throttle_max_delay: float = _opt(_positive_duration)
    throttle_recovery: float = _opt(parse_duration)


@dataclass(frozen=True)
class SmsConfig:
    invite_delay: float = _opt(parse_duration)
    quiet_hours: tuple[time, time] | None = _opt(parse_quiet_hours)
    reminder_after: float = _opt(parse_duration)
    default_rating_after: Period = _opt(_period)
    signature: str = _opt(_parse_str)
    extension_digits: int = _opt(_positive_int)
    max_attempts: int = _opt(_positive_int)
    retry_delay: float = _opt(parse_duration)
    delivery_receipts: bool = _opt(_parse_bool)


@dataclass(frozen=True)
class PlatformConfig:
    enabled: bool = _opt(_parse_bool)
    url: str = _opt(_parse_str)
    app_id: str = _opt(_parse_str)
    secret: str = _opt(_parse_str)
    batch_size: int = _opt(_positive_int)
    timeout: float = _opt(parse_duration)


@dataclass(frozen=True)
class LogConfig:
    level: str = _opt(_choice("debug", "info", "warning", "error"))
    format: str = _opt(_choice("text", "json"))


@dataclass(frozen=True)
class Config:
    store: StoreConfig
    privacy: PrivacyConfig
    calendar: CalendarConfig
    http: HttpConfig
    agi: AgiConfig
    smtp: SmtpConfig
    smpp: SmppConfig
    sms: SmsConfig
    platform: PlatformConfig
    log: LogConfig
    source: str = "built-in defaults"

    @property
    def data_dir(self) -> Path:
        return Path(self.store.data_dir)


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Config) if f.name != "source"}
_SECTION_CLASSES = {
    "store": StoreConfig,
    "privacy": PrivacyConfig,
    "calendar": CalendarConfig,
    "http": HttpConfig,
    "agi": AgiConfig,
    "smtp": SmtpConfig,
    "smpp": SmppConfig,
    "sms": SmsConfig,
    "platform": PlatformConfig,
    "log": LogConfig,
}


def default_values() -> dict[str, dict[str, Any]]:
    """The built-in defaults, as written in ``gateway/defaults.toml``."""
    text = resources.files("gateway").joinpath("defaults.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def load_config(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build the configuration, or raise :class:`ConfigError` listing every problem."""
    environ = os.environ if environ is None else environ
    problems: list[Problem] = []
    merged = default_values()
    # Keep which source set each key, so a problem names the right place.
    origin: dict[tuple[str, str], str] = {}
    source = "built-in defaults"

    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as handle:
                user = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError([Problem(source, "(file)", "the file does not exist")]) from None
        except OSError as error:
            raise ConfigError([Problem(source, "(file)", f"cannot be read: {error.strerror}")]) from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError([Problem(source, "(file)", f"is not valid TOML: {error}")]) from None
        except UnicodeDecodeError:
            raise ConfigError([Problem(source, "(file)", "is not UTF-8 text")]) from None
        for section, values in user.items():
            if section not in _SECTION_CLASSES:
                problems.append(
                    Problem(source, f"[{section}]", "unknown section" + _suggest(section, list(_SECTION_CLASSES)))
                )
                continue
            if not isinstance(values, dict):
                problems.append(Problem(source, section, "must be a [section] table"))
                continue
            for key, value in values.items():
                if key not in merged[section]:
                    problems.append(
                        Problem(source, f"[{section}] {key}", "unknown key" + _suggest(key, list(merged[section])))
                    )
                    continue
                merged[section][key] = value
                origin[(section, key)] = source

    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == "GATEWAY_CONFIG":
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section = next((s for s in _SECTION_CLASSES if rest.startswith(s + "_")), None)
        if section is None:
            # Not the gateway's, unless it is a near miss of one of its names (GATEWAY_HTTPPORT).
            known = [f"{ENV_PREFIX}{s}_{k}".upper() for s in _SECTION_CLASSES for k in merged[s]]
            close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.9)
            if close:
                problems.append(Problem(f"environment {name}", "(variable)", f"unknown; did you mean {close[0]}?"))
            continue
        key = rest[len(section) + 1 :]
        if key not in merged[section]:
            problems.append(
                Problem(
                    f"environment {name}", f"[{section}] {key}", "unknown key" + _suggest(key, list(merged[section]))
                )
            )
            continue
        if isinstance(merged[section][key], dict):
            problems.append(
                Problem(f"environment {name}", f"[{section}] {key}", "is a table and can only be set in the file")
            )
            continue
        merged[section][key] = value
        origin[(section, key)] = f"environment {name}"

    sections: dict[str, Any] = {}
    for section, cls in _SECTION_CLASSES.items():
        values: dict[str, Any] = {}
        for fld in dataclasses.fields(cls):
            raw = merged[section][fld.name]
            try:
                values[fld.name] = fld.metadata["parse"](raw)
            except (ValueError, KeyMapError, TypeError) as error:
                where = origin.get((section, fld.name), source if path else "built-in defaults")
                problems.append(Problem(where, f"[{section}] {fld.name}", str(error)))
        if len(values) == len(dataclasses.fields(cls)):
            sections[section] = cls(**values)

    problems.extend(_cross_checks(sections, origin, source))
    if problems:
        raise ConfigError(problems)
    return Config(**sections, source=source)


def _cross_checks(sections: dict[str, Any], origin: dict[tuple[str, str], str], source: str) -> list[Problem]:
    """Rules that involve more than one key."""
    problems: list[Problem] = []

    def where(section: str, key: str) -> str:
        return origin.get((section, key), source)

    if len(sections) < len(_SECTION_CLASSES):
        # Fill sections that failed to parse with their defaults, so the other checks still run.
        defaults = default_values()
        for name, cls in _SECTION_CLASSES.items():
            if name not in sections:
                sections = {
                    **sections,
                    name: cls(**{f.name: f.metadata["parse"](defaults[name][f.name]) for f in dataclasses.fields(cls)}),
                }
    url = sections["store"].url.strip()
    if url and not re.match(r"^(sqlite|postgresql)(\+\w+)?://", url):
        problems.append(
            Problem(
                where("store", "url"),
                "[store] url",
                f"{url.split('://')[0]!r} is not supported; use sqlite:/// or postgresql+psycopg://",
            )
        )
    elif url and _is_in_memory_sqlite(url):
        problems.append(
            Problem(
                where("store", "url"),
                "[store] url",
                "an in-memory SQLite store is empty for each connection and lost at exit; "
                "name a file (sqlite:////var/lib/hcp-gateway/gateway.sqlite3) or leave it empty",
            )
        )
    platform = sections["platform"]
    if platform.enabled:
        for key in ("url", "app_id", "secret"):
            if not getattr(platform, key).strip():
                problems.append(
                    Problem(where("platform", key), f"[platform] {key}", "must be set when [platform] enabled = true")
                )
        if platform.url and not re.match(r"^https?://", platform.url):
            problems.append(
                Problem(where("platform", "url"), "[platform] url", "must start with https:// (or http:// on loopback)")
            )
        elif platform.url.startswith("http://") and not _is_loopback_url(platform.url):
            problems.append(
                Problem(
                    where("platform", "url"),
                    "[platform] url",
                    "http:// is allowed only on loopback (PLATFORM.md Transport); use https://",
                )
            )
    if platform.timeout <= 0:
        problems.append(Problem(where("platform", "timeout"), "[platform] timeout", "must be longer than 0 s"))
    country = sections["privacy"].default_country_code
    if not re.fullmatch(r"[1-9][0-9]{0,2}", country):  # ASCII digits: "８６" would make other hashes
        problems.append(
            Problem(
                where("privacy", "default_country_code"),
                "[privacy] default_country_code",
                f'{country!r} is not a country calling code; write its digits only, e.g. "86"',
            )
        )
    smpp = sections["smpp"]
    if smpp.enabled and not smpp.system_id:
        problems.append(
            Problem(where("smpp", "system_id"), "[smpp] system_id", "must be set when [smpp] enabled = true")
        )
    for low, high in (("reconnect_min_delay", "reconnect_max_delay"), ("throttle_delay", "throttle_max_delay")):
        if getattr(smpp, high) < getattr(smpp, low):
            problems.append(Problem(where("smpp", high), f"[smpp] {high}", f"must not be shorter than {low}"))
    if sections["smtp"].enabled:
        # The e-mail channel is not built yet: say so rather than start with nothing listening.
        problems.append(
            Problem(
                where("smtp", "enabled"),
                "[smtp] enabled",
                "the e-mail channel is not part of this version, so nothing would listen; set it to false",
            )
        )
    listeners = [(s, sections[s]) for s in ("http", "agi", "smtp") if sections[s].enabled]
    for index, (name, listener) in enumerate(listeners):
        if not listener.port:  # 0: a port the system picks, never one already taken
            continue
        clash = next(
            (
                other
                for other, earlier in listeners[:index]
                if earlier.port == listener.port and _same_listen_address(earlier.host, listener.host)
            ),
            None,
        )
        if clash is not None:
            problems.append(
                Problem(where(name, "port"), f"[{name}] port", f"{listener.port} is also used by [{clash}]")
            )
    override = sections["calendar"].override_file
    if override and not Path(override).is_file():
        problems.append(
            Problem(where("calendar", "override_file"), "[calendar] override_file", f"{override} does not exist")
        )
    for key in ("encryption_key", "phone_hash_key"):
        value = getattr(sections["privacy"], key)
        if value:
            from gateway.privacy import KeyMaterialError, decode_key

            try:
                decode_key(value)
            except KeyMaterialError as error:
                problems.append(Problem(where("privacy", key), f"[privacy] {key}", str(error)))
    return problems


def _is_in_memory_sqlite(url: str) -> bool:
    """``sqlite://``, ``sqlite:///:memory:`` or ``mode=memory``: a database of each connection's own."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return False
    if parsed.get_backend_name() != "sqlite":
        return False
    database = parsed.database or ""
    return database in ("", ":memory:") or "mode=memory" in database or parsed.query.get("mode") == "memory"


#: Hosts that listen on every address: a listener there takes the port from any other.
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


def _listen_address(host: str) -> str:
    """The address a listener's host binds: ``localhost`` is 127.0.0.1 (no other name is looked up)."""
    if host.lower().rstrip(".") == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower().rstrip(".")


def _same_listen_address(first: str, second: str) -> bool:
    """Whether two listeners on one port would take it from each other."""
    first, second = _listen_address(first), _listen_address(second)
    return first in _WILDCARD_HOSTS or second in _WILDCARD_HOSTS or first == second


def _is_loopback_url(url: str) -> bool:
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
