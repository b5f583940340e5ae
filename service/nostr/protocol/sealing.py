"""Sealed results (protocol.md §5a): a model the customer can read only once its provider is paid.

A provider encrypts its model with a fresh 32-byte content key (ChaCha20-Poly1305, the AEAD of
``cryptography``), uploads only the ciphertext, and publishes, instead of ``model``::

    ["sealed", <ciphertext url>, <ciphertext sha256>, <ciphertext bytes>,
               <model sha256>, <model bytes>, <key sha256>]
    ["key", <recipient pubkey>, <NIP-44 v2 payload: the content key as 64 hex>]   (one per recipient)

The recipients are the job's designated validators and the escrow, and nobody else: never the
customer (it gets the key from the escrow when the provider's reward is released). ``key
sha256`` (the SHA-256 of the 32 key bytes) commits every recipient to one key, so the escrow
cannot be handed another key than the validators scored with; the AEAD's associated data is
the model's sha256, so a ciphertext opens only to the model it claims.

The ciphertext blob is ``nonce (12 bytes) || ChaCha20-Poly1305(key, nonce, model, aad)``: it is
exactly :data:`OVERHEAD` bytes longer than the model (checked by the codec).

The codec functions here are pure; :func:`seal` draws a key and a nonce from ``os.urandom``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from service.nostr import nip44
from service.nostr.nip01 import SecretKey

from .errors import CodecError, CodecErrorReason
from .fields import Tag, arity, format_uint, is_hex64, is_url, named, parse_hex64, parse_uint
from .shards import is_nip44_payload

R = CodecErrorReason

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD = NONCE_BYTES + TAG_BYTES  # ciphertext bytes = model bytes + OVERHEAD
MAX_MODEL_BYTES = 2**53 - 1 - OVERHEAD
MAX_KEYS = 1 + 64  # the escrow and at most 64 validators (EscrowTerms bounds max_validators lower)
AEAD = "chacha20poly1305"


@dataclass(frozen=True, slots=True)
class KeyEnvelope:
    """``["key", <recipient>, <payload>]``: the content key, NIP-44-encrypted from its sender to ``recipient``."""

    recipient: str
    payload: str


@dataclass(frozen=True, slots=True)
class SealedModel:
    """A sealed result's model: where its ciphertext is, what it opens to, and who may open it."""

    url: str  # the ciphertext's (content-addressed blob) URL
    ciphertext_sha256: str
    ciphertext_bytes: int
    sha256: str  # the model's (the plaintext's): scores and copies are judged by it
    size_bytes: int
    key_sha256: str
    keys: tuple[KeyEnvelope, ...] = ()

    def key_for(self, recipient: str) -> KeyEnvelope | None:
        return next((k for k in self.keys if k.recipient == recipient), None)


class SealError(ValueError):
    """A sealed model does not open: ``reason`` is a stable code (``wrong_key``, ``not_decryptable``,
    ``model_mismatch``); the message names no key."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}")


# ----------------------------------------------------------------------------- tags


def read_sealed_tag(tag: Tag) -> SealedModel:
    arity(tag, 7, 7, R.INVALID_SEALED_MODEL)
    _, url, c_sha, c_size, m_sha, m_size, k_sha = tag
    if not is_url(url):
        raise CodecError(R.INVALID_SEALED_MODEL, "sealed model url must be a printable-ASCII URL with a scheme")
    for value, what in ((c_sha, "ciphertext sha256"), (m_sha, "model sha256"), (k_sha, "key sha256")):
        parse_hex64(value, R.INVALID_SEALED_MODEL, what)
    size = parse_uint(m_size, R.INVALID_SEALED_MODEL, "model size", MAX_MODEL_BYTES)
    c_bytes = parse_uint(c_size, R.INVALID_SEALED_MODEL, "ciphertext size", MAX_MODEL_BYTES + OVERHEAD)
    if size == 0:
        raise CodecError(R.INVALID_SEALED_MODEL, "model size must be positive")
    if c_bytes != size + OVERHEAD:
        raise CodecError(R.INVALID_SEALED_MODEL, f"ciphertext size must be the model size + {OVERHEAD}")
    if c_sha == m_sha:
        raise CodecError(R.INVALID_SEALED_MODEL, "the ciphertext cannot hash like the model")
    return SealedModel(url, c_sha, c_bytes, m_sha, size, k_sha)


def sealed_tag(model: SealedModel) -> Tag:
    tag: Tag = (
        "sealed",
        model.url,
        model.ciphertext_sha256,
        format_uint(model.ciphertext_bytes, R.INVALID_SEALED_MODEL, "ciphertext size", MAX_MODEL_BYTES + OVERHEAD),
        model.sha256,
        format_uint(model.size_bytes, R.INVALID_SEALED_MODEL, "model size", MAX_MODEL_BYTES),
        model.key_sha256,
    )
    if any(type(item) is not str for item in tag):
        raise TypeError("sealed model url and hashes must be strings")
    read_sealed_tag(tag)
    return tag


def read_key_tag(tag: Tag, reason: CodecErrorReason = R.INVALID_KEY) -> KeyEnvelope:
    arity(tag, 3, 3, reason)
    _, recipient, payload = tag
    if not is_hex64(recipient):
        raise CodecError(reason, "key recipient must be a 64-hex pubkey")
    if not is_nip44_payload(payload):
        raise CodecError(reason, "key must be a NIP-44 v2 payload")
    return KeyEnvelope(recipient, payload)


def key_tag(envelope: KeyEnvelope) -> Tag:
    tag: Tag = ("key", envelope.recipient, envelope.payload)
    if any(type(item) is not str for item in tag):
        raise TypeError("key recipient and payload must be strings")
    read_key_tag(tag)
    return tag


def read_keys(tags: tuple[Tag, ...]) -> tuple[KeyEnvelope, ...]:
    keys: list[KeyEnvelope] = []
    for tag in named(tags, "key"):
        envelope = read_key_tag(tag)
        if any(k.recipient == envelope.recipient for k in keys):
            raise CodecError(R.DUPLICATE_KEY, "one recipient has two keys")
        keys.append(envelope)
        if len(keys) > MAX_KEYS:
            raise CodecError(R.INVALID_KEY, f"at most {MAX_KEYS} keys")
    return tuple(keys)


# ----------------------------------------------------------------------------- crypto


def key_sha256(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()


@dataclass(frozen=True, slots=True)
class Sealed:
    """What :func:`seal` returns: the ciphertext to upload and the key to wrap (never published)."""

    ciphertext: bytes
    key: bytes
    model_sha256: str
    key_sha256: str

    def __repr__(self) -> str:  # the key never reaches a log
        return f"Sealed(model_sha256={self.model_sha256!r}, {len(self.ciphertext)} bytes)"


def seal(model: bytes, *, key: bytes | None = None, nonce: bytes | None = None) -> Sealed:
    """Encrypt ``model`` under a fresh content key (``key``/``nonce``: tests and examples only)."""
    if not model:
        raise ValueError("nothing to seal")
    key = os.urandom(KEY_BYTES) if key is None else key
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    if len(key) != KEY_BYTES or len(nonce) != NONCE_BYTES:
        raise ValueError("bad key or nonce length")
    sha = hashlib.sha256(model).hexdigest()
    ciphertext = nonce + ChaCha20Poly1305(key).encrypt(nonce, model, bytes.fromhex(sha))
    return Sealed(ciphertext, key, sha, key_sha256(key))


def open_sealed(ciphertext: bytes, key: bytes, model: SealedModel) -> bytes:
    """The model inside ``ciphertext``, only if it is exactly the one ``model`` commits to."""
    if len(key) != KEY_BYTES or key_sha256(key) != model.key_sha256:
        raise SealError("wrong_key", "the key is not the one the result commits to")
    if len(ciphertext) != model.ciphertext_bytes or hashlib.sha256(ciphertext).hexdigest() != model.ciphertext_sha256:
        raise SealError("not_decryptable", "the ciphertext is not the one the result names")
    if len(ciphertext) < OVERHEAD:  # no nonce and tag (the AEAD would raise ValueError on a short nonce)
        raise SealError("not_decryptable", "the ciphertext is too short to be sealed")
    nonce, body = ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:]
    try:
        plain = ChaCha20Poly1305(key).decrypt(nonce, body, bytes.fromhex(model.sha256))
    except InvalidTag:
        raise SealError("not_decryptable", "the ciphertext does not open with the committed key") from None
    if len(plain) != model.size_bytes or hashlib.sha256(plain).hexdigest() != model.sha256:
        raise SealError("model_mismatch", "the opened model is not the committed one")
    return plain


def wrap_key(sender: SecretKey, recipient_pubkey: str, key: bytes, *, nonce: bytes | None = None) -> KeyEnvelope:
    """The content key for one recipient (NIP-44 v2 from ``sender``; ``nonce``: tests only)."""
    if len(key) != KEY_BYTES:
        raise ValueError("a content key is 32 bytes")
    conv = nip44.conversation_key(sender.secret_bytes, recipient_pubkey)
    return KeyEnvelope(recipient_pubkey, nip44.encrypt(key.hex(), conv, nonce))


def unwrap_key(recipient: SecretKey, sender_pubkey: str, payload: str, expected_sha256: str) -> bytes:
    """The content key in ``payload`` (from ``sender_pubkey`` to ``recipient``), only if it is the
    committed one. Raises :class:`SealError` (``wrong_key``) otherwise; the message names no key."""
    try:
        conv = nip44.conversation_key(recipient.secret_bytes, sender_pubkey)
        text = nip44.decrypt(payload, conv)
    except ValueError:  # nip44.Nip44Error: wrong recipient, tampered, malformed
        raise SealError("wrong_key", "the key envelope does not decrypt for this recipient") from None
    if len(text) != 2 * KEY_BYTES or any(c not in "0123456789abcdef" for c in text):
        raise SealError("wrong_key", "the key envelope does not hold a 32-byte hex key")
    key = bytes.fromhex(text)
    if key_sha256(key) != expected_sha256:
        raise SealError("wrong_key", "the key is not the one the result commits to")
    return key


def sealed_model(
    provider: SecretKey,
    sealed: Sealed,
    *,
    url: str,
    recipients: tuple[str, ...],
) -> SealedModel:
    """The ``sealed`` and ``key`` tags' content for ``sealed`` uploaded at ``url``, with the key
    wrapped for each of ``recipients`` (the job's validators and the escrow)."""
    return SealedModel(
        url=url,
        ciphertext_sha256=hashlib.sha256(sealed.ciphertext).hexdigest(),
        ciphertext_bytes=len(sealed.ciphertext),
        sha256=sealed.model_sha256,
        size_bytes=len(sealed.ciphertext) - OVERHEAD,
        key_sha256=sealed.key_sha256,
        keys=tuple(wrap_key(provider, r, sealed.key) for r in dict.fromkeys(recipients)),
    )
