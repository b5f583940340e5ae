"""Fuzz target 3: the payout-invoice checks (``check_invoice`` in service/payouts/check.py,
and the LNURL invoice check ``lnurl._check_invoice``).

Inputs: BOLT11 invoices written with the ``bolt11`` package from random amounts,
expiries, networks (bc/tb/tbs/bcrt and others), timestamps, final CLTV deltas, payee
keys (ours among them, with and without the ``n`` field, sometimes a wrong one),
payment hashes (some already used by us), with and without payment secret, description
or description hash (``invoice_generated``); and such invoices mutated: truncated,
characters inserted, deleted, swapped, case mixed, garbage around them, and, keeping a
valid checksum, words flipped, tagged fields added, removed or resized, the amount or
currency rewritten (``invoice_mutated``). Each with a random payout amount, clock,
network, expiry and CLTV policy and payout id.

The node is a fake LND whose ``DecodePayReq`` is ref_bolt11, an independent BOLT 11
reader; the database is a real (migrated) SQLite file holding our own invoices and
earlier payout attempts.

Property: ``check_invoice`` refuses with exactly the first failing reason of its
documented table (docs/lightning.md, re-derived here in that order), or accepts; it
accepts only an invoice that the node decodes and that satisfies every rule (our
network, the exact payout amount, not expired, enough expiry left, final CLTV within
the limit, not our node's, a hash never used) — checked independently from the node's
decoding — and returns exactly what the node read. ``_check_invoice`` (LNURL) refuses
with an ``LnurlError`` or accepts only the exact amount on the right network, with the
metadata's description hash and time left. Never another exception.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bolt11
import coincurve
import grpc
import pytest
from bolt11 import Bolt11, MilliSatoshi
from bolt11.exceptions import Bolt11NoPaymentSecretException
from bolt11.models.tags import TagChar, Tags
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db import create_engine
from service.lightning import errors, lnurl
from service.lightning.client import BlindedPath, PayReq
from service.lightning.models import LnInvoice
from service.migrate import upgrade
from service.payouts import CheckReason, DestinationKind, InvoiceCheckError, PayoutKind, PayoutPolicy
from service.payouts.check import CheckedInvoice, check_invoice
from service.payouts.models import Payout, PayoutAttempt

from . import harness
from . import ref_bolt11 as ref
from .strategies import choose, weighted

pytestmark = pytest.mark.timeout(harness.TIMEOUT)
NOW = 1_767_225_600
NETWORKS = ("regtest", "mainnet", "testnet", "signet")
METADATA = '[["text/plain","fedstr fuzz"]]'
METADATA_HASH = hashlib.sha256(METADATA.encode()).hexdigest()
NODE_SECRETS = [hashlib.sha256(f"fedstr fuzz node {i}".encode()).hexdigest() for i in range(4)]
NODE_KEYS = [coincurve.PrivateKey.from_hex(s).public_key.format().hex() for s in NODE_SECRETS]
OUR_NODE = NODE_KEYS[0]  # the escrow's node: invoices signed with its key are our own


def h(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


# The database: hashes of our own invoices and of earlier payout attempts (payout, state).
OWN_HASHES = (h("own invoice 1"), h("own invoice 2"))
ATTEMPTS = {
    h("attempt 1"): ("payout-1", "failed"),
    h("attempt 2"): ("payout-1", "sending"),
    h("attempt 3"): ("payout-2", "succeeded"),
    h("attempt 4"): ("payout-2", "failed"),
}
PAYOUT_IDS = ("payout-1", "payout-2", "payout-3", None)
KNOWN_HASHES = (*OWN_HASHES, *ATTEMPTS)


# ------------------------------------------------------------------------------- the node


class FakeNode:
    """LND's DecodePayReq, as ref_bolt11 reads BOLT 11: its refusals are LND's (code UNKNOWN)."""

    def __init__(self, network: str) -> None:
        self.network = network

    async def decode_pay_req(self, payment_request: str) -> PayReq:
        try:
            inv = ref.decode(payment_request, self.network)
        except ref.RefError as exc:
            if len(payment_request) % 2:  # both ways check_invoice knows a refusal
                raise errors.LndInvalidArgument("DecodePayReq", str(exc), grpc.StatusCode.INVALID_ARGUMENT) from None
            raise errors.LndError("DecodePayReq", str(exc), grpc.StatusCode.UNKNOWN) from None
        return PayReq(
            destination=inv.destination,
            payment_hash=inv.payment_hash,
            num_msat=inv.amount_msat or 0,
            timestamp=inv.timestamp,
            expiry=inv.expiry,
            cltv_expiry=inv.min_final_cltv,
            description=inv.description or "",
            description_hash=inv.description_hash,
            payment_addr=inv.payment_secret or b"",
            blinded_paths=tuple(BlindedPath(*path) for path in inv.blinded_paths),
        )

    async def lookup_invoice(self, payment_hash: bytes) -> None:
        """Our own invoices are our node's (a blinded invoice's own-node check asks it)."""
        if payment_hash.hex() not in OWN_HASHES:
            raise errors.LndNotFound("LookupInvoiceV2", "unable to locate invoice", grpc.StatusCode.NOT_FOUND)


class Checker:
    """A real migrated SQLite database and an event loop, kept for a whole target."""

    def __init__(self, directory: Path) -> None:
        url = f"sqlite+aiosqlite:///{directory / 'fuzz.sqlite3'}"
        upgrade(url)
        self.runner = asyncio.Runner()
        self.engine = create_engine(url)
        self.session: AsyncSession = self.runner.run(self._setup())

    async def _setup(self) -> AsyncSession:
        sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        now = datetime.now(UTC)
        async with sessions.begin() as s:
            for payment_hash in OWN_HASHES:
                s.add(
                    LnInvoice(
                        payment_hash=payment_hash,
                        mode="hold",
                        amount_msat=1000,
                        payment_request="lnbcrt1x",
                        expires_at=NOW + 3600,
                    )
                )
            for payout_id in ("payout-1", "payout-2"):
                s.add(
                    Payout(
                        id=payout_id,
                        kind=PayoutKind.REWARD,
                        payee="ab" * 32,
                        amount_msat=1000,
                        destination_kind=DestinationKind.NONE,
                        destination="",
                        state="pending",
                        attempts=1,
                        next_attempt_at=now,
                    )
                )
            await s.flush()
            for payment_hash, (payout_id, state) in ATTEMPTS.items():
                s.add(
                    PayoutAttempt(
                        payment_hash=payment_hash,
                        payout_id=payout_id,
                        payment_request="lnbcrt1x",
                        fee_limit_msat=1,
                        state=state,
                    )
                )
        return sessions()

    def check(self, case: Case) -> CheckedInvoice | InvoiceCheckError:
        async def call() -> CheckedInvoice | InvoiceCheckError:
            try:
                return await check_invoice(
                    FakeNode(case.network),
                    self.session,
                    case.pr,
                    amount_msat=case.amount_msat,
                    policy=case.policy(),
                    our_pubkey=OUR_NODE,
                    now=case.now,
                    payout_id=case.payout_id,
                )
            except InvoiceCheckError as exc:
                return exc

        return self.runner.run(call())

    def close(self) -> None:
        async def shutdown() -> None:
            await self.session.close()
            await self.engine.dispose()

        self.runner.run(shutdown())
        self.runner.close()


@pytest.fixture
def checker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # bolt11.decode is pure and slow (bitstring): check_invoice, lnurl._check_invoice and the
    # oracle decode the same string; a small memo makes that one decoding (same result or error).
    real, memo = bolt11.decode, {}

    def decode(pr: str, ignore_exceptions: bool = False, strict: bool = False) -> Bolt11:
        key = (pr, ignore_exceptions, strict)
        if key not in memo:
            try:
                memo[key] = (real(pr, ignore_exceptions, strict), None)
            except Exception as exc:  # noqa: BLE001 - replayed below, as raised
                memo[key] = (None, exc)
            if len(memo) > 32:
                del memo[next(iter(memo))]
        value, exc = memo[key]
        if exc is not None:
            raise exc.with_traceback(None)
        return value

    monkeypatch.setattr(bolt11, "decode", decode)
    c = Checker(tmp_path)
    try:
        yield c
    finally:
        c.close()


# -------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    pr: str
    amount_msat: int
    now: int
    network: str
    min_expiry: int = 300
    max_cltv: int = 432
    payout_id: str | None = None

    def policy(self) -> PayoutPolicy:
        return PayoutPolicy(network=self.network, min_expiry_seconds=self.min_expiry, max_final_cltv=self.max_cltv)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Spec:
    """What an invoice was written from (the generator's view)."""

    currency: str
    amount_msat: int | None
    timestamp: int
    payment_hash: str
    secret: str | None
    description: str | None
    description_hash: str | None
    expiry: int | None
    cltv: int | None
    signer: int
    n_field: int | None  # index of the key written in the n field (None: no n field)


def write_invoice(spec: Spec) -> str:
    tags = Tags()
    tags.add(TagChar.payment_hash, spec.payment_hash)
    if spec.secret is not None:
        tags.add(TagChar.payment_secret, spec.secret)
    if spec.description is not None:
        tags.add(TagChar.description, spec.description)
    if spec.description_hash is not None:
        tags.add(TagChar.description_hash, spec.description_hash)
    if spec.expiry is not None:
        tags.add(TagChar.expire_time, spec.expiry)
    if spec.cltv is not None:
        tags.add(TagChar.min_final_cltv_expiry, spec.cltv)
    if spec.n_field is not None:
        tags.add(TagChar.payee, NODE_KEYS[spec.n_field])
    invoice = Bolt11(
        currency=spec.currency,
        date=spec.timestamp,
        tags=tags,
        amount_msat=MilliSatoshi(spec.amount_msat) if spec.amount_msat is not None else None,
    )
    return bolt11.encode(
        invoice, NODE_SECRETS[spec.signer], ignore_exceptions=True, keep_payee=spec.n_field is not None
    )


descriptions = st.text(st.characters(exclude_categories=["Cs"]), max_size=80)
GARBAGE = ["lightning:", "ln", "1", " ", "\n", "\x00", "é", "\u200b", "q", "p", "lnbc1", "?amount=1", "LN"]
any_char = st.one_of(st.sampled_from(ref.CHARSET), st.characters(), st.sampled_from(GARBAGE))
hashes = weighted((6, st.binary(min_size=32, max_size=32).map(bytes.hex)), (2, st.sampled_from(KNOWN_HASHES)))
amounts = weighted(
    (5, st.integers(1, 10**9)),
    (2, st.integers(1, 2**64)),
    (1, st.sampled_from([1, 9, 10, 11, 999, 1000, 1001, 10**11, 2_100_000_000_000_000_000])),
)
payouts = weighted(
    (5, st.integers(1, 10**9)),
    (2, st.integers(1, 2_100_000_000_000_000_000)),
    (1, st.sampled_from([1, 9, 10, 11, 999, 1000, 1001, 10**11, 2_100_000_000_000_000_000])),
)


def spec_for(draw, network: str, payout: int) -> Spec:
    description = choose(draw, (7, descriptions), (3, st.none()))
    description_hash = (
        None
        if description is not None
        else choose(draw, (1, st.just(METADATA_HASH)), (1, st.binary(min_size=32, max_size=32).map(bytes.hex)))
    )
    if draw(st.integers(0, 19)) == 0:  # both, or neither
        description, description_hash = draw(st.sampled_from([("x", METADATA_HASH), (None, None)]))
    signer = choose(draw, (1, st.just(0)), (6, st.integers(1, len(NODE_KEYS) - 1)))
    n_field = choose(draw, (6, st.none()), (3, st.just(signer)), (1, st.integers(0, len(NODE_KEYS) - 1)))
    return Spec(
        currency=choose(
            draw,
            (12, st.just(ref.PREFIX[network])),
            (3, st.sampled_from(sorted(ref.PREFIX.values()))),
            (1, st.sampled_from(["sb", "bcr", "xyz", "tbsx", "BC", ""])),
        ),
        amount_msat=choose(
            draw,
            (10, st.just(payout)),
            (2, st.none()),
            (1, st.just(0)),
            (2, st.sampled_from([payout - 1, payout + 1, payout * 10])),
            (1, amounts),
        ),
        timestamp=choose(draw, (8, st.integers(NOW - 7200, NOW + 600)), (1, st.integers(0, 2**35 - 1))),
        payment_hash=draw(hashes),
        secret=choose(draw, (9, st.binary(min_size=32, max_size=32).map(bytes.hex)), (1, st.none())),
        description=description,
        description_hash=description_hash,
        expiry=choose(
            draw,
            (3, st.none()),
            (5, st.integers(1, 7200)),
            (1, st.sampled_from([0, 1, 300, 10**9, 10**10])),
            (1, st.integers(1, 2**40)),
        ),
        cltv=choose(draw, (3, st.none()), (5, st.integers(1, 500)), (1, st.sampled_from([0, 431, 432, 433, 2**32]))),
        signer=signer,
        n_field=n_field,
    )


@st.composite
def generated(draw) -> tuple[Case, Spec]:
    network = draw(st.sampled_from(NETWORKS))
    payout = draw(payouts)
    spec = spec_for(draw, network, payout)
    if draw(st.integers(0, 3)) == 0:  # what an LNURL-pay service returns: the metadata's hash, time left
        spec = replace(
            spec, description=None, description_hash=METADATA_HASH, expiry=draw(st.sampled_from([10**9, 2**32, 2**35]))
        )
    pr = write_invoice(spec)
    if draw(st.integers(0, 9)) == 0:
        pr = pr.upper()
    pr = choose(draw, (8, st.just("")), (1, st.sampled_from(["lightning:", "LIGHTNING:", " ", "\n\t", "\u00a0"]))) + pr
    pr += choose(draw, (9, st.just("")), (1, st.sampled_from([" ", "\n", "\u2003"])))
    expiry = 3600 if spec.expiry is None else spec.expiry
    min_expiry = choose(draw, (4, st.just(300)), (1, st.integers(0, 4000)))
    now = choose(
        draw,
        (3, st.integers(spec.timestamp - 100, spec.timestamp + expiry + 100)),
        (3, st.integers(spec.timestamp + expiry - min_expiry - 3, spec.timestamp + expiry + 3)),
        (1, st.integers(0, 2**36)),
    )
    case = Case(
        pr=pr,
        amount_msat=payout,
        now=now,
        network=network,
        min_expiry=min_expiry,
        max_cltv=choose(draw, (4, st.just(432)), (1, st.integers(0, 1000))),
        payout_id=draw(st.sampled_from(PAYOUT_IDS)),
    )
    return case, spec


# ------------------------------------------------------------------------------ mutation


def _fields(words: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each tagged field of the data part (words without checksum and signature)."""
    out, i = [], 7
    while i + 3 <= len(words):
        end = i + 3 + words[i + 1] * 32 + words[i + 2]
        if end > len(words):
            break
        out.append((i, end))
        i = end
    return out


def mutate_words(draw, pr: str) -> str:
    """Change the invoice's 5-bit words or its hrp and write a valid checksum again."""
    try:
        hrp, words = ref.split(pr.strip().removeprefix("lightning:").removeprefix("LIGHTNING:"), strict_case=False)
    except ref.RefError:
        return pr
    body, sig = words[:-104] if len(words) > 104 else words, words[-104:] if len(words) > 104 else []
    op = draw(st.integers(0, 7))
    if op == 0 and body:  # flip bits in one word (the signature included)
        target = draw(st.sampled_from(["body", "sig"])) if sig else "body"
        seq = body if target == "body" else sig
        i = draw(st.integers(0, len(seq) - 1))
        seq[i] ^= draw(st.integers(1, 31))
    elif op == 1 and len(body) >= 7:  # another timestamp
        value = draw(st.integers(0, 2**35 - 1))
        body[:7] = [(value >> 5 * (6 - k)) & 31 for k in range(7)]
    elif op == 2:  # insert a tagged field
        kind = draw(st.sampled_from("phsndxcf9rm" + "5" + "qz"))  # 5: a blinded path (bLIP 39)
        length = draw(st.sampled_from([0, 1, 2, 13, 14, 52, 53, 60]))
        data = draw(st.lists(st.integers(0, 31), min_size=length, max_size=length))
        at = draw(st.sampled_from([7, len(body)]))
        body[at:at] = [ref.CHARSET.index(kind), length // 32, length % 32, *data]
    elif op == 3 and _fields(body):  # remove a tagged field
        start, end = draw(st.sampled_from(_fields(body)))
        del body[start:end]
    elif op == 4 and _fields(body):  # resize a tagged field's declared length
        start, _ = draw(st.sampled_from(_fields(body)))
        length = draw(st.integers(0, 1023))
        body[start + 1 : start + 3] = [length // 32, length % 32]
    elif op == 5 and _fields(body):  # duplicate a tagged field
        start, end = draw(st.sampled_from(_fields(body)))
        body[end:end] = body[start:end]
    elif op == 6:  # rewrite the amount or the currency
        currency = ref.currency_of(hrp + "1") or "bc"
        amount = draw(
            st.sampled_from(
                [
                    "",
                    "0",
                    "1",
                    "10",
                    "15p",
                    "10p",
                    "100p",
                    "1n",
                    "25u",
                    "2500u",
                    "1m",
                    "00010u",
                    "1.5m",
                    "-1",
                    "99999999999999999999",
                    "184467440737095516150p",
                    "10U",
                    "1x",
                    "u",
                ]
            )
        )
        hrp = "ln" + draw(st.sampled_from([currency, currency, "bc", "tb", "tbs", "bcrt", "sb"])) + amount
    else:  # drop or add signature words
        if sig and draw(st.booleans()):
            sig = sig[: -draw(st.integers(1, 3))]
        else:
            sig = sig + draw(st.lists(st.integers(0, 31), min_size=1, max_size=3))
    out = ref.encode(hrp, body + sig)
    return out.upper() if pr.strip().isupper() else out


def mutate_text(draw, pr: str) -> str:
    op = draw(st.integers(0, 8))
    pos = draw(st.integers(0, max(0, len(pr) - 1)))
    if op == 0:
        return pr[:pos]
    if op == 1:
        return pr[:pos] + pr[pos + 1 :]
    if op == 2:
        return pr[:pos] + draw(any_char) + pr[pos:]
    if op == 3:
        return pr[:pos] + draw(st.sampled_from(ref.CHARSET)) + pr[pos + 1 :]
    if op == 4 and pos + 1 < len(pr):
        return pr[:pos] + pr[pos + 1] + pr[pos] + pr[pos + 2 :]
    if op == 5 and pr:
        return pr[:pos] + pr[pos].swapcase() + pr[pos + 1 :]
    if op == 6:
        return draw(st.sampled_from([pr.upper(), pr.lower(), pr.swapcase(), pr.title()]))
    if op == 7:
        return draw(st.sampled_from(GARBAGE)) + pr if draw(st.booleans()) else pr + draw(st.sampled_from(GARBAGE))
    end = min(len(pr), pos + draw(st.integers(1, 40)))
    return pr[:end] + pr[pos:]


@st.composite
def mutated(draw, base: st.SearchStrategy) -> Case:
    case, _ = draw(base)
    pr = case.pr
    for _ in range(choose(draw, (6, st.just(1)), (3, st.just(2)), (1, st.just(3)))):
        pr = mutate_words(draw, pr) if draw(st.integers(0, 4)) else mutate_text(draw, pr)
    return Case(**{**case.__dict__, "pr": pr})


# --------------------------------------------------------------------------------- oracle

CR = CheckReason


def expected_outcome(case: Case) -> tuple[CheckReason | None, ref.RefInvoice | None]:
    """check_invoice's documented table, in order; (None, node's reading) when every rule holds."""
    pr = case.pr.strip()
    if pr.lower().startswith("lightning:"):
        pr = pr[len("lightning:") :]
    try:  # "the bolt11 library decodes it, and its blinded paths (bLIP 39) read"
        ours = bolt11.decode(pr, ignore_exceptions=True)
        paths = ref.blinded_paths_of(pr)
        try:
            ours.validate()
        except Bolt11NoPaymentSecretException:  # a blinded invoice needs none
            if not paths or bool(ours.description) == bool(ours.description_hash):
                raise
    except Exception:  # noqa: BLE001 - the library's many types, RefError
        return CR.UNDECODABLE, None
    if ref.NETWORK_OF_CURRENCY.get(ours.currency, ours.currency) != case.network:
        return CR.WRONG_NETWORK, None
    try:
        node = ref.decode(pr, case.network)
    except ref.RefError:
        return CR.NODE_REFUSED, None
    if (
        node.payment_hash.hex() != ours.payment_hash
        or (ours.amount_msat or 0) != (node.amount_msat or 0)
        or ours.payee != node.destination
    ):
        return CR.DECODERS_DISAGREE, node
    amount = node.amount_msat or 0
    hash_hex = node.payment_hash.hex()
    prior = ATTEMPTS.get(hash_hex)
    for reason, broken in (
        (CR.NO_AMOUNT, amount == 0),
        (CR.WRONG_AMOUNT, amount != case.amount_msat),
        (CR.EXPIRED, node.expires_at <= case.now),
        (CR.EXPIRES_TOO_SOON, node.expires_at < case.now + case.min_expiry),
        (CR.CLTV_TOO_LARGE, final_cltv(node) > case.max_cltv),
        (CR.SELF_PAYMENT, node.destination == OUR_NODE or (node.blinded_paths and hash_hex in OWN_HASHES)),
        (CR.PATHS_START_AT_US, node.blinded_paths and all(path[0] == OUR_NODE for path in node.blinded_paths)),
        (CR.HASH_REUSED, hash_hex in OWN_HASHES or (prior is not None and prior != (case.payout_id, "failed"))),
    ):
        if broken:
            return reason, node
    return None, node


def final_cltv(node: ref.RefInvoice) -> int:
    """A blinded invoice's is its longest path's total CLTV delta (its ``c`` field means nothing)."""
    return max((path[4] for path in node.blinded_paths), default=node.min_final_cltv)


def check_payout_invoice(checker: Checker, case: Case) -> str:
    got = checker.check(case)
    reason, node = expected_outcome(case)
    if isinstance(got, InvoiceCheckError):
        assert isinstance(got.reason, CheckReason), got
        assert got.reason == reason, f"refused with {got.reason.value}, expected {reason and reason.value}: {got}"
        outcome = got.reason.value
    else:
        assert reason is None, f"accepted, but the rules say {reason.value}"
        # Never accept an invoice a rule forbids (re-derived from the node's reading alone).
        pr = case.pr.strip()
        pr = pr[len("lightning:") :] if pr.lower().startswith("lightning:") else pr
        node = ref.decode(pr, case.network)
        assert ref.NETWORK_OF_CURRENCY[node.currency] == case.network
        assert node.amount_msat == case.amount_msat
        assert node.expires_at > case.now and node.expires_at >= case.now + case.min_expiry
        assert final_cltv(node) <= case.max_cltv
        assert node.destination != OUR_NODE
        assert node.payment_hash.hex() not in OWN_HASHES
        assert ATTEMPTS.get(node.payment_hash.hex()) in (None, (case.payout_id, "failed"))
        assert got == CheckedInvoice(
            pr,
            node.payment_hash.hex(),
            case.amount_msat,
            node.destination,
            node.expires_at,
            final_cltv(node),
            tuple(BlindedPath(*path) for path in node.blinded_paths),
        )
        outcome = "accepted"
    return outcome + "|lnurl:" + check_lnurl_invoice(case)


def check_lnurl_invoice(case: Case) -> str:
    """lnurl._check_invoice: an LnurlError, or an invoice for exactly this amount, network and metadata."""
    before = time.time()
    try:
        got = lnurl._check_invoice(case.pr, case.amount_msat, METADATA, case.network)
    except lnurl.LnurlError as exc:
        assert isinstance(exc.reason, lnurl.LnurlReason), exc
        return exc.reason.value
    currency = ref.currency_of(case.pr)
    assert currency == ref.PREFIX[case.network], "accepted an invoice for another network"
    hrp = case.pr[: case.pr.rfind("1")].lower()
    assert ref.parse_amount(hrp[2 + len(currency) :]) == case.amount_msat, "accepted another amount"
    try:
        inv = ref.decode(case.pr, case.network, strict_case=False)
        description_hash, expires_at, payment_hash = inv.description_hash, inv.expires_at, inv.payment_hash
    except ref.RefError:  # the reference is stricter than BOLT 11 readers need to be: trust the library's fields
        lib = bolt11.decode(case.pr, ignore_exceptions=True)  # accepted: a blinded one has no secret
        description_hash = bytes.fromhex(lib.description_hash or "")
        expires_at, payment_hash = lib.date + lib.expiry, bytes.fromhex(lib.payment_hash)
    assert description_hash == bytes.fromhex(METADATA_HASH) == got.description_hash
    assert expires_at > before + lnurl.MIN_INVOICE_TTL_SECONDS and got.expires_at == expires_at
    assert got.payment_hash == payment_hash and len(payment_hash) == 32
    return "accepted"


def _from_json(doc: dict[str, Any]) -> Case:
    return Case(**doc)


def _check(checker: Checker):
    return lambda case: check_payout_invoice(checker, case)


def test_fuzz_invoice_generated(checker: Checker) -> None:
    report = harness.run(
        "invoice_generated",
        generated().map(lambda cs: cs[0]),
        _check(checker),
        to_json=Case.to_json,
        from_json=_from_json,
    )
    outcomes = {k.split("|")[0] for k in report.outcomes}
    assert "accepted" in outcomes, report.line()
    assert len(outcomes) >= 9, f"only {sorted(outcomes)}: {report.line()}"


def test_fuzz_invoice_mutated(checker: Checker) -> None:
    started = time.monotonic()
    pool = harness.sample(generated(), 60, "invoice_mutated pool")
    # Mutating an invoice that decodes reaches deeper than mutating one that does not.
    decodes = [cs for cs in pool if expected_outcome(cs[0])[0] is not CR.UNDECODABLE] or pool
    base = weighted((1, generated()), (1, st.sampled_from(pool)), (4, st.sampled_from(decodes)))
    report = harness.run(
        "invoice_mutated", mutated(base), _check(checker), to_json=Case.to_json, from_json=_from_json, started=started
    )
    outcomes = {k.split("|")[0] for k in report.outcomes}
    assert {"accepted", CR.UNDECODABLE.value, CR.NODE_REFUSED.value} <= outcomes, report.line()


def test_the_reference_reader_reads_the_bolt11_spec_vector() -> None:
    """Guards the oracle: BOLT 11's "1 cup coffee" example decodes to the spec's values."""
    vector = (
        "lnbc2500u1pvjluezsp5zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zygspp5qqqsyqcyq5rqwzqfqqqsy"
        "qcyq5rqwzqfqqqsyqcyq5rqwzqfqypqdq5xysxxatsyp3k7enxv4jsxqzpu9qrsgquk0rl77nj30yxdy8j9vdx85fkpmdla20"
        "87ne0xh8nhedh8w27kyke0lp53ut353s06fv3qfegext0eh0ymjpf39tuven09sam30g4vgpfna3rh"
    )
    inv = ref.decode(vector, "mainnet")
    assert (inv.amount_msat, inv.timestamp, inv.description, inv.expiry, inv.min_final_cltv) == (
        250_000_000,
        1496314658,
        "1 cup coffee",
        60,
        18,
    )
    assert inv.destination == "03e7156ae33b0a208d0744199163177e909e80176e55d97a2f221ede0f934dd9ad"
    assert inv.payment_hash.hex() == "0001020304050607080900010203040506070809000102030405060708090102"
    hrp, words = ref.split(vector)
    assert ref.encode(hrp, words) == vector
    with pytest.raises(ref.RefError):
        ref.decode(vector, "regtest")
    with pytest.raises(ref.RefError):
        ref.decode(vector[:20] + vector[20:].upper(), "mainnet")
