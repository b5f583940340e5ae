"""Fuzz target 1: NIP-01 event parsing and strict verification (service/nostr/nip01.py).

Inputs: arbitrary JSON-ish values and near-events (``nip01_json``), byte-mutated event
JSON, and valid signed events mutated field by field: hex flips in id/sig/pubkey,
created_at and kind edges, tags of wrong types, huge and deep tags, unicode edge cases
(lone surrogates, NUL, RTL, combining marks, overlong strings), missing and extra fields,
some re-signed after the mutation (``nip01_events``). Each with random verification limits.

Property: ``verify_event`` either returns an Event (then the independent model in
ref_nip01 finds no fault: the id recomputes, the signature verifies with coincurve and
with nostr-sdk, the event survives its own JSON, and a mutated event that was not
re-signed is exactly the original) or raises ``EventError`` whose reason is a fault the
input really has (the first one in the documented order once the shape is right).
Never another exception.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import coincurve
import pytest
from hypothesis import strategies as st

from service.nostr.nip01 import Event, EventError, EventErrorReason, verify_event

from . import harness
from .ref_nip01 import FIELDS, ORDER, SHAPE, Limits, canonical_bytes, faults, schnorr_ok
from .strategies import edge_text, short_text, weighted

try:
    import nostr_sdk as sdk
except ImportError:  # pragma: no cover - a dev dependency; the other checks still run
    sdk = None

pytestmark = pytest.mark.timeout(harness.TIMEOUT)
NOW = 1_767_225_600
SECRETS = [hashlib.sha256(f"fedstr fuzz nip01 key {i}".encode()).digest() for i in range(3)]
PUBKEYS = [coincurve.PrivateKey(s).public_key_xonly.format().hex() for s in SECRETS]


def sign_dict(secret: bytes, created_at: int, kind: int, tags: list, content: str) -> dict[str, Any]:
    """Sign with the independent serializer (zero aux randomness: deterministic); unsignable text gets junk."""
    pubkey = coincurve.PrivateKey(secret).public_key_xonly.format().hex()
    data = canonical_bytes(pubkey, created_at, kind, tags, content)
    if data is None:  # a lone surrogate has no UTF-8: no id can exist
        return {
            "id": "0" * 64,
            "pubkey": pubkey,
            "created_at": created_at,
            "kind": kind,
            "tags": tags,
            "content": content,
            "sig": "0" * 128,
        }
    digest = hashlib.sha256(data).digest()
    sig = coincurve.PrivateKey(secret).sign_schnorr(digest, bytes(32))
    return {
        "id": digest.hex(),
        "pubkey": pubkey,
        "created_at": created_at,
        "kind": kind,
        "tags": tags,
        "content": content,
        "sig": sig.hex(),
    }


# ----------------------------------------------------------------------------- strategies

hex_like = st.one_of(
    st.binary(min_size=32, max_size=32).map(bytes.hex),
    st.sampled_from(PUBKEYS),
    st.text("0123456789abcdefABCDEF", min_size=0, max_size=130),
)
wild_ints = st.one_of(
    st.integers(),
    st.sampled_from([-1, 0, 2**63 - 1, 2**63, 2**64, -(2**63), 65535, 65536, NOW + 900, NOW + 901, 10**30]),
)
json_scalars = st.one_of(st.none(), st.booleans(), wild_ints, st.floats(), edge_text, hex_like)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.one_of(edge_text, st.sampled_from(FIELDS)), inner, max_size=5)
    ),
    max_leaves=8,
)


def deep(depth: int) -> list:
    value: list = ["x"]
    for _ in range(depth):
        value = [value]
    return value


tags_strategy = weighted(
    (10, st.lists(st.lists(short_text, min_size=1, max_size=5), max_size=6)),
    (5, st.lists(st.lists(st.sampled_from(["e", "p", "t", "d", "x" * 100]), min_size=1, max_size=3), max_size=12)),
    # huge: many tags, long tags (the 2000 / 64 limits)
    (
        1,
        st.builds(
            lambda n, item: [["t", item]] * n, st.sampled_from([1999, 2000, 2001, 3000]), st.sampled_from(["", "x"])
        ),
    ),
    (1, st.builds(lambda n: [["t"] * n], st.sampled_from([63, 64, 65, 200]))),
)
kinds = st.one_of(st.sampled_from([0, 1, 5, 5701, 6701, 5702, 6702, 7000, 27235, 31990, 65535]), st.integers(0, 65535))
created = weighted(
    (8, st.integers(NOW - 86_400, NOW + 600)),
    (2, st.sampled_from([0, NOW - 3600, NOW + 899, NOW + 900, NOW + 901, 2**63 - 1])),
    (1, st.integers(0, 2**63 - 1)),
)


@st.composite
def limits(draw) -> Limits:
    if draw(st.integers(0, 9)) < 6:
        return Limits(now=NOW)
    return Limits(
        now=NOW,
        max_future=draw(st.sampled_from([0, 1, 60, 900, 10**6])),
        max_age=draw(st.sampled_from([None, 0, 60, 3600, 10**6])),
        max_bytes=draw(st.one_of(st.just(65536), st.integers(0, 4000))),
        max_tags=draw(st.one_of(st.just(2000), st.integers(0, 10))),
        max_tag_len=draw(st.one_of(st.just(64), st.integers(1, 6))),
        max_content=draw(st.one_of(st.just(65536), st.integers(0, 200))),
    )


def signed_event(draw) -> dict[str, Any]:
    secret = draw(st.sampled_from(SECRETS))
    return sign_dict(secret, draw(created), draw(kinds), draw(tags_strategy), draw(edge_text))


@st.composite
def near_events(draw) -> dict[str, Any]:
    """The seven fields, each either plausible or wild; sometimes one missing or one extra."""
    base = signed_event(draw)
    out: dict[str, Any] = {}
    for name in FIELDS:
        choice = draw(st.integers(0, 9))
        out[name] = base[name] if choice < 5 else draw(json_scalars if choice < 9 else json_values)
    if draw(st.integers(0, 4)) == 0:
        out.pop(draw(st.sampled_from(FIELDS)))
    if draw(st.integers(0, 4)) == 0:
        out[draw(edge_text)] = draw(json_values)
    return out


@st.composite
def mutated_json_text(draw) -> Any:
    """A valid event's JSON bytes with a few bytes changed, inserted or removed; then json.loads."""
    data = bytearray(json.dumps(signed_event(draw), ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass"))
    # where a string value starts: an insertion there keeps the JSON valid and changes the value
    starts = [m.end() for m in re.finditer(rb'[:\[,]"', data)]
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 4))
        pos = draw(st.integers(0, len(data)))
        if op >= 3 and starts:
            at = starts[draw(st.integers(0, len(starts) - 1))]
            data[at:at] = draw(
                st.sampled_from(
                    [
                        b"\\u0000",
                        b"\\ud800",
                        b"\\udfff\\ud800",
                        b'\\"',
                        b"\\\\",
                        b"\\u202e",
                        b"\\u00e9",
                        b"e\xcc\x81",
                        b"\xf0\x9f\x98\x80",
                        b"\\n",
                        b"\\u001f",
                        b"\\/",
                        b"\x7f",
                        b"a" * 70_000,
                    ]
                )
            )
            starts = []  # positions after this one moved
        elif op == 0 and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == 1:
            data[pos:pos] = draw(
                st.sampled_from(
                    [
                        b'"',
                        b"\\",
                        b"0",
                        b"-",
                        b"[",
                        b"]",
                        b"{",
                        b"}",
                        b",",
                        b":",
                        b"\\u0000",
                        b"\\ud800",
                        b"\xff",
                        b"\xc3",
                        b"1e9",
                        b" ",
                    ]
                )
            )
        else:
            del data[pos : pos + draw(st.integers(1, 8))]
    try:
        return json.loads(bytes(data))
    except (ValueError, RecursionError):
        return {"not": "json"}


@st.composite
def json_inputs(draw) -> tuple[Any, Limits]:
    value = draw(
        st.one_of(json_values, near_events(), mutated_json_text(), st.builds(deep, st.sampled_from([10, 100, 5000])))
    )
    return value, draw(limits())


HEX_REPLACEMENTS = "0123456789abcdefABCDEFgz \x00é"


@st.composite
def mutated_events(draw) -> tuple[dict, dict, bool, Limits]:
    """(original, mutated, resigned, limits): a valid signed event changed by 1..4 field mutations."""
    original = signed_event(draw)
    ev: dict[str, Any] = json.loads(json.dumps(original))  # a deep copy (lists)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 9))
        if op <= 2:  # flip one character of a hex field
            name = draw(st.sampled_from(["id", "sig", "pubkey"]))
            text = ev.get(name)
            if type(text) is str and text:
                pos = draw(st.integers(0, len(text) - 1))
                ev[name] = text[:pos] + draw(st.sampled_from(HEX_REPLACEMENTS)) + text[pos + 1 :]
        elif op == 3:
            name = draw(st.sampled_from(["created_at", "kind"]))
            base = ev.get(name) if type(ev.get(name)) is int else 0
            ev[name] = draw(
                st.one_of(
                    st.integers(base - 2, base + 2),
                    st.sampled_from(
                        [-1, 2**63, 2**63 - 1, 2**64, 65535, 65536, 1.5, float(base), str(base), True, None, NOW + 901]
                    ),
                    json_scalars,
                )
            )
        elif op <= 6 and isinstance(ev.get("tags"), list):
            tags = ev["tags"]
            which = draw(st.integers(0, 6))
            if which == 0 and tags:
                del tags[draw(st.integers(0, len(tags) - 1))]
            elif which == 1 and tags:
                # a duplicated tag, deep-copied: an earlier mutation may have made it any JSON value
                copied = json.loads(json.dumps(tags[draw(st.integers(0, len(tags) - 1))]))
                tags.insert(draw(st.integers(0, len(tags))), copied)
            elif which == 2 and len(tags) >= 2:
                i, j = draw(st.integers(0, len(tags) - 1)), draw(st.integers(0, len(tags) - 1))
                tags[i], tags[j] = tags[j], tags[i]
            elif which == 3 and tags and isinstance(tags[0], list):
                tag = tags[draw(st.integers(0, len(tags) - 1))]
                if isinstance(tag, list) and tag:
                    tag[draw(st.integers(0, len(tag) - 1))] = draw(
                        st.one_of(json_scalars, st.just([]), st.just({}), st.builds(deep, st.sampled_from([3, 50])))
                    )
            elif which == 4:
                tags.append(draw(st.one_of(st.just([]), json_values, st.lists(edge_text, min_size=1, max_size=70))))
            elif which == 5:
                ev["tags"] = draw(st.one_of(json_scalars, st.just({}), st.just(deep(200)), tags_strategy))
            else:
                tags.append(draw(st.lists(edge_text, min_size=1, max_size=4)))
        elif op == 7:
            content = ev.get("content")
            if type(content) is str:
                pos = draw(st.integers(0, len(content)))
                ev["content"] = content[:pos] + draw(edge_text) + content[pos:]
            else:
                ev["content"] = draw(edge_text)
        elif op == 8:
            if draw(st.booleans()):
                ev.pop(draw(st.sampled_from(FIELDS)), None)
            else:
                ev[draw(st.one_of(st.sampled_from(["extra", "ID", "id ", ""]), edge_text))] = draw(json_values)
        else:  # transplant a field from another valid event (another author's key or signature)
            other = sign_dict(draw(st.sampled_from(SECRETS)), NOW, 1, [], draw(edge_text))
            name = draw(st.sampled_from(["id", "pubkey", "sig"]))
            ev[name] = other[name]
    resigned = False
    if draw(st.integers(0, 3)) == 0 and not {"tags", "content", "kind", "created_at"} - ev.keys():
        ok = (
            type(ev["created_at"]) is int
            and type(ev["kind"]) is int
            and isinstance(ev["tags"], list)
            and all(isinstance(t, list) and all(type(i) is str for i in t) for t in ev["tags"])
            and type(ev["content"]) is str
        )
        if ok:  # an authentic event with the mutated body: only the limits can refuse it
            extra = {k: v for k, v in ev.items() if k not in FIELDS}
            ev = {
                **sign_dict(draw(st.sampled_from(SECRETS)), ev["created_at"], ev["kind"], ev["tags"], ev["content"]),
                **extra,
            }
            resigned = True
    return original, ev, resigned, draw(limits())


# ------------------------------------------------------------------------------- oracle


def _as_dict(event: Event) -> dict[str, Any]:
    return {**event.to_dict(), "tags": [list(t) for t in event.tags]}


def check_verify(obj: Any, lim: Limits, original: dict | None = None, resigned: bool = False) -> str:
    expected = faults(obj, lim)
    try:
        event = verify_event(obj, **lim.kwargs())
    except EventError as exc:
        assert isinstance(exc.reason, EventErrorReason), exc
        assert exc.reason in expected, (
            f"refused with {exc.reason.value}, but the input's faults are {[r.value for r in expected]}"
        )
        if exc.reason not in SHAPE:
            assert not set(expected) & SHAPE and exc.reason == expected[0], (
                f"refused with {exc.reason.value}; the documented order gives {expected[0].value}"
            )
        return exc.reason.value
    assert not expected, f"accepted an event with faults {[r.value for r in expected]}"
    assert isinstance(event, Event)
    # the id recomputes and the signature verifies, independently
    data = canonical_bytes(event.pubkey, event.created_at, event.kind, event.tags, event.content)
    assert data is not None and hashlib.sha256(data).hexdigest() == event.id
    assert schnorr_ok(event.pubkey, event.sig, bytes.fromhex(event.id)) is True
    assert _as_dict(event) == {k: ([list(t) for t in obj["tags"]] if k == "tags" else obj[k]) for k in FIELDS}
    if original is not None and not resigned:
        assert _as_dict(event) == original, "a mutated event that was not re-signed was accepted as changed"
    # its own wire form verifies again, to the same event, here and in nostr-sdk (rust-nostr)
    assert verify_event(json.loads(event.to_json()), **lim.kwargs()) == event
    if sdk is not None:
        theirs = sdk.Event.from_json(event.to_json())
        assert theirs.verify() and theirs.id().to_hex() == event.id
    return "accepted"


def _encode(case: tuple) -> dict:
    value, lim = case[0], case[1]
    return {
        "value": value,
        "limits": lim.kwargs(),
        **({"original": case[2], "resigned": case[3]} if len(case) > 2 else {}),
    }


def _decode(doc: dict) -> tuple:
    lim = Limits(**doc["limits"])
    if "original" in doc:
        return doc["value"], lim, doc["original"], doc["resigned"]
    return doc["value"], lim


def _check_case(case: tuple) -> str:
    return check_verify(*case)


def test_fuzz_nip01_json() -> None:
    """Arbitrary JSON values, near-events and byte-mutated event JSON: an EventError or a verified event."""
    report = harness.run("nip01_json", json_inputs(), _check_case, to_json=_encode, from_json=_decode)
    assert len(report.outcomes) >= 10, report.line()


def test_fuzz_nip01_events() -> None:
    """Valid signed events mutated field by field; never accepted unless authentic."""
    strategy = mutated_events().map(lambda m: (m[1], m[3], m[0], m[2]))
    report = harness.run("nip01_events", strategy, _check_case, to_json=_encode, from_json=_decode)
    assert report.outcomes["accepted"] > 0, report.line()
    seen = set(report.outcomes)
    for reason in (EventErrorReason.BAD_SIGNATURE, EventErrorReason.ID_MISMATCH, EventErrorReason.INVALID_SIG_FORMAT):
        assert reason.value in seen, f"the generator never produced {reason.value}: {report.line()}"
    assert len(seen & {r.value for r in ORDER}) >= 5, report.line()


@pytest.mark.parametrize("text", ["\ud800", "a\x00\u202e\u0301", "\\u0000", '"\\/\x7f\u2028'])
def test_the_reference_serializer_agrees_with_nip01(text: str) -> None:
    """Guards the oracle: ref_nip01's serializer is byte-equal to nip01's where both exist."""
    from service.nostr.nip01 import EventError as Error
    from service.nostr.nip01 import serialize

    tags = [["t", text], ["p", PUBKEYS[0], ""]]
    ours = canonical_bytes(PUBKEYS[0], NOW, 1, tags, text)
    try:
        theirs = serialize(PUBKEYS[0], NOW, 1, tags, text)
    except Error as exc:
        assert ours is None and exc.reason is EventErrorReason.INVALID_UNICODE
        return
    assert ours == theirs
