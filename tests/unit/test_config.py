"""Settings are validated at start-up with a specific error per bad value."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.config import Settings


def make(**env: str) -> Settings:
    return Settings(_env_file=None, **env)


def test_defaults_suit_local_regtest() -> None:
    s = make()
    assert s.network == "regtest"
    assert s.database_url.startswith("sqlite+aiosqlite://")
    assert s.relays == []


@pytest.mark.parametrize(
    "raw,expected",
    [
        ('["ws://127.0.0.1:7000","wss://relay.example"]', ["ws://127.0.0.1:7000", "wss://relay.example"]),
        ("ws://a:1, wss://b", ["ws://a:1", "wss://b"]),
        ("", []),
    ],
)
def test_relays_from_env_json_or_commas(monkeypatch: pytest.MonkeyPatch, raw: str, expected: list[str]) -> None:
    monkeypatch.setenv("FEDSTR_RELAYS", raw)
    assert Settings(_env_file=None).relays == expected


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("relays", ["http://relay.example"], "ws:// or wss://"),
        ("relays", "[not json", "not valid JSON"),
        ("lnd_grpc_host", "localhost", "host:port"),
        ("lnd_grpc_host", "localhost:99999", "host:port"),
        ("database_url", "mysql://x", "sqlite+aiosqlite"),
        ("network", "bitcoin-cash", "regtest"),
        ("lnd_timeout_seconds", 0, "greater than 0"),
    ],
)
def test_bad_values_are_refused_with_the_reason(field: str, value: object, needle: str) -> None:
    with pytest.raises(ValidationError) as exc:
        make(**{field: value})
    assert needle in str(exc.value)


def test_secrets_do_not_leak_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSTR_ADMIN_TOKEN", "s3cr3t-admin-0123456789-abcdefghijkl")
    monkeypatch.setenv("FEDSTR_WEBHOOK_SECRET", "s3cr3t-hook")
    s = Settings(_env_file=None)
    assert s.admin_token is not None and s.admin_token.get_secret_value() == "s3cr3t-admin-0123456789-abcdefghijkl"
    assert "s3cr3t" not in repr(s) and "s3cr3t" not in str(s.model_dump())


def test_blob_limits_fit_a_real_model_and_stay_coherent() -> None:
    s = make()
    assert s.blob_max_bytes >= 100 * 1024 * 1024  # a model of 100 MB and more fits by default
    assert s.blob_max_bytes <= s.blob_key_quota_bytes <= s.blob_store_quota_bytes
    with pytest.raises(ValidationError, match="KEY_QUOTA_BYTES must be at least FEDSTR_BLOB_MAX_BYTES"):
        make(blob_max_bytes=str(2 * 1024**3), blob_key_quota_bytes=str(1024**3))
    with pytest.raises(ValidationError, match="STORE_QUOTA_BYTES must be at least"):
        make(blob_store_quota_bytes=str(1024**3))
    small = make(blob_max_bytes="4096", blob_key_quota_bytes="8192", blob_store_quota_bytes="8192")
    assert (small.blob_max_bytes, small.blob_key_quota_bytes) == (4096, 8192)
