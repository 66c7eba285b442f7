"""Tiers as plug-ins: the tier registry, and a tier package installed from tests/tier_plugin.

The package is installed with pip into a temporary folder (offline: no index, no build isolation,
the venv's setuptools) and used by fresh interpreters with that folder on PYTHONPATH, so that its
``kvtier.tiers`` entry point is found the way an installed plug-in's would be, and nothing of it
leaks into this process.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from kvtier.connector.config import ConfigError, CpuTier, DiskTier, KVTierConfig, load_config
from kvtier.connector.store_factory import build_tier, is_process_local
from kvtier.storage_backends import registry
from kvtier.storage_backends.builtin_tiers import BUILTIN_TIERS, CPU
from kvtier.storage_backends.metrics import MetricSet
from kvtier.storage_backends.registry import (
    TierPluginError,
    TierRegistry,
    TierSettings,
    TierType,
    UnknownTierType,
    register_tier,
    tier_names,
    tier_type,
)

PLUGIN_SRC = Path(__file__).parent / "tier_plugin"
GROUP = "kvtier.tiers"


def _registry(*entries: tuple[str, str]) -> TierRegistry:
    """A registry with the built-ins and exactly these entry points (name, object reference)."""
    return TierRegistry(entry_points=lambda: [EntryPoint(name, value, GROUP) for name, value in entries])


def _never_built(cfg: TierSettings, ctx: object) -> object:
    raise AssertionError("not built in these tests")


class _Extra(TierSettings):
    size: int = 1


# -- the registry, in this process ---------------------------------------------------------------------------------


def test_builtin_types_come_first_in_order() -> None:
    assert tier_names()[:4] == ["cpu", "disk", "redis", "node"]
    assert tier_type("cpu") is CPU and [t.name for t in BUILTIN_TIERS] == ["cpu", "disk", "redis", "node"]
    assert is_process_local(CpuTier(type="cpu")) and not is_process_local(DiskTier(type="disk", path="/x"))


def test_a_duplicate_name_is_refused() -> None:
    with pytest.raises(ValueError, match=r"tier type 'cpu' is already registered \(by kvtier \(built-in\)\)"):
        register_tier(TierType("cpu", CpuTier, _never_built))
    assert tier_type("cpu") is CPU  # unchanged
    reg = _registry()
    extra = reg.register(TierType("extra", _Extra, _never_built))
    assert reg.register(extra) is extra  # the same object again is no conflict
    with pytest.raises(ValueError, match="'extra' is already registered.*choose another name"):
        reg.register(TierType("extra", _Extra, _never_built))


def test_an_unknown_name_lists_the_known_ones() -> None:
    reg = _registry(("memo", "kvtier_memo_tier:TIER"))
    with pytest.raises(UnknownTierType, match=r"unknown tier type 'nvme' \(known: cpu, disk, redis, node, memo\)") as info:
        reg.get("nvme")
    assert info.value.known == ["cpu", "disk", "redis", "node", "memo"]  # memo listed without importing it


def test_a_broken_entry_point_names_itself_and_breaks_nothing_else(caplog: pytest.LogCaptureFixture) -> None:
    reg = _registry(("broken", "kvtier_no_such_module:TIER"), ("notatier", "os.path:join"),
                    ("misnamed", "kvtier.storage_backends.builtin_tiers:CPU"))
    with pytest.raises(TierPluginError) as info:
        reg.get("broken")
    message = str(info.value)
    for part in ["'broken'", "'broken = kvtier_no_such_module:TIER'", GROUP, "ModuleNotFoundError", "kvtier_no_such_module"]:
        assert part in message, f"{part!r} missing from: {message}"
    with pytest.raises(TierPluginError, match="not a kvtier TierType"):
        reg.get("notatier")
    with pytest.raises(TierPluginError, match="named 'cpu', not 'misnamed'"):
        reg.get("misnamed")
    with pytest.raises(TierPluginError, match="kvtier_no_such_module"):
        reg.get("broken")  # the same error again, without importing again
    assert reg.get("disk").name == "disk"
    with caplog.at_level(logging.WARNING, logger="kvtier.storage_backends.registry"):
        assert [t.name for t in reg.all()] == ["cpu", "disk", "redis", "node"]
    assert "kvtier_no_such_module" in caplog.text


def test_a_name_claimed_twice_is_an_error_when_used() -> None:
    reg = _registry(("twice", "a_mod:TIER"), ("twice", "b_mod:TIER"))
    with pytest.raises(TierPluginError, match=r"claimed by several kvtier.tiers entry points \(a_mod:TIER, b_mod:TIER\)"):
        reg.get("twice")


def test_a_broken_plugin_is_a_config_error_on_its_item(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", _registry(("broken", "kvtier_no_such_module:TIER")))
    path = tmp_path / "c.yaml"
    path.write_text("tiers: [{type: cpu}, {type: broken}]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value).startswith("invalid kvtier config: tiers[1].type = 'broken': tier type 'broken': entry point")
    assert "ModuleNotFoundError" in str(info.value)
    path.write_text("tiers: [{type: cpu}, {type: nvme}]\n")
    with pytest.raises(ConfigError, match=r"tiers\[1\].type = 'nvme': must be one of cpu, disk, redis, node, broken"):
        load_config(path, environ={})


def test_a_tier_type_is_checked_when_it_is_made() -> None:
    assert _Extra(type="extra").name == "extra"  # a tier's name defaults to its type
    with pytest.raises(ValueError, match="must match"):
        TierType("my.tier", _Extra, _never_built)  # a '.' would end the tier's name in overrides
    with pytest.raises(TypeError, match="subclass TierSettings"):
        TierType("plain", dict, _never_built)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"CpuTier.type only accepts \['cpu'\]"):
        TierType("cpu2", CpuTier, _never_built)


def test_settings_built_in_code_must_match_their_type() -> None:
    config = KVTierConfig(tiers=[CpuTier(type="cpu", max_bytes=2 << 20)])
    assert type(build_tier(config.tiers[0], MetricSet())).__name__ == "CpuBackend"
    assert '"max_bytes":2097152' in config.model_dump_json()  # every setting keys the shared store
    with pytest.raises(Exception, match="is not the settings of tier type 'disk'"):
        KVTierConfig(tiers=[_Extra(type="disk")])


# -- a plug-in package, installed ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/tier_plugin installed into a fresh folder (built from a copy: the build leaves files)."""
    pytest.importorskip("setuptools", reason="the venv needs setuptools to build the plug-in offline")
    root = tmp_path_factory.mktemp("tier_plugin")
    shutil.copytree(PLUGIN_SRC, root / "src", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
         "--disable-pip-version-check", "--target", str(root / "site"), str(root / "src")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PIP_NO_INPUT": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (root / "site" / "kvtier_memo_tier.py").is_file()
    return root / "site"


def _run(plugin_path: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
    env["PYTHONPATH"] = os.pathsep.join([str(plugin_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_check_config_shows_a_plugin_tier(plugin_path: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"tiers:\n  - {{type: memo, max_chunks: 8}}\n  - {{type: disk, path: {tmp_path / 'd'}}}\n")
    done = _run(plugin_path, ["-m", "kvtier.cli", "check-config", str(config)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout and "memo" in done.stdout and "8 chunks" in done.stdout


_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    from kvtier.chunk_format.codec import encode_chunk
    from kvtier.connector.config import ConfigError, load_config
    from kvtier.connector.store_factory import build_store, is_process_local

    good, bad_type, bad_key = sys.argv[1:4]
    out = {}
    config = load_config(good, environ={"KVTIER_MEMO__MAX_CHUNKS": "5"})
    out["tiers"] = [(t.type, type(t).__name__) for t in config.tiers]
    out["max_chunks"] = config.tiers[0].max_chunks
    out["local"] = [is_process_local(t) for t in config.tiers]
    store = build_store(config)
    key = hashlib.sha256(b"plug-in").hexdigest()
    store.put([(key, encode_chunk(key, "bfloat16", (8,), "vllm-nhd", "m", 4, bytes(range(16))))])
    out["flushed"] = store.flush(10)
    out["backends"] = [type(t).__name__ for t in store.tiers]
    out["held"] = [t.contains([key]) for t in store.tiers]
    chunk = store.get([key])[0]
    out["payload"] = bytes(chunk.payload).hex()
    out["memo_hits"] = store.stats()["memo"]["get_hits"]
    store.close()
    shared = build_store(config, shared_only=True)
    out["shared"] = [t.name for t in shared.tiers]
    shared.close()
    for name, path in (("bad_type", bad_type), ("bad_key", bad_key)):
        try:
            load_config(path, environ={})
            out[name] = None
        except ConfigError as exc:
            out[name] = str(exc)
    print(json.dumps(out))
""")


def test_a_plugin_tier_is_configured_built_and_used(plugin_path: Path, tmp_path: Path) -> None:
    good, bad_type, bad_key = tmp_path / "good.yaml", tmp_path / "bad_type.yaml", tmp_path / "bad_key.yaml"
    good.write_text(f"tiers:\n  - {{type: memo, max_chunks: 8}}\n  - {{type: disk, path: {tmp_path / 'd'}}}\n")
    bad_type.write_text("tiers: [{type: memo}, {type: nvme}]\n")
    bad_key.write_text("tiers: [{type: memo, max_chunk: 3}]\n")
    done = _run(plugin_path, ["-c", _SCRIPT, str(good), str(bad_type), str(bad_key)], tmp_path)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["tiers"] == [["memo", "MemoTier"], ["disk", "DiskTier"]]
    assert out["max_chunks"] == 5  # KVTIER_<tier name>__<key> overrides reach a plug-in's keys too
    assert out["local"] == [True, False]
    assert out["flushed"] and out["backends"] == ["MemoBackend", "DiskBackend"] and out["held"] == [1, 1]
    assert out["payload"] == bytes(range(16)).hex() and out["memo_hits"] == 1
    assert out["shared"] == ["disk"]  # a process-local plug-in tier is left out like the cpu tier
    assert out["bad_type"] == "invalid kvtier config: tiers[1].type = 'nvme': must be one of cpu, disk, redis, node, memo"
    assert out["bad_key"] == "invalid kvtier config: tiers[0].max_chunk: unknown key (allowed: type, name, max_chunks)"
