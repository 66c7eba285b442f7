"""Credentials never reach a message: mask_url, config errors, repr of configs, Redis tiers' log lines."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from kvtier.cli import main as cli_main
from kvtier.connector.config import ConfigError, load_config
from kvtier.storage_backends.redis_backend import RedisBackend
from kvtier.storage_backends.redis_cluster import RedisClusterBackend, parse_cluster_url
from kvtier.storage_backends.redis_common import mask_url

# Every password is "Sec1" + separator + "Ret2": neither half may appear in any output.
SEPARATORS = ["/", "#", "?", "@", ":", "%2F", "/?#@:", "&password=", " "]
FORMS = {
    "user_and_password": "redis://alice:{pw}@h:1/0",
    "password_only": "redis://:{pw}@h:1/0",
    "tls_with_options": "rediss://alice:{pw}@[::1]:6380/2?ssl_ca_certs=/ca.pem",
    "query_password": "redis://h:1/0?db=0&password={pw}",
    "query_ssl_password": "rediss://h:1/0?ssl_password={pw}&ssl_ca_certs=/ca.pem",
    "cluster": "redis+cluster://:{pw}@h1:1,h2:2",
    "cluster_user_tls": "rediss+cluster://alice:{pw}@h1:1,h2:2/0?ssl_ca_certs=/ca.pem",
    "no_scheme": ":{pw}@h:1",
}
CASES = [(form, sep) for form in FORMS for sep in SEPARATORS]


def _url(form: str, sep: str) -> str:
    return FORMS[form].format(pw=f"Sec1{sep}Ret2")


def _assert_hidden(text: str) -> None:
    assert "Sec1" not in text and "Ret2" not in text, text


@pytest.mark.parametrize("form, sep", CASES)
def test_mask_url_never_shows_any_part_of_the_password(form: str, sep: str) -> None:
    masked = mask_url(_url(form, sep))
    _assert_hidden(masked)
    assert "***" in masked


@pytest.mark.parametrize("url, expected", [
    ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
    ("redis://alice:p/w@h:1/0", "redis://alice:***@h:1/0"),
    ("redis+cluster://:p#w@h1:1,h2:2", "redis+cluster://:***@h1:1,h2:2"),
    ("redis://h:1?db=1&password=pw", "redis://h:1?db=1&password=***"),
    ("redis://bare-secret@h:1", "redis://***@h:1"),  # no ':': it may be a password, so it is masked
    ("redis://localhost:6379/0?ssl_ca_certs=/ca.pem", "redis://localhost:6379/0?ssl_ca_certs=/ca.pem"),
])
def test_mask_url_keeps_what_is_not_secret(url: str, expected: str) -> None:
    assert mask_url(url) == expected


def _load(tmp_path: Path, url: str):
    path = tmp_path / "kvtier.yaml"
    path.write_text(f"tiers: [{{type: redis, url: {url!r}}}]\n")
    return load_config(path, environ={})


@pytest.mark.parametrize("form, sep", CASES)
def test_config_errors_and_reprs_never_show_the_password(tmp_path: Path, form: str, sep: str) -> None:
    url = _url(form, sep)
    try:
        config = _load(tmp_path, url)
    except ConfigError as exc:  # raw / ? # in a password, or no scheme: refused, with the URL masked
        _assert_hidden(str(exc))
        assert "tiers[0]" in str(exc)
        return
    _assert_hidden(repr(config))
    _assert_hidden(str(config))
    _assert_hidden(repr(config.tiers[0]))
    assert config.tiers[0].url == url  # the value itself is intact


@pytest.mark.parametrize("bad", [
    "http://:{pw}@h:1/0",  # wrong scheme
    "redis+cluster://:{pw}@h1:1,h2:x",  # a seed is not host:port
    "redis+cluster://:{pw}@h1:1/3",  # a database other than 0
    "redis://:{pw}@h:99999/0",  # port out of range
])
@pytest.mark.parametrize("sep", SEPARATORS)
def test_a_rejected_url_is_masked_in_the_config_error(tmp_path: Path, bad: str, sep: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, bad.format(pw=f"Sec1{sep}Ret2"))
    message = str(info.value)
    _assert_hidden(message)
    assert message.startswith("invalid kvtier config: tiers[0]") and "\n" not in message


def test_a_raw_slash_in_a_password_is_refused_with_a_hint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, "redis://:Sec1/Ret2@h:1/0")
    assert "tiers[0].url = 'redis://:***@h:1/0'" in str(info.value) and "percent-encode" in str(info.value)
    with pytest.raises(ValueError) as direct:  # the backend refuses it too, before redis-py misreads it
        RedisBackend("redis://:Sec1/Ret2@h:1/0")
    _assert_hidden(str(direct.value))


def test_a_yaml_error_does_not_quote_the_line(tmp_path: Path) -> None:
    path = tmp_path / "kvtier.yaml"
    path.write_text("tiers:\n  - {type: redis, url: redis://:Sec1-Ret2@h:1/0: x}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert "not valid YAML at line 2" in str(info.value)
    _assert_hidden(str(info.value))


def test_a_cluster_url_repr_and_errors_hide_credentials() -> None:
    spec = parse_cluster_url("rediss+cluster://alice:Sec1@h1:1,h2:2/0?ssl_password=Ret2")
    _assert_hidden(repr(spec))
    with pytest.raises(ValueError) as info:
        parse_cluster_url("redis+cluster://:Sec1/Ret2@h1:1,h2:2")
    _assert_hidden(str(info.value))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("url", [
    "redis://alice:Sec1%2FRet2@127.0.0.1:{port}/0",
    "redis://:Sec1@Ret2@127.0.0.1:{port}/0",
    "redis://:Sec1:Ret2@127.0.0.1:{port}/0",
    "redis://:Sec1%23Ret2%3F@127.0.0.1:{port}/0",
    "redis://127.0.0.1:{port}/0?password=Sec1Ret2",
])
def test_a_redis_tier_that_cannot_connect_logs_no_password(url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    backend = RedisBackend(url.format(port=_closed_port()), retry_interval_s=0, connect_timeout_s=0.5)
    assert backend.get(["0" * 64]) == [None] and backend.put([("0" * 64, b"x")]) == 0
    backend.close()
    assert caplog.records and any("unavailable" in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        _assert_hidden(record.getMessage())
    _assert_hidden(backend.url)


def test_a_redis_cluster_tier_that_cannot_connect_logs_no_password(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    port = _closed_port()
    backend = RedisClusterBackend(f"redis+cluster://alice:Sec1%2FRet2@127.0.0.1:{port},127.0.0.1:{port}",
                                  retry_interval_s=0.05, connect_timeout_s=0.5)
    assert backend.get(["0" * 64]) == [None]
    backend.close()
    assert caplog.records
    for record in caplog.records:
        _assert_hidden(record.getMessage())


def test_inspect_with_a_bad_url_prints_it_masked(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["inspect", "--redis", "redis://:Sec1/Ret2@h:1/0"]) == 2
    err = capsys.readouterr().err
    assert "redis://:***@h:1/0" in err
    _assert_hidden(err)
