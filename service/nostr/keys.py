"""The service's Nostr identity: from settings, or generated once and kept in a 0600 file."""

from __future__ import annotations

import os
from pathlib import Path

from service.nostr.nip01 import EventError, SecretKey
from service.nostr.nip19 import Nip19Error, decode_nsec


def parse_secret(text: str) -> SecretKey:
    """A secret key given as 64 hex characters or as an ``nsec1…`` string."""
    text = text.strip()
    if text.startswith("nsec1"):
        try:
            return SecretKey.from_hex(decode_nsec(text))
        except Nip19Error as e:
            raise ValueError(f"invalid nsec: {e.reason}") from None
    try:
        return SecretKey.from_hex(text)
    except EventError:
        raise ValueError("secret key must be 64 hex characters or an nsec1… string") from None


def load_or_create(path: Path) -> SecretKey:
    """Read the key file, or create it (mode 0600) with a fresh key on first run."""
    if path.exists():
        mode = path.stat().st_mode & 0o077
        if mode:
            raise ValueError(f"{path} is readable by others (mode {oct(path.stat().st_mode & 0o777)}); chmod 600 it")
        return parse_secret(path.read_text())
    key = SecretKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.to_hex() + "\n")
    return key
