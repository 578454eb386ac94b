"""Configuration: built-in defaults, the TOML file, GATEWAY_<SECTION>_<KEY>, every problem reported."""

from __future__ import annotations

from datetime import time
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import ConfigError, load_config, parse_duration
from gateway.rating import Level
from gateway.workdays import Period


def test_embedded_defaults_serve_without_a_file() -> None:
    config = load_config(None, environ={})
    assert (config.http.host, config.http.port) == ("127.0.0.1", 8080)
    assert (config.agi.host, config.agi.port) == ("127.0.0.1", 4573)
    assert (config.smtp.host, config.smtp.port) == ("127.0.0.1", 2525)
    assert config.store.effective_url.startswith("sqlite:///") and config.store.effective_url.endswith(
        "gateway.sqlite3"
    )
    assert config.sms.quiet_hours == (time(21, 0), time(8, 0))
    assert config.sms.default_rating_after == Period("working", 5)
    assert config.agi.key_map.level_for("1") is Level.VERY_SATISFIED
    assert config.agi.wait == 5.0


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[http]\nport = 9000\n[smpp]\nhost = "10.0.0.1"\n', encoding="utf-8")
    config = load_config(
        path,
        environ={
            "GATEWAY_HTTP_PORT": "9100",
            "GATEWAY_STORE_URL": "sqlite:///x.db",
            "GATEWAY_AGI_PORT": "4600",
            "GATEWAY_SMPP_HOST": "127.0.0.2",
            "GATEWAY_SMS_QUIET_HOURS": "",
        },
    )
    assert config.http.port == 9100
    assert config.store.effective_url == "sqlite:///x.db"
    assert config.agi.port == 4600
    assert config.smpp.host == "127.0.0.2"
    assert config.sms.quiet_hours is None


def test_every_problem_is_reported_with_source_key_and_reason(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[http]\nprot = 1\n[agi]\nwait = "5 parsecs"\nport = 70000\n[sms]\nquiet_hours = "9pm"\n'
        "[platform]\nenabled = true\n[colour]\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={"GATEWAY_HTTP_MAX_BODY_BYTES": "-1"})
    text = str(caught.value)
    for expected in (
        f"{path}: [http] prot: unknown key; did you mean 'port'?",
        f"{path}: [agi] wait: '5 parsecs' is not a duration",
        f"{path}: [agi] port: 70000 is not a TCP port",
        f"{path}: [sms] quiet_hours: '9pm' is not a range of hours",
        f"{path}: [colour]: unknown section",
        "[platform] url: must be set when [platform] enabled = true",
        "environment GATEWAY_HTTP_MAX_BODY_BYTES: [http] max_body_bytes: -1 must be at least 1",
    ):
        assert expected in text


@pytest.mark.parametrize(
    ("written", "complaint"),
    [
        (
            '[privacy]\ndefault_country_code = "+86"\n',
            "[privacy] default_country_code: '+86' is not a country calling code",
        ),
        ('[privacy]\ndefault_country_code = "086"\n', "[privacy] default_country_code: '086' is not"),
        ('[privacy]\ndefault_country_code = "８６"\n', "[privacy] default_country_code: '８６' is not"),
        ('[platform]\ntimeout = "0s"\n', "[platform] timeout: must be longer than 0 s"),
        (
            '[platform]\nenabled = true\nurl = "http://hcp.example.gov.cn/api"\napp_id = "gw"\nsecret = "s"\n',
            "[platform] url: http:// is allowed only on loopback",
        ),
    ],
)
def test_settings_that_would_corrupt_hashes_or_pushes_are_refused(tmp_path: Path, written: str, complaint: str) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(written, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert complaint in str(caught.value)


def test_a_loopback_platform_may_use_plain_http(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    key = "A" * 43 + "="
    path.write_text(
        f'[platform]\nenabled = true\nurl = "http://127.0.0.1:8443/api"\napp_id = "gw"\nsecret = "s"\n'
        f'[privacy]\nphone_hash_key = "{key}"\n',
        encoding="utf-8",
    )
    assert load_config(path, environ={}).platform.url == "http://127.0.0.1:8443/api"


@pytest.mark.parametrize(
    ("written", "taken"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("smsc.carrier.example", "smsc.carrier.example"),
        ("smsc_1.corp", "smsc_1.corp"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        (" [2001:db8::5] ", "2001:db8::5"),
        ("", ""),
    ],
)
def test_hosts_are_names_or_addresses_and_ipv6_brackets_come_off(written: str, taken: str) -> None:
    config = load_config(None, environ={"GATEWAY_SMPP_HOST": written, "GATEWAY_AGI_HOST": written})
    assert config.smpp.host == taken and config.agi.host == taken


@pytest.mark.parametrize(
    ("written", "words"),
    [
        ("127.0.0.1:2775", "names a port: give the host alone and the port in `port`"),
        ("[::1]:2775", "names a port"),
        ("smsc.example:2775", "names a port"),
        ("[smsc.example]", "only an IPv6 address goes in brackets"),
        ("smsc example", "is not a host name or an IP address"),
        ("-smsc.example", "is not a host name or an IP address"),
    ],
)
def test_a_host_that_cannot_be_one_is_refused_at_start_up(written: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ={"GATEWAY_SMPP_HOST": written})
    text = str(caught.value)
    assert text.startswith(f"environment GATEWAY_SMPP_HOST: [smpp] host: {written!r}") and words in text


def test_enabling_the_e_mail_listener_is_refused_while_the_channel_is_not_built() -> None:
    """Issue 2: listeners of channels not built yet are absent; enabling one must not pass in silence."""
    assert load_config(None, environ={}).smtp.enabled is False
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ={"GATEWAY_SMTP_ENABLED": "true"})
    assert str(caught.value).startswith("environment GATEWAY_SMTP_ENABLED: [smtp] enabled: the e-mail channel")


@pytest.mark.parametrize(
    ("content", "words"),
    [("[http\nport=1", "is not valid TOML"), ("\xff\xfe", "not UTF-8"), (None, "does not exist")],
)
def test_unreadable_files_get_one_clear_sentence(tmp_path: Path, content: str | None, words: str) -> None:
    path = tmp_path / "gateway.toml"
    if content is not None:
        path.write_bytes(content.encode("latin-1"))
    with pytest.raises(ConfigError, match=words):
        load_config(path, environ={})


def test_config_check_command_exits_non_zero_and_lists_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text("[agi]\nkey_map = { 1 = 5, 2 = 5, 3 = 3, 4 = 2, 5 = 1 }\n[http]\nport = 'x'\n", encoding="utf-8")
    assert main(["--config", str(path), "config", "check"]) == 1
    err = capsys.readouterr().err
    assert "[agi] key_map: the key map must give each of the five levels exactly one key" in err
    assert "[http] port: 'x' is not a whole number" in err
    good = tmp_path / "good.toml"
    good.write_text(f'[store]\ndata_dir = "{tmp_path}"\n', encoding="utf-8")
    assert main(["--config", str(good), "config", "check"]) == 0
    assert "configuration OK" in capsys.readouterr().out


def test_durations() -> None:
    assert parse_duration("90s") == 90 and parse_duration("5m") == 300 and parse_duration("24h") == 86400
    assert parse_duration("250ms") == 0.25 and parse_duration(3) == 3.0
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")


@pytest.mark.parametrize(
    ("environ", "complaint"),
    [
        ({"GATEWAY_AGI_WAIT": "0"}, "[agi] wait: '0' must be at least 1ms"),
        ({"GATEWAY_AGI_WAIT": "0.5ms"}, "[agi] wait: '0.5ms' must be at least 1ms"),
        ({"GATEWAY_AGI_IDLE_TIMEOUT": "0"}, "[agi] idle_timeout: '0' must be longer than 0"),
        ({"GATEWAY_STORE_URL": "sqlite://"}, "[store] url: an in-memory SQLite store is empty for each connection"),
        ({"GATEWAY_STORE_URL": "sqlite:///:memory:"}, "[store] url: an in-memory SQLite store"),
    ],
)
def test_settings_that_would_break_the_service_are_refused(environ: dict[str, str], complaint: str) -> None:
    """A wait of 0 crashed `run`, an idle timeout of 0 dropped every call, an in-memory store lost every token."""
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ=environ)
    assert complaint in str(caught.value)


def test_the_shortest_settings_that_still_serve_are_accepted(tmp_path: Path) -> None:
    config = load_config(
        None,
        environ={
            "GATEWAY_AGI_WAIT": "1ms",
            "GATEWAY_AGI_IDLE_TIMEOUT": "1s",
            "GATEWAY_AGI_SHUTDOWN_GRACE": "0s",
            "GATEWAY_STORE_URL": f"sqlite:///{tmp_path}/gateway.sqlite3",
        },
    )
    assert (config.agi.wait, config.agi.idle_timeout, config.agi.shutdown_grace) == (0.001, 1.0, 0.0)


@pytest.mark.parametrize("written", ["5", '"1=5"', "[1, 2]"])
def test_a_key_map_that_is_not_a_table_is_a_problem_not_a_crash(tmp_path: Path, written: str) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(f"[agi]\nkey_map = {written}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert "[agi] key_map: must be a table of key = level code" in str(caught.value)


@pytest.mark.parametrize(
    ("http_host", "agi_host"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("localhost", "127.0.0.1"),
        ("0.0.0.0", "127.0.0.1"),
        ("127.0.0.1", ""),
        ("::", "::1"),
        ("::1", "0:0:0:0:0:0:0:1"),
    ],
)
def test_listeners_that_would_take_one_port_from_each_other_are_refused(http_host: str, agi_host: str) -> None:
    environ = {"GATEWAY_HTTP_HOST": http_host, "GATEWAY_AGI_HOST": agi_host, "GATEWAY_AGI_PORT": "8080"}
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ=environ)
    assert "[agi] port: 8080 is also used by [http]" in str(caught.value)


@pytest.mark.parametrize(("http_host", "agi_host"), [("127.0.0.1", "127.0.0.2"), ("localhost", "::1")])
def test_listeners_on_different_addresses_may_share_a_port(http_host: str, agi_host: str) -> None:
    environ = {"GATEWAY_HTTP_HOST": http_host, "GATEWAY_AGI_HOST": agi_host, "GATEWAY_AGI_PORT": "8080"}
    assert load_config(None, environ=environ).agi.port == 8080


def test_a_near_miss_of_a_gateway_variable_is_reported_and_others_are_left_alone() -> None:
    """A misspelled override was silently ignored; variables that are not near one are someone else's."""
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ={"GATEWAY_HTTPPORT": "9090"})
    assert "did you mean GATEWAY_HTTP_PORT?" in str(caught.value)
    load_config(None, environ={"GATEWAY_FOO_BAR": "1", "GATEWAY_CONFIG": "x"})
