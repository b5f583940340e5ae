"""NIP-01: canonical serialization, keys, signing, and strict verification."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.nostr.nip01 import (
    MAX_CREATED_AT,
    Event,
    EventError,
    EventErrorReason,
    SecretKey,
    compute_id,
    serialize,
    sign_event,
    verify_event,
)

NOW = 1_700_000_000
SECRET = SecretKey(bytes.fromhex("0b" * 32))
OTHER = SecretKey(bytes.fromhex("0c" * 32))
HEX = "0123456789abcdef"
R = EventErrorReason

# x = 0 gives y^2 = 7, which has no square root mod p: not a curve point.
OFF_CURVE_PUBKEY = "00" * 32


def _signed(**fields: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"kind": 1, "tags": [["e", "ab" * 32], ["t", "x"]], "content": "hello", "created_at": NOW}
    args.update(fields)
    return sign_event(SECRET, **args).to_dict()


def _reason(obj: Any, **limits: Any) -> EventErrorReason:
    with pytest.raises(EventError) as caught:
        verify_event(obj, now=NOW, **limits)
    return caught.value.reason


# ------------------------------------------------------------------- round trip


def test_sign_then_verify_round_trip() -> None:
    event = sign_event(SECRET, 1, [["p", OTHER.public_key_hex]], "hi", created_at=NOW)
    assert event.pubkey == SECRET.public_key_hex
    assert event.id == compute_id(event.pubkey, NOW, 1, event.tags, "hi")
    assert verify_event(event, now=NOW) == event
    assert verify_event(json.loads(event.to_json()), now=NOW) == event
    assert Event.from_dict(event.to_dict()) == event


def test_to_dict_is_plain_json_shape() -> None:
    event = sign_event(SECRET, 7, [["e", "x", "wss://r"]], "c", created_at=NOW)
    assert event.to_dict() == {
        "id": event.id,
        "pubkey": event.pubkey,
        "created_at": NOW,
        "kind": 7,
        "tags": [["e", "x", "wss://r"]],
        "content": "c",
        "sig": event.sig,
    }
    assert json.loads(event.to_json()) == event.to_dict()


def test_signing_uses_fresh_aux_randomness() -> None:
    first = sign_event(SECRET, 1, [], "same", created_at=NOW)
    second = sign_event(SECRET, 1, [], "same", created_at=NOW)
    assert first.id == second.id
    assert first.sig != second.sig
    verify_event(first, now=NOW)
    verify_event(second, now=NOW)


def test_sign_event_defaults_created_at_to_now() -> None:
    before = int(time.time())
    event = sign_event(SECRET, 1, [], "x")
    assert before <= event.created_at <= int(time.time())


def test_sign_event_rejects_bad_fields() -> None:
    with pytest.raises(EventError) as caught:
        sign_event(SECRET, 65536, [], "x", created_at=NOW)
    assert caught.value.reason is R.KIND_OUT_OF_RANGE
    with pytest.raises(EventError) as caught:
        sign_event(SECRET, 1, ["t", "x"], "x", created_at=NOW)  # strings are not tags
    assert caught.value.reason is R.INVALID_TAG
    with pytest.raises(EventError) as caught:
        sign_event(SECRET, 1, [], "\ud800", created_at=NOW)
    assert caught.value.reason is R.INVALID_UNICODE


def test_event_constructor_enforces_shape() -> None:
    good = sign_event(SECRET, 1, [], "x", created_at=NOW)
    with pytest.raises(EventError) as caught:
        Event(id=good.id.upper(), pubkey=good.pubkey, created_at=NOW, kind=1, tags=(), content="x", sig=good.sig)
    assert caught.value.reason is R.INVALID_ID
    with pytest.raises(EventError) as caught:
        Event(
            id=good.id,
            pubkey=good.pubkey,
            created_at=NOW,
            kind=1,
            tags=[],
            content="x",  # type: ignore[arg-type]
            sig=good.sig,
        )
    assert caught.value.reason is R.INVALID_TAGS


# ------------------------------------------------------------------------- keys


def test_public_key_matches_bip340_vector() -> None:
    # BIP-340 test vector 0: secret key 3.
    key = SecretKey.from_hex("00" * 31 + "03")
    assert key.public_key_hex == "f9308a019258c31049344f85f89d5229b531c845836f99b08601f113bce036f9"


def test_secret_key_round_trips_hex_and_hides_secret_in_repr() -> None:
    key = SecretKey.generate()
    assert SecretKey.from_hex(key.to_hex()).public_key_hex == key.public_key_hex
    assert key.secret_bytes.hex() == key.to_hex()
    assert key.to_hex() not in repr(key)
    assert key.public_key_hex in repr(key)


@pytest.mark.parametrize(
    "text",
    [
        "00" * 32,  # zero
        "fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141",  # the curve order n
        "ff" * 32,  # above n
        "ab" * 31,  # short
        "zz" * 32,  # not hex
    ],
)
def test_invalid_secret_keys(text: str) -> None:
    with pytest.raises(EventError) as caught:
        SecretKey.from_hex(text)
    assert caught.value.reason is R.INVALID_SECRET_KEY


def test_secret_key_needs_32_bytes() -> None:
    with pytest.raises(EventError) as caught:
        SecretKey(b"\x01" * 31)
    assert caught.value.reason is R.INVALID_SECRET_KEY


# -------------------------------------------------------- canonical serialization

SHORT_ESCAPES = {0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0C: "\\f", 0x0D: "\\r"}


def _canonical(content: str, tags: str = "[]") -> bytes:
    return f'[0,"{SECRET.public_key_hex}",{NOW},1,{tags},"{content}"]'.encode()


def test_serialization_has_no_whitespace() -> None:
    assert serialize(SECRET.public_key_hex, NOW, 1, [["e", "x"], ["p"]], "a b") == _canonical(
        "a b", '[["e","x"],["p"]]'
    )


@pytest.mark.parametrize("code", range(0x20), ids=lambda code: f"U+{code:04X}")
def test_control_characters_are_escaped_per_nip01(code: int) -> None:
    # NIP-01 names the short forms; the other C0 controls cannot appear raw in JSON
    # and are written \u00XX in lowercase hex, as JSON.stringify and serde_json do.
    expected = SHORT_ESCAPES.get(code, f"\\u{code:04x}")
    assert serialize(SECRET.public_key_hex, NOW, 1, [], f"a{chr(code)}b") == _canonical(f"a{expected}b")
    assert serialize(SECRET.public_key_hex, NOW, 1, [[chr(code)]], "") == _canonical("", f'[["{expected}"]]')


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ('"', '\\"'),
        ("\\", "\\\\"),
    ],
)
def test_quote_and_backslash_are_escaped(raw: str, escaped: str) -> None:
    assert serialize(SECRET.public_key_hex, NOW, 1, [[raw]], raw) == _canonical(escaped, f'[["{escaped}"]]')


@pytest.mark.parametrize(
    "text",
    ["é", "🎉", "\u2028", "\u2029", "\x7f", "/", "\ufeff", "日本語"],
    ids=["latin", "emoji", "U+2028", "U+2029", "DEL", "slash", "BOM", "cjk"],
)
def test_other_characters_are_verbatim_utf8(text: str) -> None:
    serialized = serialize(SECRET.public_key_hex, NOW, 1, [[text]], text)
    assert serialized == _canonical(text, f'[["{text}"]]')
    assert text.encode("utf-8") in serialized


def test_id_is_sha256_of_canonical_form() -> None:
    assert compute_id(SECRET.public_key_hex, NOW, 1, [], "a\nb") == hashlib.sha256(_canonical("a\\nb")).hexdigest()


# ------------------------------------------------------------ malformed corpus


def _set(field: str, value: Any) -> Callable[[dict[str, Any]], Any]:
    def mutate(obj: dict[str, Any]) -> Any:
        obj[field] = value
        return obj

    return mutate


def _drop(field: str) -> Callable[[dict[str, Any]], Any]:
    def mutate(obj: dict[str, Any]) -> Any:
        del obj[field]
        return obj

    return mutate


def _resigned_with_pubkey(pubkey: str) -> Callable[[dict[str, Any]], Any]:
    """Swap in ``pubkey`` and fix the id, so only the key itself is wrong."""

    def mutate(obj: dict[str, Any]) -> Any:
        obj["pubkey"] = pubkey
        obj["id"] = compute_id(pubkey, obj["created_at"], obj["kind"], obj["tags"], obj["content"])
        return obj

    return mutate


def _foreign_signature(obj: dict[str, Any]) -> Any:
    obj["sig"] = OTHER.sign_schnorr(bytes.fromhex(obj["id"])).hex()
    return obj


def _valid(**fields: Any) -> Callable[[dict[str, Any]], Any]:
    """A correctly signed event built with ``fields`` (so only a limit is violated)."""
    return lambda _obj: _signed(**fields)


MALFORMED: list[tuple[str, EventErrorReason, Callable[[dict[str, Any]], Any], dict[str, Any]]] = [
    ("list", R.NOT_OBJECT, lambda obj: list(obj.values()), {}),
    ("json-text", R.NOT_OBJECT, lambda obj: json.dumps(obj), {}),
    ("no-sig", R.MISSING_FIELD, _drop("sig"), {}),
    ("no-tags", R.MISSING_FIELD, _drop("tags"), {}),
    ("extra-field", R.UNEXPECTED_FIELD, _set("extra", 1), {}),
    ("id-uppercase", R.INVALID_ID, lambda obj: _set("id", obj["id"].upper())(obj), {}),
    ("id-short", R.INVALID_ID, lambda obj: _set("id", obj["id"][:-1])(obj), {}),
    ("id-int", R.INVALID_ID, _set("id", 5), {}),
    ("pubkey-uppercase", R.INVALID_PUBKEY_FORMAT, lambda obj: _set("pubkey", obj["pubkey"].upper())(obj), {}),
    ("pubkey-65", R.INVALID_PUBKEY_FORMAT, lambda obj: _set("pubkey", obj["pubkey"] + "0")(obj), {}),
    ("sig-short", R.INVALID_SIG_FORMAT, lambda obj: _set("sig", obj["sig"][:126])(obj), {}),
    ("sig-nonhex", R.INVALID_SIG_FORMAT, lambda obj: _set("sig", "g" + obj["sig"][1:])(obj), {}),
    ("created_at-str", R.INVALID_CREATED_AT, _set("created_at", str(NOW)), {}),
    ("created_at-float", R.INVALID_CREATED_AT, _set("created_at", float(NOW)), {}),
    ("created_at-bool", R.INVALID_CREATED_AT, _set("created_at", True), {}),
    ("created_at-negative", R.CREATED_AT_OUT_OF_RANGE, _set("created_at", -1), {}),
    ("created_at-over-int64", R.CREATED_AT_OUT_OF_RANGE, _set("created_at", MAX_CREATED_AT + 1), {}),
    ("kind-bool", R.INVALID_KIND, _set("kind", True), {}),
    ("kind-str", R.INVALID_KIND, _set("kind", "1"), {}),
    ("kind-float", R.INVALID_KIND, _set("kind", 1.0), {}),
    ("kind-negative", R.KIND_OUT_OF_RANGE, _set("kind", -1), {}),
    ("kind-65536", R.KIND_OUT_OF_RANGE, _set("kind", 65536), {}),
    ("tags-str", R.INVALID_TAGS, _set("tags", "e"), {}),
    ("tags-object", R.INVALID_TAGS, _set("tags", {}), {}),
    ("tags-null", R.INVALID_TAGS, _set("tags", None), {}),
    ("tag-str", R.INVALID_TAG, _set("tags", ["e", "x"]), {}),
    ("tag-object", R.INVALID_TAG, _set("tags", [{"e": "x"}]), {}),
    ("tag-item-int", R.INVALID_TAG_ITEM, _set("tags", [["e", 1]]), {}),
    ("tag-item-null", R.INVALID_TAG_ITEM, _set("tags", [["e", None]]), {}),
    ("tag-empty", R.EMPTY_TAG, _set("tags", [["t", "x"], []]), {}),
    ("content-null", R.INVALID_CONTENT, _set("content", None), {}),
    ("content-int", R.INVALID_CONTENT, _set("content", 5), {}),
    ("content-lone-surrogate", R.INVALID_UNICODE, _set("content", "a\udc00"), {}),
    ("tag-lone-surrogate", R.INVALID_UNICODE, _set("tags", [["t", "\ud83d"]]), {}),
    ("2001-tags", R.TOO_MANY_TAGS, _valid(tags=[["t", str(i)] for i in range(2001)]), {}),
    ("3-tags-limit-2", R.TOO_MANY_TAGS, _valid(tags=[["t"]] * 3), {"max_tags": 2}),
    ("tag-65-items", R.TAG_TOO_LONG, _valid(tags=[["t"] * 65]), {}),
    ("content-65537-bytes", R.CONTENT_TOO_LARGE, _valid(content="a" * 65537), {}),
    ("content-multibyte", R.CONTENT_TOO_LARGE, _valid(content="é" * 32769), {}),  # 32769 chars, 65538 bytes
    ("serialized-too-big", R.EVENT_TOO_LARGE, _valid(content="a" * 60000, tags=[["t", "b" * 1000]] * 10), {}),
    ("future", R.CREATED_AT_IN_FUTURE, _valid(created_at=NOW + 901), {}),
    ("future-tight", R.CREATED_AT_IN_FUTURE, _valid(created_at=NOW + 11), {"max_future": 10}),
    ("too-old", R.CREATED_AT_TOO_OLD, _valid(created_at=NOW - 3601), {"max_age": 3600}),
    ("content-changed", R.ID_MISMATCH, _set("content", "hellO"), {}),
    ("id-other-hex", R.ID_MISMATCH, _set("id", "ab" * 32), {}),
    ("pubkey-off-curve", R.INVALID_PUBKEY, _resigned_with_pubkey(OFF_CURVE_PUBKEY), {}),
    ("pubkey-x-above-p", R.INVALID_PUBKEY, _resigned_with_pubkey("ff" * 32), {}),
    ("pubkey-of-other", R.BAD_SIGNATURE, _resigned_with_pubkey(OTHER.public_key_hex), {}),
    ("foreign-signature", R.BAD_SIGNATURE, _foreign_signature, {}),
    ("sig-zero", R.BAD_SIGNATURE, _set("sig", "00" * 64), {}),
]


@pytest.mark.parametrize(
    ("reason", "mutate", "limits"), [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED]
)
def test_malformed_event_is_rejected_with_exact_reason(
    reason: EventErrorReason, mutate: Callable[[dict[str, Any]], Any], limits: dict[str, Any]
) -> None:
    assert _reason(mutate(_signed()), **limits) is reason


def test_corpus_covers_every_event_reason() -> None:
    covered = {case[1] for case in MALFORMED}
    assert covered == set(EventErrorReason) - {R.INVALID_SECRET_KEY}


def test_reasons_are_stable_strings() -> None:
    assert str(R.BAD_SIGNATURE) == f"{R.BAD_SIGNATURE}" == "bad_signature"
    assert R.ID_MISMATCH.value == "id_mismatch"
    assert len({reason.value for reason in EventErrorReason}) == len(EventErrorReason)


def test_error_carries_reason_and_message() -> None:
    with pytest.raises(EventError) as caught:
        verify_event({}, now=NOW)
    assert caught.value.reason is R.MISSING_FIELD
    assert caught.value.message
    assert str(caught.value).startswith("missing_field: ")


def test_limits_are_inclusive() -> None:
    verify_event(_signed(tags=[["t"]] * 2000), now=NOW)
    verify_event(_signed(tags=[["t"] * 64]), now=NOW)
    verify_event(_signed(content="é" * 32768), now=NOW, max_bytes=70000)  # 65536 bytes of content
    verify_event(_signed(created_at=NOW + 900), now=NOW)
    verify_event(_signed(created_at=NOW - 3600), now=NOW, max_age=3600)
    event = _signed(content="x" * 100)
    size = len(serialize(event["pubkey"], NOW, 1, event["tags"], event["content"]))
    verify_event(event, now=NOW, max_bytes=size)
    assert _reason(event, max_bytes=size - 1) is R.EVENT_TOO_LARGE


def test_old_events_are_accepted_without_max_age() -> None:
    verify_event(_signed(created_at=0), now=NOW)


def test_verify_accepts_an_event_instance_and_still_checks_it() -> None:
    event = Event.from_dict(_set("content", "tampered")(_signed()))
    assert _reason(event) is R.ID_MISMATCH


# ------------------------------------------------------------------ properties

unicode_text = st.text(st.characters(codec="utf-8"), max_size=200)
tags_strategy = st.lists(st.lists(unicode_text, min_size=1, max_size=4), max_size=6)


@settings(max_examples=150, deadline=None)
@given(content=unicode_text, tags=tags_strategy, kind=st.integers(0, 65535), created_at=st.integers(0, NOW + 900))
def test_property_round_trip_through_json(content: str, tags: list[list[str]], kind: int, created_at: int) -> None:
    event = sign_event(SECRET, kind, tags, content, created_at=created_at)
    wire = event.to_json()
    assert verify_event(json.loads(wire), now=NOW) == event
    assert event.content == content
    assert [list(tag) for tag in event.tags] == tags


def _replace_char(text: str, index: int, char: str) -> str:
    return text[:index] + char + text[index + 1 :]


@settings(max_examples=150, deadline=None)
@given(field=st.sampled_from(["id", "sig"]), index=st.integers(0, 127), digit=st.sampled_from(HEX))
def test_property_any_hex_digit_change_of_id_or_sig_is_rejected(field: str, index: int, digit: str) -> None:
    obj = _signed()
    index %= len(obj[field])
    if obj[field][index] == digit:
        digit = HEX[(HEX.index(digit) + 1) % 16]
    obj[field] = _replace_char(obj[field], index, digit)
    expected = R.ID_MISMATCH if field == "id" else R.BAD_SIGNATURE
    assert _reason(obj) is expected


@settings(max_examples=150, deadline=None)
@given(
    field=st.sampled_from(["id", "sig", "content"]),
    index=st.integers(0, 127),
    char=st.characters(codec="utf-8"),
    content=st.text(min_size=1, max_size=50),
)
def test_property_any_single_char_mutation_is_rejected(field: str, index: int, char: str, content: str) -> None:
    obj = _signed(content=content)
    index %= len(obj[field])
    if obj[field][index] == char:
        return  # not a mutation
    obj[field] = _replace_char(obj[field], index, char)
    allowed = {
        "id": {R.ID_MISMATCH, R.INVALID_ID},
        "sig": {R.BAD_SIGNATURE, R.INVALID_SIG_FORMAT},
        "content": {R.ID_MISMATCH},
    }[field]
    assert _reason(obj) in allowed


@settings(max_examples=100, deadline=None)
@given(content=unicode_text, index=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_property_any_single_byte_flip_of_utf8_content_is_rejected(content: str, index: int, bit: int) -> None:
    obj = _signed(content=content or "x")
    raw = bytearray(obj["content"].encode("utf-8"))
    raw[index % len(raw)] ^= 1 << bit
    try:
        obj["content"] = raw.decode("utf-8")
    except UnicodeDecodeError:
        return  # not representable as a JSON string any more: nothing to verify
    assert _reason(obj) is R.ID_MISMATCH
