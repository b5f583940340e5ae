"""Data shards of a job request (protocol.md §2): the ``i`` tags that are provider slots.

Plain: ``["i", <url>, "url", <relay-or-"">, "shard-<k>"]``.
Private (our decision, protocol.md was silent): ``["i", <payload>, "nip44",
<provider pubkey hex>, "shard-<k>"]``, where ``payload`` is the URL encrypted with
NIP-44 v2 from the customer to that provider. The escrow cannot read it and does
not need to: it checks the payload's shape, and the shard admits only that provider.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from service.nostr import nip44
from service.nostr.nip01 import SecretKey

from .errors import CodecError, CodecErrorReason
from .fields import Tag, arity, is_url, parse_hex64, parse_relay_hint

R = CodecErrorReason

MAX_SHARD_INDEX = 999_999
# NIP-44 v2 payload bounds (base64 of 1 version + 32 nonce + 34..65538 ciphertext + 32 MAC bytes).
# Kept here: only conversation_key / encrypt / decrypt are nip44's interface to this module.
NIP44_VERSION = 2
NIP44_MIN_PAYLOAD = 132
NIP44_MAX_PAYLOAD = 87_472
_SHARD_LABEL = re.compile(r"shard-(0|[1-9][0-9]{0,5})")
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


def shard_label(index: int) -> str:
    return f"shard-{index}"


def parse_shard_label(text: str) -> int:
    match = _SHARD_LABEL.fullmatch(text)
    if match is None:
        raise CodecError(
            R.INVALID_SHARD_INDEX, f"shard label must be shard-<k> with k a canonical integer <= {MAX_SHARD_INDEX}"
        )
    return int(match.group(1))


def is_nip44_payload(text: str) -> bool:
    """The shape of a NIP-44 v2 payload (length, padded base64, version byte 2); not decrypted."""
    if not NIP44_MIN_PAYLOAD <= len(text) <= NIP44_MAX_PAYLOAD or len(text) % 4:
        return False
    if _BASE64.fullmatch(text) is None:
        return False
    try:
        head = base64.b64decode(text[:4], validate=True)
    except (binascii.Error, ValueError):
        return False
    return head[0] == NIP44_VERSION


@dataclass(frozen=True, slots=True)
class Shard:
    """One data shard = one provider slot.

    Plain: ``["i", <url>, "url", <relay-or-"">, "shard-<k>"]`` (``url`` set).
    Private: ``["i", <NIP-44 payload>, "nip44", <provider pubkey>, "shard-<k>"]``
    (``payload`` and ``provider`` set): the URL encrypted customer → provider; only
    that provider can read it and only that provider may submit a result for it.
    """

    index: int
    url: str | None = None
    relay: str = ""
    payload: str | None = None
    provider: str | None = None

    @property
    def label(self) -> str:
        return shard_label(self.index)

    @property
    def encrypted(self) -> bool:
        return self.payload is not None

    def to_tag(self) -> Tag:
        if type(self.index) is not int or not 0 <= self.index <= MAX_SHARD_INDEX:
            raise CodecError(R.INVALID_SHARD_INDEX, f"shard index must be an integer in 0..{MAX_SHARD_INDEX}")
        if self.payload is not None:
            if type(self.payload) is not str:
                raise CodecError(R.INVALID_SHARD, "shard payload must be a string")
            if self.url is not None or self.relay:
                raise CodecError(R.INVALID_SHARD, "an encrypted shard has no plain url or relay")
            tag: Tag = ("i", self.payload, "nip44", str(self.provider), self.label)
        else:
            if self.provider is not None:
                raise CodecError(R.INVALID_SHARD, "a plain shard has no provider")
            tag = ("i", str(self.url), "url", str(self.relay), self.label)
        return parse_shard(tag).to_tag_unchecked()

    def to_tag_unchecked(self) -> Tag:
        if self.payload is not None:
            return ("i", self.payload, "nip44", str(self.provider), self.label)
        return ("i", str(self.url), "url", self.relay, self.label)

    @classmethod
    def for_provider(
        cls, customer: SecretKey, provider_pubkey_hex: str, index: int, url: str, *, nonce: bytes | None = None
    ) -> Shard:
        """A private shard: ``url`` encrypted by ``customer`` to ``provider_pubkey_hex``."""
        return cls(
            index=index,
            payload=encrypt_shard(customer, provider_pubkey_hex, url, nonce=nonce),
            provider=provider_pubkey_hex,
        )


def parse_shard(tag: Tag) -> Shard:
    """A shard ``i`` tag (type ``url`` or ``nip44``)."""
    arity(tag, 5, 5, R.INVALID_SHARD)
    _, value, kind, third, label = tag
    if kind == "url":
        if not is_url(value):
            raise CodecError(R.INVALID_SHARD, "shard url must be a printable-ASCII URL with a scheme")
        relay = parse_relay_hint(third, R.INVALID_SHARD, "shard relay hint")
        return Shard(index=parse_shard_label(label), url=value, relay=relay)
    if kind == "nip44":
        if not is_nip44_payload(value):
            raise CodecError(R.INVALID_SHARD, "shard payload must be a NIP-44 v2 base64 payload")
        provider = parse_hex64(third, R.INVALID_SHARD, "shard provider pubkey")
        return Shard(index=parse_shard_label(label), payload=value, provider=provider)
    raise CodecError(R.INVALID_SHARD, "shard type must be 'url' or 'nip44'")


def _nip44_reason(exc: ValueError) -> str:
    return str(getattr(exc, "reason", "nip44 error"))


def encrypt_shard(customer: SecretKey, provider_pubkey_hex: str, url: str, *, nonce: bytes | None = None) -> str:
    """NIP-44 v2 payload of ``url`` from the customer to one provider (``nonce``: tests only)."""
    if type(url) is not str or not is_url(url):
        raise CodecError(R.INVALID_SHARD, "shard url must be a printable-ASCII URL with a scheme")
    parse_hex64(provider_pubkey_hex, R.INVALID_SHARD, "shard provider pubkey")
    try:
        key = nip44.conversation_key(customer.secret_bytes, provider_pubkey_hex)
        return nip44.encrypt(url, key, nonce)
    except ValueError as exc:  # nip44.Nip44Error
        raise CodecError(R.INVALID_SHARD, f"cannot encrypt the shard: {_nip44_reason(exc)}") from None


def decrypt_shard(provider: SecretKey, customer_pubkey_hex: str, payload: str) -> str:
    """The URL of a private shard, for the provider it is encrypted to."""
    try:
        key = nip44.conversation_key(provider.secret_bytes, customer_pubkey_hex)
        url = nip44.decrypt(payload, key)
    except ValueError as exc:  # nip44.Nip44Error
        raise CodecError(R.UNDECRYPTABLE_SHARD, f"shard does not decrypt: {_nip44_reason(exc)}") from None
    if not is_url(url):
        raise CodecError(R.UNDECRYPTABLE_SHARD, "decrypted shard is not a URL")
    return url
