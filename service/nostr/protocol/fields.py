"""Field and tag primitives shared by every kind: strict parsers and checked formatters.

Each parser takes the text of one tag item and the reason to raise, so one fault
maps to one specific :class:`~.errors.CodecErrorReason`. Each formatter checks
the value it formats, so a build function cannot write what the parse functions
would refuse. Only ASCII digits count as digits (``str.isdigit`` and ``int()``
accept other scripts, ``_`` separators and signs; they are never used on input).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from decimal import Decimal, InvalidOperation
from typing import NamedTuple

from service.bitcoin import MAX_MSAT
from service.nostr.nip01 import Event

from .errors import CodecError, CodecErrorReason

R = CodecErrorReason

Tag = tuple[str, ...]
Tags = tuple[Tag, ...]

# As nip01's created_at bound: a signed 64-bit integer (database BIGINT).
MAX_TIMESTAMP = 2**63 - 1
MAX_URL = 2048
MAX_RELAY_URL = 512
MAX_BOLT11 = 7089
MAX_LNURL = 2048
MAX_DECIMAL_CHARS = 64
# Scores and thresholds (the numbers a decision compares) are bounded so that every median
# of them is exact and short: at most 15 digits before the point and 12 after. The median of
# two such values needs one place more (13), never more digits before the point.
SCORE_INT_DIGITS = 15
SCORE_PLACES = 12
MEDIAN_PLACES = SCORE_PLACES + 1

_HEX64 = re.compile(r"[0-9a-f]{64}")
_UINT = re.compile(r"0|[1-9][0-9]*")
_DECIMAL = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?")
# A URL of any scheme, printable ASCII only (no spaces, no controls, no Unicode look-alikes).
_URL = re.compile(r"[a-z][a-z0-9+.\-]*:[\x21-\x7e]+")
_WS_URL = re.compile(r"wss?://[A-Za-z0-9.\-_~\[\]:%]+(?:[/?#][\x21-\x7e]*)?")
_LUD16 = re.compile(r"[a-z0-9\-_.+]{1,64}@(?:[a-z0-9\-]{1,63}\.)*[a-z0-9\-]{1,63}(?::[0-9]{1,5})?")
_BECH32_DATA = "[02-9ac-hj-np-z]"
_LNURL = re.compile(rf"lnurl1{_BECH32_DATA}{{6,}}")
_BOLT11 = re.compile(rf"ln[a-z0-9]*1{_BECH32_DATA}{{6,}}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class Template(NamedTuple):
    """An unsigned event: ``sign_event(secret, *template, created_at=...)`` signs it."""

    kind: int
    tags: Tags
    content: str


def template(kind: int, tags: Iterable[Sequence[str]], content: str = "") -> Template:
    return Template(kind, tuple(tuple(tag) for tag in tags), content)


def placeholder_event(tmpl: Template) -> Event:
    """An unsigned stand-in around a template, so a builder can run its parser over what it wrote."""
    return Event(
        id="0" * 64, pubkey="0" * 64, created_at=0, kind=tmpl.kind, tags=tmpl.tags, content=tmpl.content, sig="0" * 128
    )


# ------------------------------------------------------------------------------ tags


def expect_kind(event: Event, kind: int) -> None:
    if event.kind != kind:
        raise CodecError(R.WRONG_KIND, f"expected kind {kind}, got {event.kind}")


def named(tags: Tags, name: str) -> list[Tag]:
    return [tag for tag in tags if tag[0] == name]


def single(tags: Tags, name: str, missing: CodecErrorReason | None = None) -> Tag | None:
    """The one tag called ``name``; ``missing`` (if given) is raised when there is none."""
    found = named(tags, name)
    if len(found) > 1:
        raise CodecError(R.DUPLICATE_TAG, f"more than one {name!r} tag")
    if not found:
        if missing is not None:
            raise CodecError(missing, f"no {name!r} tag")
        return None
    return found[0]


def check_singles(tags: Tags, names: Iterable[str]) -> None:
    for name in names:
        single(tags, name)


def arity(tag: Tag, low: int, high: int, reason: CodecErrorReason) -> None:
    if not low <= len(tag) <= high:
        shape = f"{low}" if low == high else f"{low}..{high}"
        raise CodecError(reason, f"{tag[0]!r} tag must have {shape} items, has {len(tag)}")


# ---------------------------------------------------------------------------- values


def parse_uint(text: str, reason: CodecErrorReason, what: str, maximum: int) -> int:
    """A canonical non-negative decimal integer: ASCII digits, no sign, no leading zero."""
    if len(text) > len(str(maximum)) or _UINT.fullmatch(text) is None:
        raise CodecError(reason, f"{what} must be a canonical decimal integer")
    value = int(text)
    if value > maximum:
        raise CodecError(reason, f"{what} must be at most {maximum}")
    return value


def format_uint(value: object, reason: CodecErrorReason, what: str, maximum: int) -> str:
    if type(value) is not int or not 0 <= value <= maximum:
        raise CodecError(reason, f"{what} must be an integer in 0..{maximum}")
    return str(value)


def parse_msat(text: str, reason: CodecErrorReason, what: str) -> int:
    return parse_uint(text, reason, what, MAX_MSAT)


def format_msat(value: object, reason: CodecErrorReason, what: str) -> str:
    return format_uint(value, reason, what, MAX_MSAT)


def parse_timestamp(text: str, reason: CodecErrorReason, what: str) -> int:
    return parse_uint(text, reason, what, MAX_TIMESTAMP)


def format_timestamp(value: object, reason: CodecErrorReason, what: str) -> str:
    return format_uint(value, reason, what, MAX_TIMESTAMP)


def is_hex64(text: object) -> bool:
    return type(text) is str and _HEX64.fullmatch(text) is not None


def parse_hex64(text: str, reason: CodecErrorReason, what: str) -> str:
    if not is_hex64(text):
        raise CodecError(reason, f"{what} must be 64 lowercase hex characters")
    return text


def parse_decimal(text: str, reason: CodecErrorReason, what: str) -> Decimal:
    """A plain finite decimal: ``-?(0|[1-9][0-9]*)(\\.[0-9]+)?``, no exponent, at most 64 chars."""
    if len(text) > MAX_DECIMAL_CHARS or _DECIMAL.fullmatch(text) is None:
        raise CodecError(
            reason, f"{what} must be a plain decimal such as 0.85 (at most {MAX_DECIMAL_CHARS} characters)"
        )
    return Decimal(text)


def check_bounded(value: Decimal, reason: CodecErrorReason, what: str, places: int = SCORE_PLACES) -> Decimal:
    """``value`` (a parsed plain decimal) has at most :data:`SCORE_INT_DIGITS` digits before the
    point and ``places`` after it; else ``reason``."""
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite: parse_decimal refuses NaN and Infinity
    fraction = max(0, -exponent)
    integer = max(0, len(digits) + exponent) if digits != (0,) else 0
    if fraction > places or integer > SCORE_INT_DIGITS:
        raise CodecError(
            reason, f"{what} must have at most {SCORE_INT_DIGITS} digits before the point and {places} after it"
        )
    return value


def parse_bounded_decimal(
    text: str, reason: CodecErrorReason, what: str, *, shape: CodecErrorReason | None = None, places: int = SCORE_PLACES
) -> Decimal:
    """A plain decimal (``shape`` reason when it is not one) within the score bounds (``reason``)."""
    return check_bounded(parse_decimal(text, shape or reason, what), reason, what, places)


def format_decimal(value: object, reason: CodecErrorReason, what: str) -> str:
    """The plain (no exponent) text of a finite ``Decimal`` (or ``int``), checked like the parser."""
    if type(value) is int:
        value = Decimal(value)
    if not isinstance(value, Decimal) or not value.is_finite():
        raise CodecError(reason, f"{what} must be a finite Decimal")
    try:
        text = format(value, "f")
    except (InvalidOperation, ValueError):  # pragma: no cover - finite decimals always format
        raise CodecError(reason, f"{what} cannot be written as a plain decimal") from None
    parse_decimal(text, reason, what)
    return text


def is_url(text: str) -> bool:
    return len(text) <= MAX_URL and _URL.fullmatch(text) is not None


def is_relay_url(text: str) -> bool:
    return len(text) <= MAX_RELAY_URL and _WS_URL.fullmatch(text) is not None


def parse_relay_hint(text: str, reason: CodecErrorReason, what: str) -> str:
    """``""`` (no hint) or a ws:// / wss:// URL."""
    if text != "" and not is_relay_url(text):
        raise CodecError(reason, f"{what} must be empty or a ws:// or wss:// URL")
    return text


def is_lud16(text: str) -> bool:
    return len(text) <= 320 and _LUD16.fullmatch(text) is not None


def is_lnurl(text: str) -> bool:
    """Bech32 ``lnurl1…`` in one case (LUD-01); the checksum is checked by whoever resolves it."""
    if len(text) > MAX_LNURL:
        return False
    lowered = text.lower()
    if text not in (lowered, text.upper()):
        return False
    return _LNURL.fullmatch(lowered) is not None


def is_bolt11(text: str) -> bool:
    """The shape of a BOLT11 invoice (``ln…1<bech32 data>``, one case); never decoded here."""
    if len(text) > MAX_BOLT11:
        return False
    lowered = text.lower()
    if text not in (lowered, text.upper()) or lowered.startswith("lnurl"):
        return False
    return _BOLT11.fullmatch(lowered) is not None


def has_control(text: str) -> bool:
    """C0/C1 controls, DEL and the Unicode line/paragraph separators."""
    return _CONTROL.search(text) is not None


def check_text(text: object, reason: CodecErrorReason, what: str, max_len: int, *, empty: bool = False) -> str:
    if type(text) is not str or len(text) > max_len or (not empty and not text) or has_control(text):
        raise CodecError(
            reason,
            f"{what} must be {'' if empty else 'non-empty '}text of at most "
            f"{max_len} characters without control characters",
        )
    return text


# -------------------------------------------------------------------- references


def parse_pubkey_ref(tag: Tag, reason: CodecErrorReason = R.INVALID_PUBKEY_REF) -> tuple[str, str]:
    """``["p", <pubkey hex>]`` or ``["p", <pubkey hex>, <relay hint>]`` → (pubkey, relay)."""
    arity(tag, 2, 3, reason)
    pubkey = parse_hex64(tag[1], reason, f"{tag[0]!r} pubkey")
    relay = parse_relay_hint(tag[2], reason, f"{tag[0]!r} relay hint") if len(tag) == 3 else ""
    return pubkey, relay


def single_pubkey_ref(tags: Tags) -> tuple[str, str]:
    tag = single(tags, "p", R.MISSING_PUBKEY_REF)
    assert tag is not None
    return parse_pubkey_ref(tag)


def pubkey_tag(pubkey: str, relay: str = "", reason: CodecErrorReason = R.INVALID_PUBKEY_REF, name: str = "p") -> Tag:
    parse_hex64(pubkey, reason, f"{name!r} pubkey")
    if type(relay) is not str:
        raise CodecError(reason, "relay hint must be a string")
    parse_relay_hint(relay, reason, f"{name!r} relay hint")
    return (name, pubkey, relay) if relay else (name, pubkey)


class EventRef(NamedTuple):
    id: str
    relay: str


def event_refs(tags: Tags, roles: Sequence[str], required: Sequence[str]) -> dict[str, EventRef]:
    """Read the ``e`` tags of an event that references events in the given ``roles``.

    Two forms are accepted, never mixed: *marked*, ``["e", <id>, <relay-or-"">, <role>]``
    (the NIP-10 marker position), in any order; or *unmarked*, ``["e", <id>]`` /
    ``["e", <id>, <relay>]``, whose roles are taken in the order of ``roles``.
    """
    found = named(tags, "e")
    parsed: list[tuple[str, str, str | None]] = []
    for tag in found:
        arity(tag, 2, 4, R.INVALID_EVENT_REF)
        event_id = parse_hex64(tag[1], R.INVALID_EVENT_REF, "'e' event id")
        relay = parse_relay_hint(tag[2], R.INVALID_EVENT_REF, "'e' relay hint") if len(tag) >= 3 else ""
        marker = tag[3] if len(tag) == 4 else None
        if marker is not None and marker not in roles:
            raise CodecError(R.INVALID_EVENT_REF, f"'e' marker must be one of {', '.join(roles)}")
        parsed.append((event_id, relay, marker))
    markers = [marker for _, _, marker in parsed]
    result: dict[str, EventRef] = {}
    if any(marker is not None for marker in markers):
        if any(marker is None for marker in markers):
            raise CodecError(R.AMBIGUOUS_EVENT_REFS, "'e' tags mix marked and unmarked forms")
        for event_id, relay, marker in parsed:
            assert marker is not None
            if marker in result:
                raise CodecError(R.AMBIGUOUS_EVENT_REFS, f"two 'e' tags with marker {marker!r}")
            result[marker] = EventRef(event_id, relay)
    else:
        if len(parsed) > len(roles):
            raise CodecError(R.AMBIGUOUS_EVENT_REFS, f"at most {len(roles)} unmarked 'e' tag(s) ({', '.join(roles)})")
        for role, (event_id, relay, _) in zip(roles, parsed, strict=False):  # fewer refs than roles: fine
            result[role] = EventRef(event_id, relay)
    for role in required:
        if role not in result:
            raise CodecError(R.MISSING_EVENT_REF, f"no 'e' tag for the {role}")
    ids = [ref.id for ref in result.values()]
    if len(set(ids)) != len(ids):
        raise CodecError(R.AMBIGUOUS_EVENT_REFS, "one event id is named for two roles")
    return result


def event_tag(event_id: str, relay: str = "", marker: str | None = None) -> Tag:
    parse_hex64(event_id, R.INVALID_EVENT_REF, "'e' event id")
    if type(relay) is not str:
        raise CodecError(R.INVALID_EVENT_REF, "relay hint must be a string")
    parse_relay_hint(relay, R.INVALID_EVENT_REF, "'e' relay hint")
    if marker is not None:
        return ("e", event_id, relay, marker)
    return ("e", event_id, relay) if relay else ("e", event_id)


# ------------------------------------------------------------------------ amounts


class Invoice(NamedTuple):
    """``["amount", <msat>, <bolt11>]``: an amount with the invoice that asks for it."""

    amount_msat: int
    bolt11: str


def parse_amount_tag(tag: Tag, *, bolt11_required: bool) -> tuple[int, str | None]:
    """``["amount", <msat>]`` or ``["amount", <msat>, <bolt11>]``; the amount must be > 0."""
    arity(tag, 3 if bolt11_required else 2, 3, R.INVALID_AMOUNT)
    amount = parse_msat(tag[1], R.INVALID_AMOUNT, "amount")
    if amount == 0:
        raise CodecError(R.INVALID_AMOUNT, "amount must be positive")
    bolt11 = None
    if len(tag) == 3:
        if not is_bolt11(tag[2]):
            raise CodecError(R.INVALID_BOLT11, "amount invoice must be a BOLT11 string (ln…)")
        bolt11 = tag[2]
    return amount, bolt11


def amount_tag(amount_msat: int, bolt11: str | None = None) -> Tag:
    text = format_msat(amount_msat, R.INVALID_AMOUNT, "amount")
    if amount_msat == 0:
        raise CodecError(R.INVALID_AMOUNT, "amount must be positive")
    if bolt11 is None:
        return ("amount", text)
    if type(bolt11) is not str or not is_bolt11(bolt11):
        raise CodecError(R.INVALID_BOLT11, "amount invoice must be a BOLT11 string (ln…)")
    return ("amount", text, bolt11)


#: The score value of a sealed model that did not open to its commitment (protocol.md §6).
UNREADABLE = "unreadable"
#: The result id of a score of the job's baseline model (relative acceptance, protocol.md §6):
#: ``["score", "baseline", <value>, <baseline model sha256>]``, published as
#: ``["score", "baseline", <validator>, <value>]``.
BASELINE = "baseline"
_NON_FINITE = re.compile(r"[+-]?(?:s?nan|inf|infinity)", re.IGNORECASE)


def parse_score_value(text: str) -> Decimal | None:
    """A score's value wherever one is written (evaluation result, validation complete): a bounded
    plain decimal, or ``None`` for :data:`UNREADABLE`."""
    if text == UNREADABLE:
        return None
    if _NON_FINITE.fullmatch(text) is not None:
        raise CodecError(R.NON_FINITE_SCORE, "a score must be a finite number")
    return parse_bounded_decimal(text, R.SCORE_OUT_OF_RANGE, "score", shape=R.INVALID_SCORE_VALUE)
