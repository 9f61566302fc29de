"""Configuration: precedence, casting, unknown keys, and the docs listing every option."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from herald.settings import FIELDS, ConfigError, load


def test_precedence_flag_env_file(tmp_path: Path) -> None:
    file = tmp_path / "herald.toml"
    file.write_text('port = 1000\nhost = "0.0.0.0"\nlog_format = "text"\n')
    env = {"HERALD_PORT": "2000", "HERALD_HOST": "::1"}
    s = load({"port": 3000}, env, file).settings
    assert (s.port, s.host, s.log_format) == (3000, "::1", "text")


def test_unknown_keys_and_variables_are_reported(tmp_path: Path) -> None:
    file = tmp_path / "herald.toml"
    file.write_text("prot = 1\n")
    loaded = load({}, {"HERALD_STORE_ULR": "x"}, file)
    assert any("prot" in u for u in loaded.unknown)
    assert any("HERALD_STORE_ULR" in u for u in loaded.unknown)


@pytest.mark.parametrize(
    "env",
    [
        {"HERALD_PORT": "eighty"},
        {"HERALD_LOCAL_ISSUER": "maybe"},
        {"HERALD_LOG_FORMAT": "xml"},
        {"HERALD_TTL_POLICY": "ignore"},
        {"HERALD_DEFAULT_TTL": "99999999"},
        {"HERALD_STORE_URL": "mysql://x"},
        {"HERALD_ISSUERS": '[{"issuer": "x"}]'},
        {"HERALD_ISSUERS": '[{"issuer": "x", "jwks_url": "https://k"}]'},
        {"HERALD_ISSUERS": '[{"issuer": "x", "audience": "a", "jwks_url": "k", "typo": 1}]'},
        {"HERALD_USER_RATE": "0"},
        {"HERALD_LOCAL_ISSUER": "false"},
        {"HERALD_TRUSTED_PROXIES": "10.0.0.1, proxy.example.com"},
        {"HERALD_MAX_URL_BYTES": "40000"},
        {"HERALD_HEADER_TIMEOUT": "0"},
        {"HERALD_BODY_TIMEOUT": "-1"},
        {"HERALD_MAX_PENDING_PER_ADDRESS": "0"},
        {"HERALD_LOG_REPEATS": "-1"},
        {"HERALD_MAX_STREAMS_PER_SUBSCRIPTION": "200"},
        {"HERALD_BROKER": "nats"},
        {"HERALD_BROKER": "redis"},
        {"HERALD_BROKER": "redis", "HERALD_REDIS_URL": "127.0.0.1:6379"},
        {"HERALD_REDIS_URL": "redis://127.0.0.1:6379/0"},
    ],
)
def test_bad_values_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        load({}, env)


def test_the_redis_broker_takes_a_redis_url() -> None:
    env = {"HERALD_BROKER": "redis", "HERALD_REDIS_URL": "redis://127.0.0.1:6379/0"}
    s = load({}, env).settings
    assert (s.broker, s.redis_url) == ("redis", "redis://127.0.0.1:6379/0")
    assert load({}, {}).settings.broker == "memory"


@pytest.mark.parametrize(
    ("ttl", "interval"), [("5", "2"), ("3", "0"), ("0", "0"), ("-3", "1"), ("1.5", "0.6")]
)
def test_a_dispatch_lease_renewed_less_than_thrice_per_ttl_is_refused(
    ttl: str, interval: str
) -> None:
    env = {"HERALD_DISPATCH_LEASE_TTL": ttl, "HERALD_DISPATCH_RENEW_INTERVAL": interval}
    with pytest.raises(ConfigError, match=r"dispatch_renew_interval must be > 0 and <= dispatch"):
        load({}, env)


def test_dispatch_lease_timings_are_read_and_default_to_5_s_and_1_s(tmp_path: Path) -> None:
    file = tmp_path / "herald.toml"
    file.write_text("dispatch_lease_ttl = 1.5\ndispatch_renew_interval = 0.5\n")
    loaded = load({}, {}, file)
    assert not loaded.unknown
    assert (loaded.settings.dispatch_lease_ttl, loaded.settings.dispatch_renew_interval) == (
        1.5,
        0.5,
    )
    s = load({}, {}).settings
    assert (s.dispatch_lease_ttl, s.dispatch_renew_interval) == (5.0, 1.0)


def test_trusted_proxies_take_addresses_and_networks() -> None:
    env = {"HERALD_TRUSTED_PROXIES": " 10.0.0.5, 192.168.0.0/24 ,::1,"}
    s = load({}, env).settings
    assert s.trusted_proxy_list == ["10.0.0.5", "192.168.0.0/24", "::1"]
    assert load({}, {}).settings.trusted_proxy_list == []


def test_issuers_from_env_json() -> None:
    env = {"HERALD_ISSUERS": '[{"issuer": "https://i", "audience": "a", "jwks_url": "https://k"}]'}
    s = load({}, env).settings
    assert s.issuers[0]["jwks_url"] == "https://k"


def test_every_option_is_documented() -> None:
    doc = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    missing = [name for name in FIELDS if f"`{name}`" not in doc]
    assert not missing, f"undocumented options: {missing}"


def test_example_config_is_valid_and_complete() -> None:
    example = Path(__file__).parents[1] / "herald.example.toml"
    text = example.read_text()
    assert not load({}, {}, example).unknown
    uncommented = "\n".join(line.lstrip("# ") for line in text.splitlines())
    missing = [name for name in FIELDS if f"{name} =" not in uncommented and name != "issuers"]
    assert not missing, f"options missing from herald.example.toml: {missing}"
    assert "[[issuers]]" in uncommented


def test_the_redis_broker_without_the_redis_extra_is_a_clear_error(tmp_path: Path) -> None:
    """`broker = "redis"` on an install without the `redis` extra: one line saying what to
    install, exit 1, no traceback (a stand-in `redis` package that cannot be imported)."""
    fake = tmp_path / "site" / "redis"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named redis (stand-in)')\n")
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path / "site"),
        "HERALD_DATA": str(tmp_path / "data"),
        "HERALD_BROKER": "redis",
        "HERALD_REDIS_URL": "redis://127.0.0.1:9/0",
        "HERALD_PORT": "9",
    }
    done = subprocess.run(
        [sys.executable, "-m", "herald", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "pip install 'herald[redis]'" in done.stderr, done.stderr[-2000:]
