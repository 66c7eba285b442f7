"""Configuration: YAML, environment and inline overrides, and one clear message per bad config."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.cli import main as cli_main
from kvtier.connector.config import ConfigError, DiskTier, RedisTier, load_config, parse_byte_size

EXAMPLES = sorted((Path(__file__).parents[1] / "examples" / "configs").glob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kvtier.yaml"
    path.write_text(text)
    return path


def test_embedded_default_is_cpu_over_disk() -> None:
    config = load_config(environ={"HOME": "/home/u"})
    assert [t.type for t in config.tiers] == ["cpu", "disk"]
    assert config.chunk_size == 256 and config.write_policy == "write_through"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_config_is_valid(path: Path) -> None:
    assert load_config(path, environ={}).tiers


def test_example_configs_cover_each_tier_type() -> None:
    types = {t.type for p in EXAMPLES for t in load_config(p, environ={}).tiers}
    assert types == {"cpu", "disk", "redis"} and len(EXAMPLES) >= 5


@pytest.mark.parametrize("text, expected", [
    ("4GiB", 4 * 2**30), ("512MB", 512 * 10**6), ("1.5g", 1_500_000_000), ("100", 100), ("2 kib", 2048),
])
def test_byte_sizes(text: str, expected: int) -> None:
    assert parse_byte_size(text) == expected


def test_precedence_yaml_then_environment_then_inline(tmp_path: Path) -> None:
    path = _write(tmp_path, "chunk_size: 128\ntiers:\n  - {type: cpu, max_bytes: 1GiB}\n"
                            "  - {type: redis, url: 'redis://a:1/0'}\n")
    env = {"KVTIER_CHUNK_SIZE": "512", "KVTIER_REDIS__URL": "redis://env:2/0", "KVTIER_CPU__MAX_BYTES": "2GiB"}
    config = load_config(path, environ=env)
    assert config.chunk_size == 512 and config.tiers[0].max_bytes == 2 * 2**30
    assert isinstance(config.tiers[1], RedisTier) and config.tiers[1].url == "redis://env:2/0"
    config = load_config(path, overrides={"chunk_size": 1024, "redis.ttl_seconds": 60}, environ=env)
    assert config.chunk_size == 1024 and config.tiers[1].ttl_seconds == 60


def test_a_stray_kvtier_variable_is_named_in_the_error() -> None:
    """A script's own KVTIER_SOMETHING is read as an override: the error says where it came from."""
    with pytest.raises(ConfigError, match=r"venv: unknown key.*read from the environment: KVTIER_VENV"):
        load_config(environ={"KVTIER_VENV": ".venv"})
    with pytest.raises(ConfigError, match=r"names no configured tier.*KVTIER_PD__CONFIG"):
        load_config(environ={"KVTIER_PD__CONFIG": "x.yaml"})
    with pytest.raises(ConfigError) as plain:
        load_config(overrides={"venv": 1}, environ={})
    assert "environment" not in str(plain.value)


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = _write(tmp_path, "tiers: [{type: disk, path: $HOME/kv, max_bytes: 1GiB}]\n")
    config = load_config(environ={"KVTIER_CONFIG": str(path)})
    assert isinstance(config.tiers[0], DiskTier) and not config.tiers[0].path.startswith("$")


@pytest.mark.parametrize("text, must_name", [
    ("chunk_size: -3\ntiers: [{type: cpu}]", ["chunk_size", "-3", "greater than or equal to 1"]),
    ("chunk_size: many\ntiers: [{type: cpu}]", ["chunk_size", "'many'", "integer"]),
    ("chunk_sise: 3\ntiers: [{type: cpu}]", ["chunk_sise", "unknown key", "chunk_size"]),
    ("tiers: [{type: cpux}]", ["tiers[0].type", "'cpux'", "cpu, disk, redis"]),
    ("tiers: [{max_bytes: 3}]", ["tiers[0]", "type"]),
    ("tiers: [{type: cpu, max_bytes: lots}]", ["tiers[0].max_bytes", "'lots'", "4GiB"]),
    ("tiers: [{type: cpu, max_bytes: 0}]", ["tiers[0].max_bytes", "greater than 0"]),
    ("tiers: [{type: cpu, colour: red}]", ["tiers[0].colour", "unknown key", "slot_bytes"]),
    ("tiers: [{type: cpu, max_bytes: 1KiB}]", ["slot_bytes", "max_bytes"]),
    ("tiers: [{type: disk}]", ["tiers[0].path", "required"]),
    ("tiers: [{type: redis, url: 'http://x'}]", ["tiers[0].url", "'http://x'", "rediss?://"]),
    ("tiers: [{type: redis, url: 'redis://x', op_timeout_s: -1}]", ["op_timeout_s", "-1", "greater than 0"]),
    ("tiers: [{type: redis, url: 'redis://x', ttl_seconds: 0}]", ["ttl_seconds", "greater than 0"]),
    ("tiers: [{type: cpu}, {type: cpu}]", ["unique", "cpu"]),
    ("tiers: []", ["tiers", "at least 1"]),
    ("chunk_size: 256", ["tiers", "required"]),
    ("tiers: [{type: cpu}]\nwrite_policy: sometimes", ["write_policy", "'sometimes'", "write_through", "top_only"]),
    ("tiers: [{type: cpu}]\nmetrics: {port: 99999}", ["metrics.port", "99999", "65535"]),
    ("- just\n- a list", ["top level", "mapping"]),
    ("tiers: [", ["not valid YAML"]),
])
def test_bad_configs_fail_with_one_message_naming_key_value_and_rule(tmp_path: Path, text: str, must_name: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), environ={})
    message = str(info.value)
    assert message.startswith("invalid kvtier config:")
    for part in must_name:
        assert part in message, f"{part!r} missing from: {message}"


def test_bad_overrides_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="names no configured tier"):
        load_config(overrides={"redis.url": "redis://x"}, environ={})
    with pytest.raises(ConfigError, match="KVTIER_CHUNK_SIZE|chunk_size"):
        load_config(environ={"KVTIER_CHUNK_SIZE": "0"})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml", environ={})


def test_check_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["check-config", str(EXAMPLES[0])]) == 0
    assert "OK" in capsys.readouterr().out
    assert cli_main(["check-config", str(_write(tmp_path, "tiers: [{type: nvme}]"))]) == 2
    assert "tiers[0].type = 'nvme'" in capsys.readouterr().err


@pytest.mark.parametrize("url", [
    "redis+cluster://10.0.0.1:7000", "rediss+cluster://u:p@a:7000,b:7001,[::1]:7002/0?ssl_ca_certs=/ca.pem",
])
def test_redis_cluster_urls_are_accepted(tmp_path: Path, url: str) -> None:
    config = load_config(_write(tmp_path, f"tiers: [{{type: redis, url: '{url}'}}]"), environ={})
    assert config.tiers[0].url == url


@pytest.mark.parametrize("url, prefix, must_name", [
    ("redis+cluster://:secret@a:1,b:x", "kvtier:", ["tiers[0]", "'b:x' is not host:port", ":***@"]),
    ("rediss+cluster://:secret@a:1/2", "kvtier:", ["only database 0"]),
    ("redis+cluster://", "kvtier:", ["names no node"]),
    ("redis+cluster://a:1", "{kv}:", ["key_prefix", "hash tag"]),
])
def test_bad_redis_cluster_config_is_one_clear_line(tmp_path: Path, url: str, prefix: str, must_name: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, f"tiers: [{{type: redis, url: '{url}', key_prefix: '{prefix}'}}]"), environ={})
    message = str(info.value)
    assert message.startswith("invalid kvtier config:") and "\n" not in message and "secret" not in message
    for part in must_name:
        assert part in message, f"{part!r} missing from: {message}"


def test_flush_and_lock_timeouts_default_and_override(tmp_path: Path) -> None:
    config = load_config(environ={"HOME": "/home/u"})
    assert config.flush_timeout_s == 30.0 and config.tiers[1].lock_timeout_s == 2.0
    config = load_config(overrides={"flush_timeout_s": 5, "disk.lock_timeout_s": 0.25}, environ={"HOME": "/home/u"})
    assert config.flush_timeout_s == 5.0 and config.tiers[1].lock_timeout_s == 0.25


@pytest.mark.parametrize("text, must_name", [
    ("flush_timeout_s: 0", ["flush_timeout_s", "= 0", "greater than 0"]),
    ("flush_timeout_s: -1", ["flush_timeout_s", "-1", "greater than 0"]),
    ("flush_timeout_s: .inf", ["flush_timeout_s", "inf", "less than or equal to 3600"]),  # never unbounded
    ("flush_timeout_s: soon", ["flush_timeout_s", "'soon'", "number"]),
    ("tiers: [{type: disk, path: /x, lock_timeout_s: 0}]", ["tiers[0].lock_timeout_s", "= 0", "greater than 0"]),
    ("tiers: [{type: disk, path: /x, lock_timeout_s: .nan}]", ["tiers[0].lock_timeout_s", "nan", "less than or equal to 600"]),
    ("tiers: [{type: disk, path: /x, lock_timeout_s: never}]", ["tiers[0].lock_timeout_s", "'never'", "number"]),
    ("tiers: [{type: cpu, lock_timeout_s: 1}]", ["tiers[0].lock_timeout_s", "unknown key"]),  # a disk tier's key
])
def test_bad_timeouts_name_key_value_and_rule(tmp_path: Path, text: str, must_name: list[str]) -> None:
    if not text.startswith("tiers"):
        text = "tiers: [{type: cpu}]\n" + text
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), environ={})
    message = str(info.value)
    for part in must_name:
        assert part in message, f"{part!r} missing from: {message}"
