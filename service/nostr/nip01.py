"""NIP-01 events: canonical serialization, ids, BIP-340 keys, signing and strict verification.

An event on the wire is a JSON object with exactly seven fields::

    {"id", "pubkey", "created_at", "kind", "tags", "content", "sig"}

Its ``id`` is the lowercase hex SHA-256 of the UTF-8 canonical serialization
``[0,<pubkey>,<created_at>,<kind>,<tags>,<content>]`` (no whitespace; only the JSON
escapes that JSON requires: ``\\n \\" \\\\ \\r \\t \\b \\f`` in short form, the other
control characters U+0000..U+001F as lowercase ``\\u00XX``, every other character
verbatim), and ``sig`` is a BIP-340 Schnorr signature of that id by ``pubkey``.

:class:`Event` instances are always well-formed in *shape* (types, hex formats,
ranges); :func:`verify_event` additionally checks size limits, time bounds, the id
and the signature. Every failure is an :class:`EventError` whose ``reason`` is one
of :class:`EventErrorReason` (a ``str`` enum, stable for callers to map, e.g. to a
relay ``OK false`` message or an HTTP status).
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import coincurve

MAX_KIND = 65535
# created_at must fit a signed 64-bit integer (database BIGINT); anything near it
# is also far in the future, which verify_event rejects separately.
MAX_CREATED_AT = 2**63 - 1

FIELDS = frozenset({"id", "pubkey", "created_at", "kind", "tags", "content", "sig"})

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")
# One shared encoder: building a JSONEncoder per call is measurably slower.
_CANONICAL_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False, allow_nan=False)


class EventErrorReason(enum.StrEnum):
    """Stable machine-readable codes for every way an event can be rejected."""

    NOT_OBJECT = "not_object"
    MISSING_FIELD = "missing_field"
    UNEXPECTED_FIELD = "unexpected_field"
    INVALID_ID = "invalid_id"
    INVALID_PUBKEY_FORMAT = "invalid_pubkey_format"
    INVALID_SIG_FORMAT = "invalid_sig_format"
    INVALID_CREATED_AT = "invalid_created_at"
    CREATED_AT_OUT_OF_RANGE = "created_at_out_of_range"
    INVALID_KIND = "invalid_kind"
    KIND_OUT_OF_RANGE = "kind_out_of_range"
    INVALID_TAGS = "invalid_tags"
    INVALID_TAG = "invalid_tag"
    INVALID_TAG_ITEM = "invalid_tag_item"
    EMPTY_TAG = "empty_tag"
    INVALID_CONTENT = "invalid_content"
    INVALID_UNICODE = "invalid_unicode"
    TOO_MANY_TAGS = "too_many_tags"
    TAG_TOO_LONG = "tag_too_long"
    CONTENT_TOO_LARGE = "content_too_large"
    EVENT_TOO_LARGE = "event_too_large"
    CREATED_AT_IN_FUTURE = "created_at_in_future"
    CREATED_AT_TOO_OLD = "created_at_too_old"
    ID_MISMATCH = "id_mismatch"
    INVALID_PUBKEY = "invalid_pubkey"
    BAD_SIGNATURE = "bad_signature"
    INVALID_SECRET_KEY = "invalid_secret_key"


class EventError(ValueError):
    """An event (or key) was rejected; ``reason`` is an :class:`EventErrorReason`."""

    def __init__(self, reason: EventErrorReason, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(f"{reason.value}: {message}")


Tag = tuple[str, ...]
Tags = tuple[Tag, ...]


# --------------------------------------------------------------------------- shape


def _check_hex(value: object, pattern: re.Pattern[str], reason: EventErrorReason, name: str) -> None:
    if type(value) is not str or pattern.fullmatch(value) is None:
        length = 128 if pattern is _HEX128 else 64
        raise EventError(reason, f"{name} must be a lowercase hex string of {length} characters")


def _check_int(
    value: object, maximum: int, type_reason: EventErrorReason, range_reason: EventErrorReason, name: str
) -> None:
    if type(value) is not int:  # also rejects bool, a subclass of int
        raise EventError(type_reason, f"{name} must be an integer, not {type(value).__name__}")
    if not 0 <= value <= maximum:
        raise EventError(range_reason, f"{name} must be within 0..{maximum}")


def _check_tags(tags: object) -> None:
    if type(tags) is not tuple:
        raise EventError(EventErrorReason.INVALID_TAGS, "tags must be an array of arrays")
    for index, tag in enumerate(tags):
        if type(tag) is not tuple:
            raise EventError(EventErrorReason.INVALID_TAG, f"tag #{index} is not an array")
        if not tag:
            raise EventError(EventErrorReason.EMPTY_TAG, f"tag #{index} is empty")
        for item in tag:
            if type(item) is not str:
                raise EventError(EventErrorReason.INVALID_TAG_ITEM, f"tag #{index} has a non-string item")


def _check_unsigned_fields(pubkey: object, created_at: object, kind: object, tags: object, content: object) -> None:
    _check_hex(pubkey, _HEX64, EventErrorReason.INVALID_PUBKEY_FORMAT, "pubkey")
    _check_int(
        created_at,
        MAX_CREATED_AT,
        EventErrorReason.INVALID_CREATED_AT,
        EventErrorReason.CREATED_AT_OUT_OF_RANGE,
        "created_at",
    )
    _check_int(kind, MAX_KIND, EventErrorReason.INVALID_KIND, EventErrorReason.KIND_OUT_OF_RANGE, "kind")
    _check_tags(tags)
    if type(content) is not str:
        raise EventError(EventErrorReason.INVALID_CONTENT, "content must be a string")


def _freeze_tags(tags: object) -> Tags:
    """Convert JSON-style tags (lists, or tuples) into tuples, rejecting non-arrays."""
    if not isinstance(tags, (list, tuple)):
        raise EventError(EventErrorReason.INVALID_TAGS, "tags must be an array of arrays")
    frozen = []
    for index, tag in enumerate(tags):
        if not isinstance(tag, (list, tuple)):
            raise EventError(EventErrorReason.INVALID_TAG, f"tag #{index} is not an array")
        frozen.append(tuple(tag))
    return tuple(frozen)


@dataclass(frozen=True, slots=True)
class Event:
    """A NIP-01 event whose fields are guaranteed well-formed (not necessarily authentic)."""

    id: str
    pubkey: str
    created_at: int
    kind: int
    tags: Tags
    content: str
    sig: str

    def __post_init__(self) -> None:
        _check_hex(self.id, _HEX64, EventErrorReason.INVALID_ID, "id")
        _check_unsigned_fields(self.pubkey, self.created_at, self.kind, self.tags, self.content)
        _check_hex(self.sig, _HEX128, EventErrorReason.INVALID_SIG_FORMAT, "sig")

    @classmethod
    def from_dict(cls, obj: object) -> Event:
        """Parse a decoded JSON object strictly (exact field set and types); no crypto checks."""
        if not isinstance(obj, Mapping):
            raise EventError(EventErrorReason.NOT_OBJECT, "event must be a JSON object")
        keys = obj.keys()
        if len(keys) != len(FIELDS) or keys != FIELDS:
            _raise_field_set_error(keys)
        return cls(
            id=obj["id"],
            pubkey=obj["pubkey"],
            created_at=obj["created_at"],
            kind=obj["kind"],
            tags=_freeze_tags(obj["tags"]),
            content=obj["content"],
            sig=obj["sig"],
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "pubkey": self.pubkey,
            "created_at": self.created_at,
            "kind": self.kind,
            "tags": [list(tag) for tag in self.tags],
            "content": self.content,
            "sig": self.sig,
        }

    def to_json(self) -> str:
        """Compact JSON for the wire (UTF-8 characters kept verbatim)."""
        return _CANONICAL_JSON.encode(self.to_dict())


def _raise_field_set_error(keys: Iterable[object]) -> None:
    present = set(keys)
    missing = FIELDS - present
    if missing:
        raise EventError(EventErrorReason.MISSING_FIELD, f"missing field {sorted(missing)[0]!r}")
    extra = sorted(repr(key) for key in present - FIELDS)
    raise EventError(EventErrorReason.UNEXPECTED_FIELD, f"unexpected field {extra[0]}")


# -------------------------------------------------------------------- serialization


def serialize(pubkey: str, created_at: int, kind: int, tags: Iterable[Iterable[str]], content: str) -> bytes:
    """The UTF-8 canonical serialization ``[0,pubkey,created_at,kind,tags,content]``.

    The fields are validated as for an :class:`Event`. Raises
    ``EventError(INVALID_UNICODE)`` if a string holds a lone surrogate, which has no
    UTF-8 encoding (and so no id).
    """
    frozen = _freeze_tags(tags)
    _check_unsigned_fields(pubkey, created_at, kind, frozen, content)
    return _serialize(pubkey, created_at, kind, frozen, content)


def _serialize(pubkey: str, created_at: int, kind: int, tags: Tags, content: str) -> bytes:
    """:func:`serialize` for fields already known to be well-formed."""
    text = _CANONICAL_JSON.encode([0, pubkey, created_at, kind, tags, content])
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise EventError(
            EventErrorReason.INVALID_UNICODE, "a string contains a lone surrogate, which is not valid UTF-8"
        ) from None


def compute_id(pubkey: str, created_at: int, kind: int, tags: Iterable[Iterable[str]], content: str) -> str:
    """Lowercase hex SHA-256 of the canonical serialization."""
    return hashlib.sha256(serialize(pubkey, created_at, kind, tags, content)).hexdigest()


# ------------------------------------------------------------------------------ keys


class SecretKey:
    """A secp256k1 secret key (32 bytes, in 1..n-1) for BIP-340 signing."""

    __slots__ = ("_key", "_public_key_hex")

    def __init__(self, secret: bytes) -> None:
        if type(secret) is not bytes or len(secret) != 32:
            raise EventError(EventErrorReason.INVALID_SECRET_KEY, "secret key must be 32 bytes")
        try:
            self._key = coincurve.PrivateKey(secret)
        except ValueError:
            raise EventError(
                EventErrorReason.INVALID_SECRET_KEY, "secret key is zero or not below the curve order"
            ) from None
        self._public_key_hex = self._key.public_key_xonly.format().hex()

    @classmethod
    def generate(cls) -> SecretKey:
        return cls(coincurve.PrivateKey().secret)

    @classmethod
    def from_hex(cls, text: str) -> SecretKey:
        if type(text) is not str or _HEX64.fullmatch(text.lower()) is None:
            raise EventError(EventErrorReason.INVALID_SECRET_KEY, "secret key must be 64 hex characters")
        return cls(bytes.fromhex(text))

    @property
    def secret_bytes(self) -> bytes:
        return self._key.secret

    def to_hex(self) -> str:
        return self._key.secret.hex()

    @property
    def public_key_hex(self) -> str:
        """The BIP-340 x-only public key, lowercase hex (the event ``pubkey``)."""
        return self._public_key_hex

    def sign_schnorr(self, message32: bytes) -> bytes:
        """BIP-340 signature of a 32-byte message, with fresh auxiliary randomness."""
        return self._key.sign_schnorr(message32, os.urandom(32))

    def __repr__(self) -> str:  # never print the secret
        return f"SecretKey(public_key_hex={self._public_key_hex!r})"


def sign_event(
    secret: SecretKey, kind: int, tags: Iterable[Iterable[str]], content: str, created_at: int | None = None
) -> Event:
    """Build and sign an event; ``created_at`` defaults to the current Unix time."""
    frozen = _freeze_tags(tags)
    if created_at is None:
        created_at = int(time.time())
    pubkey = secret.public_key_hex
    _check_unsigned_fields(pubkey, created_at, kind, frozen, content)
    digest = hashlib.sha256(_serialize(pubkey, created_at, kind, frozen, content)).digest()
    signature = secret.sign_schnorr(digest)
    return Event(
        id=digest.hex(),
        pubkey=pubkey,
        created_at=created_at,
        kind=kind,
        tags=frozen,
        content=content,
        sig=signature.hex(),
    )


# ---------------------------------------------------------------------- verification


@lru_cache(maxsize=4096)
def _xonly_public_key(pubkey_hex: str) -> coincurve.PublicKeyXOnly:
    """Parsed key (a square root on the curve: worth caching for repeat authors)."""
    return coincurve.PublicKeyXOnly(bytes.fromhex(pubkey_hex))


def _utf8_length(text: str) -> int:
    if text.isascii():  # O(1) for CPython's compact strings
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def _check_limits(event: Event, max_tags: int, max_tag_len: int, max_content: int) -> None:
    if len(event.tags) > max_tags:
        raise EventError(EventErrorReason.TOO_MANY_TAGS, f"more than {max_tags} tags")
    for index, tag in enumerate(event.tags):
        if len(tag) > max_tag_len:
            raise EventError(EventErrorReason.TAG_TOO_LONG, f"tag #{index} has more than {max_tag_len} items")
    if _utf8_length(event.content) > max_content:
        raise EventError(EventErrorReason.CONTENT_TOO_LARGE, f"content is over {max_content} bytes")


def _check_time(created_at: int, now: int, max_future: int, max_age: int | None) -> None:
    if created_at > now + max_future:
        raise EventError(EventErrorReason.CREATED_AT_IN_FUTURE, f"created_at is more than {max_future}s in the future")
    if max_age is not None and created_at < now - max_age:
        raise EventError(EventErrorReason.CREATED_AT_TOO_OLD, f"created_at is more than {max_age}s old")


def _check_signature(event: Event, digest: bytes) -> None:
    try:
        key = _xonly_public_key(event.pubkey)
    except ValueError:
        raise EventError(EventErrorReason.INVALID_PUBKEY, "pubkey is not a point on secp256k1") from None
    if not key.verify(bytes.fromhex(event.sig), digest):
        raise EventError(EventErrorReason.BAD_SIGNATURE, "signature does not verify")


def verify_event(
    obj: Mapping[str, Any] | Event,
    *,
    now: int,
    max_future: int = 900,
    max_age: int | None = None,
    max_bytes: int = 65536,
    max_tags: int = 2000,
    max_tag_len: int = 64,
    max_content: int = 65536,
) -> Event:
    """Strictly validate an event (decoded JSON object or :class:`Event`) and return it.

    Checks, cheapest first: shape (see :meth:`Event.from_dict`); at most ``max_tags``
    tags of at most ``max_tag_len`` items each; content of at most ``max_content``
    UTF-8 bytes; ``created_at`` at most ``max_future`` seconds after ``now`` and, if
    ``max_age`` is set, at most ``max_age`` seconds before it; canonical serialization
    of at most ``max_bytes`` UTF-8 bytes; the id; the public key; the signature.
    """
    event = obj if isinstance(obj, Event) else Event.from_dict(obj)
    _check_limits(event, max_tags, max_tag_len, max_content)
    _check_time(event.created_at, now, max_future, max_age)
    serialized = _serialize(event.pubkey, event.created_at, event.kind, event.tags, event.content)
    if len(serialized) > max_bytes:
        raise EventError(EventErrorReason.EVENT_TOO_LARGE, f"serialized event is over {max_bytes} bytes")
    digest = hashlib.sha256(serialized).digest()
    if digest.hex() != event.id:
        raise EventError(EventErrorReason.ID_MISMATCH, "id is not the hash of the serialized event")
    _check_signature(event, digest)
    return event
