"""docs/protocol.md stays true: its generated blocks are what the codec produces today, and
every example event in it verifies and parses."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.nostr.nip01 import Event, verify_event
from service.nostr.protocol import (
    AppealFee,
    AppealRoundStarted,
    AppealWindow,
    Cancelled,
    ClaimExpired,
    CodecErrorReason,
    DeadlineExtension,
    ErrorFeedback,
    EscrowOffer,
    FallbackStarted,
    Funded,
    ModelKey,
    Refunded,
    RewardClaimable,
    RewardPaid,
    ValidationComplete,
    is_appeal,
    open_scores,
    parse_announcement,
    parse_appeal,
    parse_capabilities,
    parse_deletion,
    parse_escrow_feedback,
    parse_evaluation_request,
    parse_evaluation_result,
    parse_feedback,
    parse_job_request,
    parse_result,
    unwrap_key,
)
from service.nostr.protocol.examples import (
    EXAMPLE_TERMS,
    example_events,
    example_key,
    generated_block,
    update,
)

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "protocol.md"
JSON_BLOCK = re.compile(r"```json\n(.*?)\n```", re.DOTALL)


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


@pytest.mark.parametrize("name", ["reasons", "examples"])
def test_generated_blocks_are_current(doc, name):
    assert generated_block(name) in doc, (
        "docs/protocol.md is stale: run python -m service.nostr.protocol.examples --update docs/protocol.md"
    )


def test_update_is_idempotent(doc):
    assert update(doc) == doc


def test_every_reason_code_is_documented(doc):
    for reason in CodecErrorReason:
        assert f"| `{reason.value}` |" in doc, reason


def test_examples_are_reproducible():
    first, second = example_events(), example_events()
    assert [e.event for e in first] == [e.event for e in second]


def _doc_events(doc: str) -> list[Event]:
    return [verify_event(json.loads(block), now=2_000_000_000, max_age=None) for block in JSON_BLOCK.findall(doc)]


def test_every_documented_event_verifies_and_parses(doc):
    events = _doc_events(doc)
    assert len(events) == len(example_events()) >= 14
    escrow = example_key("escrow").public_key_hex
    jobs = {}
    results: dict = {}
    seen_bodies = set()
    for event in events:
        if event.kind == 31990 and event.pubkey == escrow:
            assert parse_announcement(event).terms == EXAMPLE_TERMS
        elif event.kind == 31990:  # a provider's capabilities (§1a), for this escrow
            caps = parse_capabilities(event)
            assert caps.works_with(escrow) and caps.tasks
        elif event.kind == 5701:
            job = parse_job_request(event, escrow_pubkey=escrow, terms=EXAMPLE_TERMS, now=event.created_at)
            jobs[job.id] = job
        elif event.kind == 6701:
            job = jobs[next(t[1] for t in event.tags if t[0] == "e")]
            result = parse_result(event, job)
            assert result.provider == event.pubkey
            results[result.id] = result
            # Sealed: the escrow and every validator open their envelope to the committed key.
            assert result.sealed is not None
            for role in ("escrow", "validator 1", "validator 2"):
                me = example_key(role)
                envelope = result.sealed.key_for(me.public_key_hex)
                assert envelope is not None
                unwrap_key(me, result.provider, envelope.payload, result.sealed.key_sha256)
        elif event.kind == 5702:
            request = parse_evaluation_request(event)
            assert request.job_id in jobs
            pool = {example_key(f"validator {k}").public_key_hex: example_key(f"validator {k}") for k in (3, 4)}
            for key in request.keys:  # a pool round's: the pool validator opens each sealed candidate's key
                sealed_candidate = results[key.result_id].sealed
                assert sealed_candidate is not None and key.validator in pool
                unwrap_key(pool[key.validator], escrow, key.payload, sealed_candidate.key_sha256)
        elif event.kind == 6702:
            sealed = parse_evaluation_result(event, escrow_pubkey=escrow)
            assert sealed.job_id in jobs and sealed.sealed and not sealed.scores
            opened = open_scores(sealed, example_key("escrow"))
            assert {x.result_id for x in opened.scores} <= set(results)
        elif event.kind == 7000 and event.pubkey == escrow:
            body = parse_escrow_feedback(event)
            seen_bodies.add(type(body))
            if isinstance(body, ModelKey):  # the customer opens it to the sealed result's key
                sealed_model = results[body.result_id].sealed
                assert sealed_model is not None
                unwrap_key(example_key("customer"), escrow, body.payload, sealed_model.key_sha256)
        elif event.kind == 7000 and is_appeal(event):
            assert parse_appeal(event, escrow_pubkey=escrow).job_id in jobs
        elif event.kind == 7000:
            assert parse_feedback(event, escrow_pubkey=escrow).payee == event.pubkey
        elif event.kind == 5:
            assert parse_deletion(event).author == event.pubkey
        else:  # pragma: no cover
            raise AssertionError(f"undocumented kind {event.kind}")
    assert seen_bodies == {
        EscrowOffer,
        Funded,
        DeadlineExtension,
        FallbackStarted,
        ValidationComplete,
        RewardClaimable,
        ClaimExpired,
        RewardPaid,
        ModelKey,
        Refunded,
        Cancelled,
        ErrorFeedback,
        AppealWindow,
        AppealFee,
        AppealRoundStarted,
    }
    assert {e.kind for e in events} == {31990, 5701, 6701, 5702, 6702, 7000, 5}


def test_documented_private_shard_is_readable_by_its_provider_only(doc):
    from service.nostr.protocol import CodecError, decrypt_shard

    job_event = next(e for e in _doc_events(doc) if e.kind == 5701)
    tag = next(t for t in job_event.tags if t[0] == "i" and t[2] == "nip44")
    bob = example_key("provider bob")
    assert tag[3] == bob.public_key_hex
    assert decrypt_shard(bob, job_event.pubkey, tag[1]) == "https://data.example.org/mnist/shard-1.npz"
    with pytest.raises(CodecError):
        decrypt_shard(example_key("escrow"), job_event.pubkey, tag[1])


def test_import_order_does_not_matter():
    for module in ("service.nostr.nip40", "service.nostr.protocol", "service.nostr.protocol.feedback"):
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=ROOT)
