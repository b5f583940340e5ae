"""NIP-44 version 2 encrypted payloads.

``payload = base64(0x02 || nonce[32] || chacha20(padded plaintext) || hmac_sha256[32])``

* conversation key: HKDF-extract(SHA-256, salt=b"nip44-v2", IKM=unhashed x-coordinate
  of the secp256k1 ECDH point ``sec * P``), symmetric between the two parties;
* message keys: HKDF-expand(conversation key, info=nonce, L=76) split into the
  ChaCha20 key (32), ChaCha20 nonce (12) and HMAC key (32);
* plaintext: UTF-8, 1..65535 bytes, prefixed with its big-endian u16 length and
  zero-padded to :func:`calc_padded_len`;
* MAC: HMAC-SHA256 over ``nonce || ciphertext``, compared in constant time before
  anything is decrypted.

The 2026 revision of NIP-44 also defines a 6-byte "extended" length prefix for
plaintexts of 65536 bytes and more; the spec lets implementations cap the size,
and this one caps plaintexts at 65535 bytes (the limit the published test vectors
and most deployed clients use), so such payloads fail the payload length check.

Failures raise :class:`Nip44Error` with a :class:`Nip44ErrorReason`. Messages name
no key, nonce or plaintext.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import os

import coincurve
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

VERSION = 2
SALT = b"nip44-v2"
MIN_PLAINTEXT = 1
MAX_PLAINTEXT = 65535
NONCE_LENGTH = 32
MAC_LENGTH = 32
KEY_LENGTH = 32
# 1 version byte + nonce + MAC, around a ciphertext of 2 + 32 .. 2 + 65536 bytes.
MIN_DECODED = 1 + NONCE_LENGTH + 2 + 32 + MAC_LENGTH  # 99
MAX_DECODED = 1 + NONCE_LENGTH + 2 + 65536 + MAC_LENGTH  # 65603
MIN_PAYLOAD = 132
CURVE_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
MAX_PAYLOAD = (MAX_DECODED + 2) // 3 * 4  # 87472 base64 characters


class Nip44ErrorReason(enum.StrEnum):
    UNKNOWN_VERSION = "unknown_version"
    INVALID_BASE64 = "invalid_base64"
    INVALID_PAYLOAD_LENGTH = "invalid_payload_length"
    INVALID_MAC = "invalid_mac"
    INVALID_PADDING = "invalid_padding"
    INVALID_PLAINTEXT_LENGTH = "invalid_plaintext_length"
    INVALID_UTF8 = "invalid_utf8"
    INVALID_SECRET_KEY = "invalid_secret_key"
    INVALID_PUBLIC_KEY = "invalid_public_key"
    INVALID_CONVERSATION_KEY = "invalid_conversation_key"
    INVALID_NONCE = "invalid_nonce"


class Nip44Error(ValueError):
    def __init__(self, reason: Nip44ErrorReason, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(f"{reason.value}: {message}")


# ----------------------------------------------------------------------------- keys


def _public_key(pub_xonly_hex: str) -> coincurve.PublicKey:
    if type(pub_xonly_hex) is not str or len(pub_xonly_hex) != 64:
        raise Nip44Error(Nip44ErrorReason.INVALID_PUBLIC_KEY, "public key must be 64 hex characters")
    try:
        x = bytes.fromhex(pub_xonly_hex)
        # Any lift of x works: x(a*P) == x(a*(-P)). Even y, as BIP-340 does.
        return coincurve.PublicKey(b"\x02" + x)
    except ValueError:
        raise Nip44Error(Nip44ErrorReason.INVALID_PUBLIC_KEY, "public key is not hex or not on secp256k1") from None


def _check_secret(sec: bytes) -> None:
    if type(sec) is not bytes or len(sec) != 32:
        raise Nip44Error(Nip44ErrorReason.INVALID_SECRET_KEY, "secret key must be 32 bytes")
    if not 0 < int.from_bytes(sec, "big") < CURVE_ORDER:
        raise Nip44Error(Nip44ErrorReason.INVALID_SECRET_KEY, "secret key is zero or not below the curve order")


def conversation_key(sec: bytes, pub_xonly_hex: str) -> bytes:
    """The 32-byte key shared by ``sec``'s owner and the holder of ``pub_xonly_hex``."""
    _check_secret(sec)
    shared_point = _public_key(pub_xonly_hex).multiply(sec)
    shared_x = shared_point.format(compressed=True)[1:]
    return HKDF.extract(hashes.SHA256(), SALT, shared_x)


def message_keys(conv_key: bytes, nonce: bytes) -> tuple[bytes, bytes, bytes]:
    """``(chacha_key, chacha_nonce, hmac_key)`` for one message."""
    if type(conv_key) is not bytes or len(conv_key) != KEY_LENGTH:
        raise Nip44Error(Nip44ErrorReason.INVALID_CONVERSATION_KEY, "conversation key must be 32 bytes")
    if type(nonce) is not bytes or len(nonce) != NONCE_LENGTH:
        raise Nip44Error(Nip44ErrorReason.INVALID_NONCE, "nonce must be 32 bytes")
    keys = HKDFExpand(hashes.SHA256(), 76, nonce).derive(conv_key)
    return keys[0:32], keys[32:44], keys[44:76]


# -------------------------------------------------------------------------- padding


def calc_padded_len(unpadded_len: int) -> int:
    """Length the plaintext is zero-padded to (without the 2-byte length prefix)."""
    if unpadded_len < MIN_PLAINTEXT:
        raise Nip44Error(Nip44ErrorReason.INVALID_PLAINTEXT_LENGTH, "plaintext must be at least 1 byte")
    if unpadded_len <= 32:
        return 32
    next_power = 1 << (unpadded_len - 1).bit_length()  # 2 ** (floor(log2(n - 1)) + 1)
    chunk = 32 if next_power <= 256 else next_power // 8
    return chunk * ((unpadded_len - 1) // chunk + 1)


def _check_plaintext_length(length: int) -> None:
    if not MIN_PLAINTEXT <= length <= MAX_PLAINTEXT:
        raise Nip44Error(
            Nip44ErrorReason.INVALID_PLAINTEXT_LENGTH,
            f"plaintext must be {MIN_PLAINTEXT}..{MAX_PLAINTEXT} bytes of UTF-8, got {length}",
        )


def pad(plaintext: str) -> bytes:
    try:
        raw = plaintext.encode("utf-8")
    except UnicodeEncodeError:
        raise Nip44Error(Nip44ErrorReason.INVALID_UTF8, "plaintext has a lone surrogate") from None
    _check_plaintext_length(len(raw))
    return len(raw).to_bytes(2, "big") + raw + bytes(calc_padded_len(len(raw)) - len(raw))


def unpad(padded: bytes) -> str:
    length = int.from_bytes(padded[0:2], "big")
    raw = padded[2 : 2 + length]
    if length == 0 or len(raw) != length or len(padded) != 2 + calc_padded_len(length):
        raise Nip44Error(Nip44ErrorReason.INVALID_PADDING, "length prefix does not match the padding")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Nip44Error(Nip44ErrorReason.INVALID_UTF8, "decrypted plaintext is not UTF-8") from None


# ---------------------------------------------------------------------- encryption


def _chacha20(key: bytes, nonce12: bytes, data: bytes) -> bytes:
    # cryptography takes a 16-byte nonce: 32-bit little-endian block counter (0) + 96-bit nonce.
    cipher = Cipher(algorithms.ChaCha20(key, b"\x00\x00\x00\x00" + nonce12), mode=None)
    return cipher.encryptor().update(data)


def _mac(hmac_key: bytes, nonce: bytes, ciphertext: bytes) -> bytes:
    return hmac.new(hmac_key, nonce + ciphertext, hashlib.sha256).digest()


def encrypt(plaintext: str, conv_key: bytes, nonce: bytes | None = None) -> str:
    """Encrypt to a base64 payload; ``nonce`` (32 bytes) is random unless given (tests only)."""
    if nonce is None:
        nonce = os.urandom(NONCE_LENGTH)
    chacha_key, chacha_nonce, hmac_key = message_keys(conv_key, nonce)
    ciphertext = _chacha20(chacha_key, chacha_nonce, pad(plaintext))
    mac = _mac(hmac_key, nonce, ciphertext)
    return base64.b64encode(bytes((VERSION,)) + nonce + ciphertext + mac).decode("ascii")


def _decode_payload(payload: str) -> tuple[bytes, bytes, bytes]:
    """``(nonce, ciphertext, mac)``; checks the size before base64-decoding anything."""
    if type(payload) is not str or not payload:
        raise Nip44Error(Nip44ErrorReason.INVALID_PAYLOAD_LENGTH, "payload is empty")
    if payload[0] == "#":
        raise Nip44Error(Nip44ErrorReason.UNKNOWN_VERSION, "non-base64 encodings ('#') are not supported")
    if not MIN_PAYLOAD <= len(payload) <= MAX_PAYLOAD:
        raise Nip44Error(
            Nip44ErrorReason.INVALID_PAYLOAD_LENGTH,
            f"payload must be {MIN_PAYLOAD}..{MAX_PAYLOAD} characters, got {len(payload)}",
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise Nip44Error(Nip44ErrorReason.INVALID_BASE64, "payload is not valid padded base64") from None
    if not MIN_DECODED <= len(data) <= MAX_DECODED:
        raise Nip44Error(
            Nip44ErrorReason.INVALID_PAYLOAD_LENGTH,
            f"decoded payload must be {MIN_DECODED}..{MAX_DECODED} bytes, got {len(data)}",
        )
    if data[0] != VERSION:
        raise Nip44Error(Nip44ErrorReason.UNKNOWN_VERSION, f"encryption version {data[0]} is not supported")
    return data[1:33], data[33:-MAC_LENGTH], data[-MAC_LENGTH:]


def decrypt(payload: str, conv_key: bytes) -> str:
    """Authenticate, then decrypt a base64 payload produced by :func:`encrypt`."""
    nonce, ciphertext, mac = _decode_payload(payload)
    chacha_key, chacha_nonce, hmac_key = message_keys(conv_key, nonce)
    if not hmac.compare_digest(_mac(hmac_key, nonce, ciphertext), mac):
        raise Nip44Error(Nip44ErrorReason.INVALID_MAC, "MAC does not match")
    return unpad(_chacha20(chacha_key, chacha_nonce, ciphertext))
