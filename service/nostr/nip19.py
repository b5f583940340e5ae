"""NIP-19 bech32-encoded entities: ``npub``, ``nsec``, ``note``, ``nprofile``, ``nevent``.

Plain bech32 (BIP-173 checksum constant 1), never bech32m. The checksum, the 5-bit
alphabet and the 8<->5-bit regrouping come from the small ``bech32`` reference
package (already pulled in by ``bolt11``); the parsing around it is ours so that
each failure gets its own :class:`Nip19ErrorReason`, and so that strings longer
than BIP-173's 90 characters (TLV entities) are accepted up to NIP-19's 5000.

Error messages never echo the input: it may be an ``nsec``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import cast

import bech32 as _bech32

MAX_LENGTH = 5000
CHECKSUM_LENGTH = 6

HRP_NPUB = "npub"
HRP_NSEC = "nsec"
HRP_NOTE = "note"
HRP_NPROFILE = "nprofile"
HRP_NEVENT = "nevent"

TLV_SPECIAL = 0
TLV_RELAY = 1
TLV_AUTHOR = 2
TLV_KIND = 3

_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")
_HRP = re.compile(r"[\x21-\x7e]+")
_CHARSET_VALUES = {char: value for value, char in enumerate(_bech32.CHARSET)}


class Nip19ErrorReason(enum.StrEnum):
    TOO_LONG = "too_long"
    INVALID_CHARACTER = "invalid_character"
    MIXED_CASE = "mixed_case"
    MALFORMED = "malformed"
    BAD_CHECKSUM = "bad_checksum"
    INVALID_PADDING = "invalid_padding"
    WRONG_PREFIX = "wrong_prefix"
    WRONG_DATA_LENGTH = "wrong_data_length"
    INVALID_HEX = "invalid_hex"
    INVALID_TLV = "invalid_tlv"


class Nip19Error(ValueError):
    def __init__(self, reason: Nip19ErrorReason, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(f"{reason.value}: {message}")


@dataclass(frozen=True, slots=True)
class ProfilePointer:
    """Decoded ``nprofile``."""

    pubkey: str
    relays: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EventPointer:
    """Decoded ``nevent``."""

    id: str
    relays: tuple[str, ...] = ()
    author: str | None = None
    kind: int | None = None


# ------------------------------------------------------------------------- bech32


def encode_bech32(hrp: str, data: bytes) -> str:
    """Bech32-encode ``data`` under the human-readable prefix ``hrp`` (lowercase)."""
    if _HRP.fullmatch(hrp) is None or hrp != hrp.lower():
        raise Nip19Error(Nip19ErrorReason.MALFORMED, "prefix must be non-empty lowercase printable ASCII")
    # 8 -> 5 bit regrouping with padding only fails for out-of-range values; bytes have none.
    words = cast(list[int], _bech32.convertbits(data, 8, 5, True))
    text = _bech32.bech32_encode(hrp, words)
    if len(text) > MAX_LENGTH:
        raise Nip19Error(Nip19ErrorReason.TOO_LONG, f"encoding is longer than {MAX_LENGTH} characters")
    return text


def _check_characters(text: str) -> None:
    if type(text) is not str:
        raise Nip19Error(Nip19ErrorReason.MALFORMED, "bech32 input must be a string")
    if len(text) > MAX_LENGTH:
        raise Nip19Error(Nip19ErrorReason.TOO_LONG, f"longer than {MAX_LENGTH} characters")
    if not text.isascii() or any(not 33 <= ord(char) <= 126 for char in text):
        raise Nip19Error(Nip19ErrorReason.INVALID_CHARACTER, "contains a character outside printable ASCII")
    if text != text.lower() and text != text.upper():
        raise Nip19Error(Nip19ErrorReason.MIXED_CASE, "mixes upper and lower case")


def _split(text: str) -> tuple[str, str]:
    separator = text.rfind("1")
    if separator < 1:
        raise Nip19Error(Nip19ErrorReason.MALFORMED, "no prefix followed by the separator '1'")
    data_part = text[separator + 1 :]
    if len(data_part) < CHECKSUM_LENGTH:
        raise Nip19Error(Nip19ErrorReason.MALFORMED, "too short to hold a checksum")
    return text[:separator], data_part


def decode_bech32(text: str) -> tuple[str, bytes]:
    """Decode any bech32 string into ``(prefix, data)``; the prefix is lowercase."""
    _check_characters(text)
    hrp, data_part = _split(text.lower())
    try:
        words = [_CHARSET_VALUES[char] for char in data_part]
    except KeyError:
        raise Nip19Error(
            Nip19ErrorReason.INVALID_CHARACTER, "data part has a character outside bech32's alphabet"
        ) from None
    if not _bech32.bech32_verify_checksum(hrp, words):
        raise Nip19Error(Nip19ErrorReason.BAD_CHECKSUM, "checksum does not match (bech32m is not accepted)")
    data = _bech32.convertbits(words[:-CHECKSUM_LENGTH], 5, 8, False)
    if data is None:
        raise Nip19Error(Nip19ErrorReason.INVALID_PADDING, "data has non-zero or excess padding bits")
    return hrp, bytes(data)


def _decode_with_prefix(text: str, expected_hrp: str) -> bytes:
    hrp, data = decode_bech32(text)
    if hrp != expected_hrp:
        raise Nip19Error(Nip19ErrorReason.WRONG_PREFIX, f"expected prefix {expected_hrp!r}, got {hrp!r}")
    return data


# ------------------------------------------------------------ bare keys and ids


def _hex32(value: str, name: str) -> bytes:
    if type(value) is not str or _HEX.fullmatch(value) is None:
        raise Nip19Error(Nip19ErrorReason.INVALID_HEX, f"{name} must be a string of hex digit pairs")
    raw = bytes.fromhex(value)
    if len(raw) != 32:
        raise Nip19Error(Nip19ErrorReason.WRONG_DATA_LENGTH, f"{name} must be 32 bytes, got {len(raw)}")
    return raw


def _decode_32(text: str, hrp: str) -> str:
    data = _decode_with_prefix(text, hrp)
    if len(data) != 32:
        raise Nip19Error(Nip19ErrorReason.WRONG_DATA_LENGTH, f"{hrp} must hold 32 bytes, got {len(data)}")
    return data.hex()


def encode_npub(pubkey_hex: str) -> str:
    return encode_bech32(HRP_NPUB, _hex32(pubkey_hex, "public key"))


def decode_npub(text: str) -> str:
    """``npub1...`` -> lowercase hex x-only public key."""
    return _decode_32(text, HRP_NPUB)


def pubkey_from_text(text: str) -> str:
    """A public key as people write it: an ``npub1…`` or 64 lowercase hex characters (surrounding
    space ignored) -> lowercase hex. Raises :class:`Nip19Error` (``invalid_hex`` for hex that is not
    a 64-character key)."""
    text = text.strip()
    if text.startswith("npub1"):
        return decode_npub(text)
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise Nip19Error(
            Nip19ErrorReason.INVALID_HEX, "a public key is 64 lowercase hex characters or an npub1… string"
        )
    return text


def encode_nsec(secret_hex: str) -> str:
    return encode_bech32(HRP_NSEC, _hex32(secret_hex, "secret key"))


def decode_nsec(text: str) -> str:
    """``nsec1...`` -> lowercase hex secret key."""
    return _decode_32(text, HRP_NSEC)


def encode_note(event_id_hex: str) -> str:
    return encode_bech32(HRP_NOTE, _hex32(event_id_hex, "event id"))


def decode_note(text: str) -> str:
    """``note1...`` -> lowercase hex event id."""
    return _decode_32(text, HRP_NOTE)


# ---------------------------------------------------------------------------- TLV


def _parse_tlv(data: bytes) -> list[tuple[int, bytes]]:
    items = []
    offset = 0
    while offset < len(data):
        if offset + 2 > len(data):
            raise Nip19Error(Nip19ErrorReason.INVALID_TLV, "truncated type/length header")
        kind, length = data[offset], data[offset + 1]
        value = data[offset + 2 : offset + 2 + length]
        if len(value) != length:
            raise Nip19Error(Nip19ErrorReason.INVALID_TLV, f"TLV type {kind} is truncated")
        items.append((kind, value))
        offset += 2 + length
    return items


def _tlv(kind: int, value: bytes) -> bytes:
    if len(value) > 255:
        raise Nip19Error(Nip19ErrorReason.INVALID_TLV, f"TLV type {kind} value is over 255 bytes")
    return bytes((kind, len(value))) + value


def _relay_tlv(relay: str) -> bytes:
    try:
        return _tlv(TLV_RELAY, relay.encode("ascii"))
    except UnicodeEncodeError:
        raise Nip19Error(Nip19ErrorReason.INVALID_TLV, "relay is not ASCII") from None


def _relay(value: bytes) -> str:
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        raise Nip19Error(Nip19ErrorReason.INVALID_TLV, "relay is not ASCII") from None


def _only_32(value: bytes, what: str) -> str:
    if len(value) != 32:
        raise Nip19Error(Nip19ErrorReason.INVALID_TLV, f"{what} must be 32 bytes, got {len(value)}")
    return value.hex()


def _special(items: list[tuple[int, bytes]], what: str) -> str:
    """The first ``special`` (type 0) entry, which must exist."""
    for kind, value in items:
        if kind == TLV_SPECIAL:
            return _only_32(value, what)
    raise Nip19Error(Nip19ErrorReason.INVALID_TLV, f"missing {what} (TLV type 0)")


def decode_nprofile(text: str) -> ProfilePointer:
    items = _parse_tlv(_decode_with_prefix(text, HRP_NPROFILE))
    pubkey = _special(items, "public key")
    relays = tuple(_relay(value) for kind, value in items if kind == TLV_RELAY)
    return ProfilePointer(pubkey=pubkey, relays=relays)


def encode_nprofile(pointer: ProfilePointer) -> str:
    data = _tlv(TLV_SPECIAL, _hex32(pointer.pubkey, "public key"))
    data += b"".join(_relay_tlv(relay) for relay in pointer.relays)
    return encode_bech32(HRP_NPROFILE, data)


def _kind(value: bytes) -> int:
    if len(value) != 4:
        raise Nip19Error(Nip19ErrorReason.INVALID_TLV, f"kind must be 4 bytes, got {len(value)}")
    return int.from_bytes(value, "big")


def decode_nevent(text: str) -> EventPointer:
    items = _parse_tlv(_decode_with_prefix(text, HRP_NEVENT))
    event_id = _special(items, "event id")
    relays = tuple(_relay(value) for kind, value in items if kind == TLV_RELAY)
    authors = [_only_32(value, "author") for kind, value in items if kind == TLV_AUTHOR]
    kinds = [_kind(value) for kind, value in items if kind == TLV_KIND]
    return EventPointer(
        id=event_id, relays=relays, author=authors[0] if authors else None, kind=kinds[0] if kinds else None
    )


def encode_nevent(pointer: EventPointer) -> str:
    data = _tlv(TLV_SPECIAL, _hex32(pointer.id, "event id"))
    data += b"".join(_relay_tlv(relay) for relay in pointer.relays)
    if pointer.author is not None:
        data += _tlv(TLV_AUTHOR, _hex32(pointer.author, "author"))
    if pointer.kind is not None:
        if type(pointer.kind) is not int or not 0 <= pointer.kind < 2**32:
            raise Nip19Error(Nip19ErrorReason.INVALID_TLV, "kind must be an integer within 0..2**32-1")
        data += _tlv(TLV_KIND, pointer.kind.to_bytes(4, "big"))
    return encode_bech32(HRP_NEVENT, data)
