"""The validator pool (FEDSTR_VALIDATOR_POOL, protocol.md §1): read and checked at startup, then
announced (NIP-89) exactly as configured, so providers can trust the validators the operator vouches for."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from sqlalchemy import select

from service.config import Settings
from service.db import create_engine, session_factory
from service.escrow.service import EscrowService
from service.nostr.models import OutboxEvent
from service.nostr.nip01 import Event, SecretKey
from service.nostr.nip19 import encode_npub
from service.nostr.protocol import KIND_ANNOUNCEMENT, PoolValidator, parse_announcement

A, B = SecretKey.generate().public_key_hex, SecretKey.generate().public_key_hex


def test_entries_are_names_and_hex_or_npub_keys() -> None:
    s = Settings(_env_file=None, validator_pool=f" alice = {A.upper()} ,bob={encode_npub(B)},")
    assert s.validator_pool == [("alice", A), ("bob", B)]
    assert Settings(_env_file=None).validator_pool == []


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("alice", "is not name=<64-hex pubkey or npub>"),
        (f"={A}", "a name is 1 to 64 printable characters"),
        ("alice=" + "ab" * 31, "is not name=<64-hex pubkey or npub>"),
        ("alice=npub1qqqq", "the npub does not decode"),
        (f"alice={A},bob={A}", "listed twice"),
        ("x" * 65 + f"={A}", "a name is 1 to 64"),
        (",".join(f"v{k}={SecretKey.generate().public_key_hex}" for k in range(65)), "at most 64"),
    ],
)
def test_a_malformed_pool_stops_the_service_with_a_clear_error(value: str, says: str) -> None:
    with pytest.raises(ValidationError, match="FEDSTR_VALIDATOR_POOL") as e:
        Settings(_env_file=None, validator_pool=value)
    assert says in str(e.value)


async def test_the_announcement_carries_the_pool(database_url: str) -> None:
    settings = Settings(
        _env_file=None, database_url=database_url, relays="ws://127.0.0.1:1", validator_pool=f"alice={A},bob={B}"
    )
    engine = create_engine(database_url)
    try:
        sessions = session_factory(engine)
        await EscrowService(sessions, settings, SecretKey.generate(), None).announce()
        async with sessions() as s:
            [raw] = (await s.scalars(select(OutboxEvent.raw).where(OutboxEvent.kind == KIND_ANNOUNCEMENT))).all()
        announcement = parse_announcement(Event.from_dict(json.loads(raw)))
        assert announcement.validator_pool == (PoolValidator(A, "alice"), PoolValidator(B, "bob"))
    finally:
        await engine.dispose()
