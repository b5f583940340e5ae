"""An independent model of NIP-01 strict verification, written from the spec and nip01's docs.

:func:`faults` lists every fault an input has (as ``EventErrorReason`` values), without
using service.nostr.nip01: the canonical serialization is built character by character
(NIP-01's escaping rules), the hash with hashlib, the BIP-340 check with coincurve.
The oracle of the fuzz target: the verifier must refuse with a reason from this set
(the *first* one in the documented order once the shape is right), and accept exactly
when the set is empty.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

import coincurve

from service.nostr.nip01 import EventErrorReason as R

FIELDS = ("id", "pubkey", "created_at", "kind", "tags", "content", "sig")
HEX64 = re.compile(r"[0-9a-f]{64}")
HEX128 = re.compile(r"[0-9a-f]{128}")
MAX_CREATED_AT = 2**63 - 1
MAX_KIND = 65535

SHAPE = frozenset(
    {
        R.NOT_OBJECT,
        R.MISSING_FIELD,
        R.UNEXPECTED_FIELD,
        R.INVALID_ID,
        R.INVALID_PUBKEY_FORMAT,
        R.INVALID_CREATED_AT,
        R.CREATED_AT_OUT_OF_RANGE,
        R.INVALID_KIND,
        R.KIND_OUT_OF_RANGE,
        R.INVALID_TAGS,
        R.INVALID_TAG,
        R.INVALID_TAG_ITEM,
        R.EMPTY_TAG,
        R.INVALID_CONTENT,
        R.INVALID_SIG_FORMAT,
    }
)
# After the shape, verify_event's documented order: limits, time, serialization, size, id, key, signature.
ORDER = (
    R.TOO_MANY_TAGS,
    R.TAG_TOO_LONG,
    R.CONTENT_TOO_LARGE,
    R.CREATED_AT_IN_FUTURE,
    R.CREATED_AT_TOO_OLD,
    R.INVALID_UNICODE,
    R.EVENT_TOO_LARGE,
    R.ID_MISMATCH,
    R.INVALID_PUBKEY,
    R.BAD_SIGNATURE,
)


@dataclass(frozen=True)
class Limits:
    now: int
    max_future: int = 900
    max_age: int | None = None
    max_bytes: int = 65536
    max_tags: int = 2000
    max_tag_len: int = 64
    max_content: int = 65536

    def kwargs(self) -> dict:
        return {
            "now": self.now,
            "max_future": self.max_future,
            "max_age": self.max_age,
            "max_bytes": self.max_bytes,
            "max_tags": self.max_tags,
            "max_tag_len": self.max_tag_len,
            "max_content": self.max_content,
        }


_SHORT_ESCAPES = {"\n": "\\n", '"': '\\"', "\\": "\\\\", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}
_NEEDS_ESCAPE = re.compile(r'[\x00-\x1f"\\]')


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _SHORT_ESCAPES.get(char) or f"\\u{ord(char):04x}"


def json_string(text: str) -> str:
    """NIP-01: only the escapes JSON needs; other controls as \\u00XX (lowercase); the rest verbatim."""
    return '"' + _NEEDS_ESCAPE.sub(_escape, text) + '"'


def canonical_text(pubkey: str, created_at: int, kind: int, tags, content: str) -> str:
    tag_text = ",".join("[" + ",".join(json_string(item) for item in tag) + "]" for tag in tags)
    return f"[0,{json_string(pubkey)},{created_at},{kind},[{tag_text}],{json_string(content)}]"


def canonical_bytes(pubkey: str, created_at: int, kind: int, tags, content: str) -> bytes | None:
    """The UTF-8 serialization, or None when a string holds a lone surrogate (no UTF-8 form)."""
    try:
        return canonical_text(pubkey, created_at, kind, tags, content).encode("utf-8")
    except UnicodeEncodeError:
        return None


def schnorr_ok(pubkey_hex: str, sig_hex: str, digest: bytes) -> bool | None:
    """True/False for the signature; None when the pubkey is not an x coordinate on the curve."""
    try:
        key = coincurve.PublicKeyXOnly(bytes.fromhex(pubkey_hex))
    except ValueError:
        return None
    return key.verify(bytes.fromhex(sig_hex), digest)


def _int_fault(value: object, maximum: int, type_reason: R, range_reason: R) -> R | None:
    if type(value) is not int:
        return type_reason
    if not 0 <= value <= maximum:
        return range_reason
    return None


def shape_faults(obj: object) -> set[R]:
    if not isinstance(obj, Mapping):
        return {R.NOT_OBJECT}
    found: set[R] = set()
    keys = set(obj.keys())
    if set(FIELDS) - keys:
        found.add(R.MISSING_FIELD)
    if keys - set(FIELDS):
        found.add(R.UNEXPECTED_FIELD)
    if found:
        return found
    if type(obj["id"]) is not str or not HEX64.fullmatch(obj["id"]):
        found.add(R.INVALID_ID)
    if type(obj["pubkey"]) is not str or not HEX64.fullmatch(obj["pubkey"]):
        found.add(R.INVALID_PUBKEY_FORMAT)
    if type(obj["sig"]) is not str or not HEX128.fullmatch(obj["sig"]):
        found.add(R.INVALID_SIG_FORMAT)
    for name, maximum, type_reason, range_reason in (
        ("created_at", MAX_CREATED_AT, R.INVALID_CREATED_AT, R.CREATED_AT_OUT_OF_RANGE),
        ("kind", MAX_KIND, R.INVALID_KIND, R.KIND_OUT_OF_RANGE),
    ):
        fault = _int_fault(obj[name], maximum, type_reason, range_reason)
        if fault is not None:
            found.add(fault)
    tags = obj["tags"]
    if not isinstance(tags, (list, tuple)):
        found.add(R.INVALID_TAGS)
    else:
        for tag in tags:
            if not isinstance(tag, (list, tuple)):
                found.add(R.INVALID_TAG)
            elif not tag:
                found.add(R.EMPTY_TAG)
            elif any(type(item) is not str for item in tag):
                found.add(R.INVALID_TAG_ITEM)
    if type(obj["content"]) is not str:
        found.add(R.INVALID_CONTENT)
    return found


def faults(obj: object, limits: Limits) -> list[R]:
    """Every fault of ``obj``: the shape faults (any order), else the others in the documented order."""
    shape = shape_faults(obj)
    if shape:
        return sorted(shape)
    assert isinstance(obj, Mapping)
    tags = [tuple(tag) for tag in obj["tags"]]
    content: str = obj["content"]
    created_at: int = obj["created_at"]
    found: list[R] = []
    if len(tags) > limits.max_tags:
        found.append(R.TOO_MANY_TAGS)
    if any(len(tag) > limits.max_tag_len for tag in tags):
        found.append(R.TAG_TOO_LONG)
    if len(content.encode("utf-8", "surrogatepass")) > limits.max_content:
        found.append(R.CONTENT_TOO_LARGE)
    if created_at > limits.now + limits.max_future:
        found.append(R.CREATED_AT_IN_FUTURE)
    if limits.max_age is not None and created_at < limits.now - limits.max_age:
        found.append(R.CREATED_AT_TOO_OLD)
    data = canonical_bytes(obj["pubkey"], created_at, obj["kind"], tags, content)
    if data is None:
        found.append(R.INVALID_UNICODE)
        return found  # no bytes: no size, no id, no signature to check
    if len(data) > limits.max_bytes:
        found.append(R.EVENT_TOO_LARGE)
    digest = hashlib.sha256(data).digest()
    if digest.hex() != obj["id"]:
        found.append(R.ID_MISMATCH)
    verdict = schnorr_ok(obj["pubkey"], obj["sig"], digest)
    if verdict is None:
        found.append(R.INVALID_PUBKEY)
    elif not verdict:
        found.append(R.BAD_SIGNATURE)
    return found
