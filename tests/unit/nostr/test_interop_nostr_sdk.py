"""Interoperability with an independent implementation: rust-nostr's Python bindings (``nostr-sdk``).

Events, NIP-44 payloads and NIP-19 strings produced by one side must be accepted,
unchanged, by the other.
"""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal

import nostr_sdk as sdk
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.nostr import nip19, nip44
from service.nostr.nip01 import EventError, EventErrorReason, SecretKey, sign_event, verify_event
from service.nostr.protocol import (
    Score,
    SealError,
    build_evaluation_result,
    open_scores,
    open_sealed,
    parse_evaluation_result,
    seal,
    sealed_model,
    unwrap_key,
    wrap_key,
)

NOW = 1_700_000_000
TRICKY = "".join(chr(code) for code in range(0x20)) + '"\\/\x7f\u2028\u2029é🎉\ufeff日本'

text = st.text(st.characters(codec="utf-8"), max_size=120)
tag_lists = st.lists(st.lists(text, min_size=1, max_size=4), max_size=5)


def _sdk_keys(secret: SecretKey) -> sdk.Keys:
    return sdk.Keys(sdk.SecretKey.parse(secret.to_hex()))


def _sdk_event(keys: sdk.Keys, kind: int, tags: list[list[str]], content: str) -> sdk.Event:
    builder = sdk.EventBuilder(sdk.Kind(kind), content)
    builder = builder.tags([sdk.Tag.parse(tag) for tag in tags])
    return builder.custom_created_at(sdk.Timestamp.from_secs(NOW)).finalize(keys)


# -------------------------------------------------------------------- NIP-01


def test_event_signed_by_nostr_sdk_verifies_with_ours() -> None:
    keys = sdk.Keys.generate()
    theirs = _sdk_event(keys, 30023, [["d", TRICKY], ["t", "x", ""], ["p", keys.public_key().to_hex()]], TRICKY)
    event = verify_event(json.loads(theirs.as_json()), now=NOW)
    assert event.id == theirs.id().to_hex()
    assert event.pubkey == keys.public_key().to_hex()
    assert event.content == TRICKY
    assert event.tags[0] == ("d", TRICKY)


def test_event_signed_by_us_verifies_with_nostr_sdk() -> None:
    ours = sign_event(
        SecretKey.generate(), 1, [["t", TRICKY], ["e", "ab" * 32, "wss://r.example"]], TRICKY, created_at=NOW
    )
    theirs = sdk.Event.from_json(ours.to_json())
    assert theirs.verify()
    assert theirs.id().to_hex() == ours.id
    assert theirs.content() == TRICKY


def test_nostr_sdk_rejects_our_event_once_tampered() -> None:
    # Guards the test above: nostr-sdk's verify() really checks what we send it.
    obj = sign_event(SecretKey.generate(), 1, [], "original", created_at=NOW).to_dict()
    obj["content"] = "tampered"
    assert not sdk.Event.from_json(json.dumps(obj)).verify()


def test_we_reject_a_nostr_sdk_event_once_tampered() -> None:
    obj = json.loads(_sdk_event(sdk.Keys.generate(), 1, [], "original").as_json())
    obj["content"] = "tampered"
    with pytest.raises(EventError) as caught:
        verify_event(obj, now=NOW)
    assert caught.value.reason is EventErrorReason.ID_MISMATCH


@settings(max_examples=60, deadline=None)
@given(content=text, tags=tag_lists, kind=st.integers(0, 65535))
def test_property_nostr_sdk_events_verify_with_ours(content: str, tags: list[list[str]], kind: int) -> None:
    keys = sdk.Keys.generate()
    theirs = _sdk_event(keys, kind, tags, content)
    event = verify_event(json.loads(theirs.as_json()), now=NOW)
    assert event.id == theirs.id().to_hex()
    assert event.content == content


@settings(max_examples=60, deadline=None)
@given(content=text, tags=tag_lists, kind=st.integers(0, 65535))
def test_property_our_events_verify_with_nostr_sdk(content: str, tags: list[list[str]], kind: int) -> None:
    ours = sign_event(SecretKey.generate(), kind, tags, content, created_at=NOW)
    theirs = sdk.Event.from_json(ours.to_json())
    assert theirs.verify()
    assert theirs.id().to_hex() == ours.id


def test_same_key_gives_same_public_key() -> None:
    ours = SecretKey.generate()
    assert _sdk_keys(ours).public_key().to_hex() == ours.public_key_hex


# -------------------------------------------------------------------- NIP-44


def test_nip44_nostr_sdk_to_us() -> None:
    alice, bob = SecretKey.generate(), SecretKey.generate()
    payload = sdk.nip44_encrypt(
        sdk.SecretKey.parse(alice.to_hex()), sdk.PublicKey.parse(bob.public_key_hex), TRICKY, sdk.Nip44Version.V2
    )
    assert nip44.decrypt(payload, nip44.conversation_key(bob.secret_bytes, alice.public_key_hex)) == TRICKY


def test_nip44_us_to_nostr_sdk() -> None:
    alice, bob = SecretKey.generate(), SecretKey.generate()
    payload = nip44.encrypt(TRICKY, nip44.conversation_key(alice.secret_bytes, bob.public_key_hex))
    plaintext = sdk.nip44_decrypt(sdk.SecretKey.parse(bob.to_hex()), sdk.PublicKey.parse(alice.public_key_hex), payload)
    assert plaintext == TRICKY


@settings(max_examples=40, deadline=None)
@given(plaintext=st.text(st.characters(codec="utf-8"), min_size=1, max_size=400))
def test_property_nip44_both_directions(plaintext: str) -> None:
    alice, bob = SecretKey.generate(), SecretKey.generate()
    alice_sdk, bob_pub_sdk = sdk.SecretKey.parse(alice.to_hex()), sdk.PublicKey.parse(bob.public_key_hex)
    key = nip44.conversation_key(bob.secret_bytes, alice.public_key_hex)
    assert nip44.decrypt(sdk.nip44_encrypt(alice_sdk, bob_pub_sdk, plaintext, sdk.Nip44Version.V2), key) == plaintext
    ours = nip44.encrypt(plaintext, key)
    assert sdk.nip44_decrypt(alice_sdk, bob_pub_sdk, ours) == plaintext


def test_nip44_largest_plaintext_both_ways() -> None:
    alice, bob = SecretKey.generate(), SecretKey.generate()
    plaintext = "z" * nip44.MAX_PLAINTEXT
    key = nip44.conversation_key(alice.secret_bytes, bob.public_key_hex)
    assert (
        sdk.nip44_decrypt(
            sdk.SecretKey.parse(bob.to_hex()), sdk.PublicKey.parse(alice.public_key_hex), nip44.encrypt(plaintext, key)
        )
        == plaintext
    )


# -------------------------------------------------------------------- NIP-19


@settings(max_examples=30, deadline=None)
@given(secret=st.integers(1, nip44.CURVE_ORDER - 1))
def test_property_npub_nsec_note_agree_with_nostr_sdk(secret: int) -> None:
    keys = sdk.Keys(sdk.SecretKey.from_bytes(secret.to_bytes(32, "big")))
    secret_hex, public_hex = keys.secret_key().to_hex(), keys.public_key().to_hex()
    assert nip19.encode_nsec(secret_hex) == keys.secret_key().to_bech32()
    assert nip19.decode_nsec(keys.secret_key().to_bech32()) == secret_hex
    assert nip19.encode_npub(public_hex) == keys.public_key().to_bech32()
    assert nip19.decode_npub(keys.public_key().to_bech32()) == public_hex
    assert sdk.PublicKey.parse(nip19.encode_npub(public_hex)).to_hex() == public_hex
    event_id = sdk.EventId.parse(sign_event(SecretKey.generate(), 1, [], "x", created_at=NOW).id)
    assert nip19.encode_note(event_id.to_hex()) == event_id.to_bech32()
    assert nip19.decode_note(event_id.to_bech32()) == event_id.to_hex()


def test_nprofile_and_nevent_from_nostr_sdk() -> None:
    keys = sdk.Keys.generate()
    relay = sdk.RelayUrl.parse("wss://relay.example.com")
    profile = sdk.Nip19Profile(keys.public_key(), [relay]).to_bech32()
    decoded = nip19.decode_nprofile(profile)
    assert decoded.pubkey == keys.public_key().to_hex()
    assert len(decoded.relays) == 1 and decoded.relays[0].startswith("wss://relay.example.com")

    event_id = sdk.EventId.parse("ab" * 32)
    nevent = sdk.Nip19Event(event_id, keys.public_key(), sdk.Kind(30023), [relay]).to_bech32()
    pointer = nip19.decode_nevent(nevent)
    assert (pointer.id, pointer.author, pointer.kind) == ("ab" * 32, keys.public_key().to_hex(), 30023)


def test_nprofile_and_nevent_to_nostr_sdk() -> None:
    public_hex = SecretKey.generate().public_key_hex
    profile = sdk.Nip19Profile.from_bech32(
        nip19.encode_nprofile(nip19.ProfilePointer(public_hex, ("wss://relay.example.com",)))
    )
    assert profile.public_key().to_hex() == public_hex
    assert [str(url) for url in profile.relays()][0].startswith("wss://relay.example.com")
    nevent = sdk.Nip19Event.from_bech32(
        nip19.encode_nevent(nip19.EventPointer("cd" * 32, (), author=public_hex, kind=7))
    )
    assert nevent.event_id().to_hex() == "cd" * 32
    author = nevent.author()
    kind = nevent.kind()
    assert author is not None and author.to_hex() == public_hex
    assert kind is not None and kind.as_u16() == 7


# ------------------------------------------------ sealed results and scores (protocol.md §5a, §6)


def _sdk_encrypt(sender: SecretKey, recipient: SecretKey, plaintext: str) -> str:
    return sdk.nip44_encrypt(
        sdk.SecretKey.parse(sender.to_hex()),
        sdk.PublicKey.parse(recipient.public_key_hex),
        plaintext,
        sdk.Nip44Version.V2,
    )


def _sdk_decrypt(recipient: SecretKey, sender: SecretKey, payload: str) -> str:
    return sdk.nip44_decrypt(
        sdk.SecretKey.parse(recipient.to_hex()), sdk.PublicKey.parse(sender.public_key_hex), payload
    )


@settings(max_examples=20, deadline=None)
@given(model=st.binary(min_size=1, max_size=2048))
def test_content_key_wrapped_by_nostr_sdk_opens_with_unwrap_key(model: bytes) -> None:
    provider, escrow = SecretKey.generate(), SecretKey.generate()
    sealed = seal(model)
    payload = _sdk_encrypt(provider, escrow, sealed.key.hex())  # what another provider implementation sends
    content_key = unwrap_key(escrow, provider.public_key_hex, payload, sealed.key_sha256)
    assert content_key == sealed.key
    committed = sealed_model(provider, sealed, url="https://blobs.example.org/c", recipients=(escrow.public_key_hex,))
    assert open_sealed(sealed.ciphertext, content_key, committed) == model


def test_content_key_wrapped_by_nostr_sdk_for_another_key_is_refused() -> None:
    provider, escrow = SecretKey.generate(), SecretKey.generate()
    sealed = seal(b"model")
    other = _sdk_encrypt(provider, escrow, hashlib.sha256(b"another key").hexdigest())
    with pytest.raises(SealError) as caught:
        unwrap_key(escrow, provider.public_key_hex, other, sealed.key_sha256)
    assert caught.value.reason == "wrong_key"


@settings(max_examples=20, deadline=None)
@given(content_key=st.binary(min_size=32, max_size=32))
def test_wrap_key_decrypts_with_nostr_sdk(content_key: bytes) -> None:
    provider, validator = SecretKey.generate(), SecretKey.generate()
    envelope = wrap_key(provider, validator.public_key_hex, content_key)
    assert envelope.recipient == validator.public_key_hex
    assert _sdk_decrypt(validator, provider, envelope.payload) == content_key.hex()


SCORE_TAGS = [
    ["score", "ab" * 32, "0.9125", "cd" * 32],
    ["score", "ef" * 32, "unreadable", "01" * 32],
    ["score", "23" * 32, "-1.5", "45" * 32],
]
SCORES = (
    Score("ab" * 32, Decimal("0.9125"), "cd" * 32),
    Score("ef" * 32, None, "01" * 32),
    Score("23" * 32, Decimal("-1.5"), "45" * 32),
)


def test_sealed_scores_from_nostr_sdk_open_with_open_scores() -> None:
    validator, escrow = SecretKey.generate(), SecretKey.generate()
    content = _sdk_encrypt(validator, escrow, json.dumps(SCORE_TAGS))  # any JSON spacing is a JSON list
    tags = [
        ["e", "11" * 32, "", "request"],
        ["e", "22" * 32, "", "job"],
        ["p", escrow.public_key_hex],
        ["encrypted"],
    ]
    theirs = _sdk_event(_sdk_keys(validator), 6702, tags, content)
    event = verify_event(json.loads(theirs.as_json()), now=NOW)
    parsed = parse_evaluation_result(event, escrow_pubkey=escrow.public_key_hex)
    assert parsed.sealed and parsed.scores == ()
    assert open_scores(parsed, escrow).scores == SCORES


def test_sealed_scores_we_build_decrypt_with_nostr_sdk() -> None:
    validator, escrow = SecretKey.generate(), SecretKey.generate()
    tmpl = build_evaluation_result(
        request_id="11" * 32, job_id="22" * 32, escrow=escrow.public_key_hex, scores=SCORES, seal_with=validator
    )
    ours = sign_event(validator, tmpl.kind, tmpl.tags, tmpl.content, created_at=NOW)
    theirs = sdk.Event.from_json(ours.to_json())
    assert theirs.verify()
    assert json.loads(_sdk_decrypt(escrow, validator, theirs.content())) == SCORE_TAGS
