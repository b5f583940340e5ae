"""NIP-19: bech32 npub/nsec/note and nprofile/nevent."""

from __future__ import annotations

import bech32
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.nostr.nip19 import (
    EventPointer,
    Nip19Error,
    Nip19ErrorReason,
    ProfilePointer,
    decode_bech32,
    decode_nevent,
    decode_note,
    decode_nprofile,
    decode_npub,
    decode_nsec,
    encode_bech32,
    encode_nevent,
    encode_note,
    encode_nprofile,
    encode_npub,
    encode_nsec,
    pubkey_from_text,
)

R = Nip19ErrorReason

# Examples given in NIP-19 (19.md).
SPEC_NPUB = "npub10elfcs4fr0l0r8af98jlmgdh9c8tcxjvz9qkw038js35mp4dma8qzvjptg"
SPEC_NPUB_HEX = "7e7e9c42a91bfef19fa929e5fda1b72e0ebc1a4c1141673e2794234d86addf4e"
SPEC_NSEC = "nsec1vl029mgpspedva04g90vltkh6fvh240zqtv9k0t9af8935ke9laqsnlfe5"
SPEC_NSEC_HEX = "67dea2ed018072d675f5415ecfaed7d2597555e202d85b3d65ea4e58d2d92ffa"
SPEC_NPUB_2 = "npub180cvv07tjdrrgpa0j7j7tmnyl2yr6yr7l8j4s3evf6u64th6gkwsyjh6w6"
SPEC_NPUB_2_HEX = "3bf0c63fcb93463407af97a5e5ee64fa883d107ef9e558472c4eb9aaaefa459d"
SPEC_NPROFILE = (
    "nprofile1qqsrhuxx8l9ex335q7he0f09aej04zpazpl0ne2cgukyawd24mayt8gpp4mhxue69uhhytnc9e3k7mgpz4mhxu"
    "e69uhkg6nzv9ejuumpv34kytnrdaksjlyr9p"
)

BECH32M_CONST = 0x2BC830A3


def _error(call, *args) -> Nip19ErrorReason:  # type: ignore[no-untyped-def]
    with pytest.raises(Nip19Error) as caught:
        call(*args)
    return caught.value.reason


def _words(data: bytes) -> list[int]:
    words = bech32.convertbits(data, 8, 5, True)
    assert words is not None
    return words


def _bech32m(hrp: str, words: list[int]) -> str:
    polymod = bech32.bech32_polymod(bech32.bech32_hrp_expand(hrp) + words + [0] * 6) ^ BECH32M_CONST
    checksum = [(polymod >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(bech32.CHARSET[w] for w in words + checksum)


# -------------------------------------------------------------- spec examples


def test_spec_npub_example_both_ways() -> None:
    assert decode_npub(SPEC_NPUB) == SPEC_NPUB_HEX
    assert encode_npub(SPEC_NPUB_HEX) == SPEC_NPUB
    assert decode_npub(SPEC_NPUB_2) == SPEC_NPUB_2_HEX
    assert encode_npub(SPEC_NPUB_2_HEX) == SPEC_NPUB_2


def test_spec_nsec_example_both_ways() -> None:
    assert decode_nsec(SPEC_NSEC) == SPEC_NSEC_HEX
    assert encode_nsec(SPEC_NSEC_HEX) == SPEC_NSEC


def test_spec_nprofile_example() -> None:
    assert decode_nprofile(SPEC_NPROFILE) == ProfilePointer(
        pubkey=SPEC_NPUB_2_HEX, relays=("wss://r.x.com", "wss://djbas.sadkb.com")
    )


def test_all_uppercase_is_accepted() -> None:
    assert decode_npub(SPEC_NPUB.upper()) == SPEC_NPUB_HEX


def test_encoding_accepts_uppercase_hex_and_outputs_lowercase() -> None:
    assert encode_npub(SPEC_NPUB_HEX.upper()) == SPEC_NPUB


# ------------------------------------------------------------------ round trips

hex32 = st.binary(min_size=32, max_size=32).map(bytes.hex)
relays = st.lists(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40), max_size=3)


@given(value=hex32)
def test_property_bare_entities_round_trip(value: str) -> None:
    assert decode_npub(encode_npub(value)) == value
    assert decode_nsec(encode_nsec(value)) == value
    assert decode_note(encode_note(value)) == value
    assert encode_npub(value).startswith("npub1")
    assert encode_nsec(value).startswith("nsec1")
    assert encode_note(value).startswith("note1")


@given(pubkey=hex32, relay_list=relays)
def test_property_nprofile_round_trip(pubkey: str, relay_list: list[str]) -> None:
    pointer = ProfilePointer(pubkey=pubkey, relays=tuple(relay_list))
    assert decode_nprofile(encode_nprofile(pointer)) == pointer


@given(event_id=hex32, relay_list=relays, author=st.none() | hex32, kind=st.none() | st.integers(0, 2**32 - 1))
def test_property_nevent_round_trip(event_id: str, relay_list: list[str], author: str | None, kind: int | None) -> None:
    pointer = EventPointer(id=event_id, relays=tuple(relay_list), author=author, kind=kind)
    assert decode_nevent(encode_nevent(pointer)) == pointer


@settings(max_examples=200)
@given(value=hex32, index=st.integers(5, 62), shift=st.integers(1, 31))
def test_property_any_substitution_in_data_is_a_checksum_error(value: str, index: int, shift: int) -> None:
    text = encode_npub(value)
    replaced = bech32.CHARSET[(bech32.CHARSET.index(text[index]) + shift) % 32]
    assert _error(decode_npub, text[:index] + replaced + text[index + 1 :]) is R.BAD_CHECKSUM


@settings(max_examples=200)
@given(value=hex32, index=st.integers(0, 62), char=st.characters(codec="utf-8"))
def test_property_any_single_char_change_is_rejected(value: str, index: int, char: str) -> None:
    text = encode_npub(value)
    if text[index] == char.lower():
        return  # unchanged (or only recased, which a later test covers)
    with pytest.raises(Nip19Error):
        decode_npub(text[:index] + char + text[index + 1 :])


# ----------------------------------------------------------------------- errors


def test_wrong_prefix() -> None:
    assert _error(decode_npub, SPEC_NSEC) is R.WRONG_PREFIX
    assert _error(decode_nsec, SPEC_NPUB) is R.WRONG_PREFIX
    assert _error(decode_note, SPEC_NPUB) is R.WRONG_PREFIX
    assert _error(decode_nevent, SPEC_NPROFILE) is R.WRONG_PREFIX


def test_wrong_prefix_message_does_not_echo_the_secret() -> None:
    with pytest.raises(Nip19Error) as caught:
        decode_npub(SPEC_NSEC)
    assert SPEC_NSEC[5:] not in str(caught.value)
    assert SPEC_NSEC_HEX not in str(caught.value)


def test_bad_checksum() -> None:
    last = SPEC_NPUB[-1]
    other = "q" if last != "q" else "p"
    assert _error(decode_npub, SPEC_NPUB[:-1] + other) is R.BAD_CHECKSUM


def test_bech32m_is_rejected_as_bad_checksum() -> None:
    text = _bech32m("npub", _words(bytes.fromhex(SPEC_NPUB_HEX)))
    assert text != SPEC_NPUB
    assert _error(decode_npub, text) is R.BAD_CHECKSUM


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_wrong_data_length_on_decode(length: int) -> None:
    text = encode_bech32("npub", bytes(range(length)))
    assert decode_bech32(text) == ("npub", bytes(range(length)))
    assert _error(decode_npub, text) is R.WRONG_DATA_LENGTH


@pytest.mark.parametrize("value", ["ab" * 31, "ab" * 33, ""])
def test_wrong_data_length_on_encode(value: str) -> None:
    assert _error(encode_npub, value) is R.WRONG_DATA_LENGTH


@pytest.mark.parametrize("value", ["zz" * 32, "a" * 63, "ab " * 32, 5])
def test_invalid_hex_on_encode(value: object) -> None:
    assert _error(encode_npub, value) is R.INVALID_HEX


def test_mixed_case() -> None:
    assert _error(decode_npub, "N" + SPEC_NPUB[1:]) is R.MIXED_CASE
    assert _error(decode_npub, SPEC_NPUB[:-1] + SPEC_NPUB[-1].upper()) is R.MIXED_CASE


@pytest.mark.parametrize(
    "text",
    [
        SPEC_NPUB[:10] + "b" + SPEC_NPUB[11:],  # 'b' is not in the bech32 alphabet
        SPEC_NPUB[:10] + "i" + SPEC_NPUB[11:],
        SPEC_NPUB[:10] + "é" + SPEC_NPUB[11:],
        SPEC_NPUB[:10] + " " + SPEC_NPUB[11:],
    ],
    ids=["b", "i", "non-ascii", "space"],
)
def test_invalid_character(text: str) -> None:
    assert _error(decode_npub, text) is R.INVALID_CHARACTER


@pytest.mark.parametrize(
    "text",
    ["npubqqqqqqqq", "1qqqqqqqqq", "npub1qqqqq", "", b"npub1qqqqqqqq"],
    ids=["no-separator", "empty-prefix", "short-checksum", "empty", "bytes"],
)
def test_malformed(text: object) -> None:
    assert _error(decode_npub, text) is R.MALFORMED


def test_too_long() -> None:
    assert _error(decode_bech32, "a1" + "q" * 4999) is R.TOO_LONG
    assert _error(encode_bech32, "nprofile", bytes(4000)) is R.TOO_LONG


def test_non_zero_padding_bits_are_rejected() -> None:
    words = _words(bytes.fromhex(SPEC_NPUB_HEX))  # 256 bits -> 52 words, last has 4 padding bits
    words[-1] |= 1
    text = bech32.bech32_encode("npub", words)  # valid checksum over the bad padding
    assert _error(decode_npub, text) is R.INVALID_PADDING


def test_excess_padding_is_rejected() -> None:
    # 6 words = 30 bits = 3 bytes + 6 bits: a padding of 5 bits or more is never produced.
    assert _error(decode_bech32, bech32.bech32_encode("npub", [0] * 6)) is R.INVALID_PADDING
    assert decode_bech32(bech32.bech32_encode("npub", [0] * 7)) == ("npub", bytes(4))  # 35 bits: 3 spare


def test_encode_rejects_bad_prefix() -> None:
    assert _error(encode_bech32, "NPUB", bytes(32)) is R.MALFORMED
    assert _error(encode_bech32, "", bytes(32)) is R.MALFORMED


# -------------------------------------------------------------------------- TLV


def _tlv(*items: tuple[int, bytes]) -> bytes:
    return b"".join(bytes((kind, len(value))) + value for kind, value in items)


def test_unknown_tlv_types_are_ignored() -> None:
    data = _tlv((9, b"future"), (0, bytes.fromhex(SPEC_NPUB_2_HEX)), (1, b"wss://a"))
    assert decode_nprofile(encode_bech32("nprofile", data)) == ProfilePointer(SPEC_NPUB_2_HEX, ("wss://a",))


def test_nevent_optional_fields() -> None:
    data = _tlv((0, bytes(32)), (2, bytes.fromhex(SPEC_NPUB_2_HEX)), (3, (30023).to_bytes(4, "big")))
    assert decode_nevent(encode_bech32("nevent", data)) == EventPointer(
        id="00" * 32, relays=(), author=SPEC_NPUB_2_HEX, kind=30023
    )
    assert decode_nevent(encode_bech32("nevent", _tlv((0, bytes(32))))) == EventPointer(id="00" * 32)


@pytest.mark.parametrize(
    ("hrp", "data"),
    [
        ("nprofile", _tlv((1, b"wss://a"))),  # no special entry
        ("nprofile", _tlv((0, bytes(31)))),  # special of the wrong size
        ("nprofile", _tlv((0, bytes(32))) + b"\x01\x05ab"),  # truncated value
        ("nprofile", _tlv((0, bytes(32))) + b"\x01"),  # truncated header
        ("nprofile", _tlv((0, bytes(32)), (1, b"\xff"))),  # non-ASCII relay
        ("nevent", _tlv((0, bytes(32)), (2, bytes(31)))),  # author of the wrong size
        ("nevent", _tlv((0, bytes(32)), (3, bytes(2)))),  # kind not 4 bytes
    ],
    ids=[
        "no-special",
        "short-special",
        "truncated-value",
        "truncated-header",
        "non-ascii-relay",
        "short-author",
        "short-kind",
    ],
)
def test_invalid_tlv(hrp: str, data: bytes) -> None:
    decoder = decode_nprofile if hrp == "nprofile" else decode_nevent
    assert _error(decoder, encode_bech32(hrp, data)) is R.INVALID_TLV


def test_encode_rejects_bad_pointer_values() -> None:
    assert _error(encode_nprofile, ProfilePointer(SPEC_NPUB_HEX, ("wss://é",))) is R.INVALID_TLV
    assert _error(encode_nprofile, ProfilePointer(SPEC_NPUB_HEX, ("w" * 256,))) is R.INVALID_TLV
    assert _error(encode_nevent, EventPointer(SPEC_NPUB_HEX, kind=2**32)) is R.INVALID_TLV
    assert _error(encode_nevent, EventPointer(SPEC_NPUB_HEX, kind=-1)) is R.INVALID_TLV


def test_a_public_key_as_people_write_it() -> None:
    hex_key = "7e7e9c42a91bfef19fa929e5fda1b72e0ebc1a4c1141673e2794234d86addf4e"
    npub = encode_npub(hex_key)
    assert pubkey_from_text(hex_key) == pubkey_from_text(f"  {npub}\n") == hex_key
    for bad in (hex_key.upper(), hex_key[:-1], "", "npub1" + npub[5:-1] + "q"):
        with pytest.raises(Nip19Error):
            pubkey_from_text(bad)
