"""The escrow's Nostr key: generated once into a private file, reused, never world-readable."""

from __future__ import annotations

import os

import pytest

from service.nostr.keys import load_or_create, parse_secret
from service.nostr.nip19 import encode_nsec


def test_created_once_with_mode_600_then_reused(tmp_path) -> None:
    path = tmp_path / "k" / "escrow.nostr-key"
    first = load_or_create(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert load_or_create(path).public_key_hex == first.public_key_hex


def test_world_readable_key_file_is_refused(tmp_path) -> None:
    path = tmp_path / "key"
    load_or_create(path)
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        load_or_create(path)


def test_hex_and_nsec_forms_agree_and_garbage_is_refused() -> None:
    hexkey = "67dea2ed018072d675f5415ecfaed7d2597555e202d85b3d65ea4e58d2d92ffa"
    assert parse_secret(hexkey).public_key_hex == parse_secret(encode_nsec(hexkey)).public_key_hex
    for bad in ("xyz", "nsec1qqqq", "00" * 32):
        with pytest.raises(ValueError):
            parse_secret(bad)
    assert hexkey not in repr(parse_secret(hexkey))
