"""NIP-40 and the field primitives: what is accepted as well as what is refused."""

from __future__ import annotations

from decimal import Decimal

import pytest

from service.nostr import nip40
from service.nostr.protocol import CodecError, CodecErrorReason, Mode, Network
from service.nostr.protocol.errors import REASON_DESCRIPTIONS
from service.nostr.protocol.fields import (
    event_refs,
    is_bolt11,
    is_lnurl,
    is_lud16,
    is_relay_url,
    is_url,
    parse_decimal,
    parse_relay_hint,
)
from service.nostr.protocol.shards import is_nip44_payload, parse_shard_label

from .test_codec_support import BOLT11, NOW, PRIVATE_SHARD, TERMS, h, unsigned

R = CodecErrorReason


# ----------------------------------------------------------------------- NIP-40


def test_expiration_absent_is_none_and_never_expired():
    event = unsigned(1, [("t", "x")])
    assert nip40.expiration(event) is None
    assert nip40.is_expired(event, 2**62) is False


def test_expired_from_the_expiration_second_on():
    event = unsigned(1, [("expiration", str(NOW))])
    assert nip40.expiration(event) == NOW
    assert nip40.is_expired(event, NOW - 1) is False
    assert nip40.is_expired(event, NOW) is True
    assert nip40.is_expired(event, NOW + 1) is True


def test_expiration_tag_round_trip_and_refusals():
    assert nip40.expiration(unsigned(1, [nip40.expiration_tag(NOW)])) == NOW
    for bad in (-1, 2**63, "5", 1.0, True):
        with pytest.raises(CodecError) as exc:
            nip40.expiration_tag(bad)
        assert exc.value.reason is R.INVALID_EXPIRATION
    with pytest.raises(CodecError) as exc:
        nip40.expiration(unsigned(1, [("expiration", "5", "extra")]))
    assert exc.value.reason is R.INVALID_EXPIRATION


# ----------------------------------------------------------------------- shapes


@pytest.mark.parametrize("text", [BOLT11, BOLT11.upper(), "lnbc1" + "q" * 200, "lntbs10u1" + "p" * 100])
def test_bolt11_shapes_accepted(text):
    assert is_bolt11(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ln",
        "lnbc",
        "lnbc1",
        "lnbc1qqqqq",
        "LNbc1" + "q" * 50,
        "bc1" + "q" * 50,
        "lnurl1" + "q" * 50,
        "lnbc1" + "b" * 50,
        "lnbc1" + "q" * 7090,
        "lnbc1qqqqqqq\n",
    ],
)
def test_bolt11_shapes_refused(text):
    assert not is_bolt11(text)


@pytest.mark.parametrize(
    "text", ["alice@example.com", "a.b-c_d+e@sub.example.org", "x@localhost", "pay@127.0.0.1:8080", "z@host.onion"]
)
def test_lud16_accepted(text):
    assert is_lud16(text)


@pytest.mark.parametrize(
    "text",
    [
        "Alice@example.com",
        "alice@Example.com",
        "alice",
        "@x.org",
        "a@",
        "a@b@c.org",
        "a b@c.org",
        "a@c.org ",
        "ａ@c.org",
        "a" * 65 + "@c.org",
        "a@c.org:123456",
    ],
)
def test_lud16_refused(text):
    assert not is_lud16(text)


def test_lnurl_accepted_in_either_case_but_not_mixed():
    text = "lnurl1dp68gurn8ghj7um9wfmxjcm99e3k7mf0"
    assert is_lnurl(text) and is_lnurl(text.upper())
    assert not is_lnurl("LNURL1dp68gurn8ghj7um9") and not is_lnurl("lnurl1dp68") and not is_lnurl("lnurl1bbbbbbbb")


@pytest.mark.parametrize(
    "text", ["wss://relay.example.org", "ws://127.0.0.1:7777", "wss://[::1]:443/path", "wss://relay.example.org/?a=b#c"]
)
def test_relay_urls_accepted(text):
    assert is_relay_url(text) and parse_relay_hint(text, R.INVALID_RELAY, "relay") == text


@pytest.mark.parametrize(
    "text",
    [
        "https://relay.example.org",
        "wss://",
        "WSS://relay.example.org",
        "wss://relay example.org",
        "wss://rélay.example.org",
        "relay.example.org",
        "wss://" + "a" * 510,
    ],
)
def test_relay_urls_refused(text):
    assert not is_relay_url(text)
    with pytest.raises(CodecError):
        parse_relay_hint(text, R.INVALID_RELAY, "relay")


def test_empty_relay_hint_is_no_hint():
    assert parse_relay_hint("", R.INVALID_RELAY, "relay") == ""


@pytest.mark.parametrize(
    "text", ["https://x.example/a?b=c#d", "ipfs://bafy/x", "s3://bucket/key", "data:,x", "magnet:?xt=urn:btih:abc"]
)
def test_urls_accepted(text):
    assert is_url(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "x",
        "//x.example/a",
        "https://x.example/a b",
        "https://x.example/\t",
        "https://ex\u00e4mple.org",
        "HTTPS://x.example",
        "1http://x",
    ],
)
def test_urls_refused(text):
    assert not is_url(text)


@pytest.mark.parametrize(
    "text, value",
    [
        ("0", Decimal(0)),
        ("-0.5", Decimal("-0.5")),
        ("0.850", Decimal("0.85")),
        ("123456789012345678901234567890.123456789", Decimal("123456789012345678901234567890.123456789")),
    ],
)
def test_decimals_are_exact(text, value):
    parsed = parse_decimal(text, R.INVALID_THRESHOLD, "threshold")
    assert parsed == value and str(parsed) == text


def test_shard_labels():
    assert parse_shard_label("shard-0") == 0 and parse_shard_label("shard-999999") == 999_999
    assert is_nip44_payload(PRIVATE_SHARD.payload)
    assert not is_nip44_payload(PRIVATE_SHARD.payload + "=")
    assert not is_nip44_payload("#" + PRIVATE_SHARD.payload[1:])


def test_event_refs_order_and_marked_forms_agree():
    marked = event_refs(
        ((("e", h("b"), "", "job")), ("e", h("a"), "", "request")), ("request", "job"), ("request", "job")
    )
    ordered = event_refs((("e", h("a")), ("e", h("b"))), ("request", "job"), ("request", "job"))
    assert (
        {k: v.id for k, v in marked.items()}
        == {k: v.id for k, v in ordered.items()}
        == {"request": h("a"), "job": h("b")}
    )


# ----------------------------------------------------------------------- terms


def test_terms_refuse_inconsistent_configuration():
    from dataclasses import replace

    for changes in (
        {"fee_ppm": 1_000_001},
        {"min_bid_msat": 0},
        {"min_bid_msat": 10, "max_bid_msat": 5},
        {"modes": frozenset()},
        {"modes": frozenset({Mode.AUTO})},
        {"max_shards": 0},
        {"max_job_duration_s": 600},
        {"fee_base_msat": -1},
        {"fee_ppm": True},
        {"network": "regtest"},
        {"max_hold_seconds": 0},
    ):
        with pytest.raises(ValueError):
            replace(TERMS, **changes)
    assert TERMS.offers(Mode.AUTO) and TERMS.offers(Mode.HOLD)


def test_network_names():
    assert Network.from_settings("mainnet") is Network.BITCOIN
    assert Network.from_settings("regtest") is Network.REGTEST


def test_every_reason_has_a_description_and_a_distinct_value():
    assert set(REASON_DESCRIPTIONS) == set(CodecErrorReason)
    values = [r.value for r in CodecErrorReason]
    assert len(values) == len(set(values))
    assert all(v == v.lower() and " " not in v for v in values)


def test_codec_error_text():
    error = CodecError(R.INVALID_BID, "bid must be a canonical decimal integer")
    assert str(error) == error.feedback_text() == "invalid_bid: bid must be a canonical decimal integer"
    assert isinstance(error, ValueError)


def test_nip44_shape_bounds_match_the_nip44_module():
    from service.nostr import nip44
    from service.nostr.protocol import shards

    for ours, theirs in (
        ("NIP44_MIN_PAYLOAD", "MIN_PAYLOAD"),
        ("NIP44_MAX_PAYLOAD", "MAX_PAYLOAD"),
        ("NIP44_VERSION", "VERSION"),
    ):
        if hasattr(nip44, theirs):
            assert getattr(shards, ours) == getattr(nip44, theirs)
