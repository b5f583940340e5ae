"""The audit's checks on a whole job's signed events: a consistent job is clean, and each tamper is
reported as exactly its own discrepancy (service/audit, docs/audit.md)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest

from service.audit import AuditFetchError, AuditReport, Status, audit_events
from service.audit.decision import Scored, recompute
from service.cli import main
from service.nostr.nip01 import Event
from service.nostr.protocol import (
    Announcement,
    PublishedScore,
    Refunded,
    Verdict,
    build_announcement,
    build_model_key,
    build_refunded,
    build_reward_paid,
    build_validation_complete,
)
from service.nostr.protocol.examples import EXAMPLE_TERMS
from service.nostr.protocol.fields import Template
from service.nostr.protocol.job import Validation
from service.nostr.protocol.money import MoneySplit
from service.nostr.protocol.terms import Direction
from tests.support.audit_world import BID, AuditWorld, consistent_job, preimage_and_hash


@pytest.fixture(scope="module")
def world() -> AuditWorld:
    return consistent_job()


def audit(world: AuditWorld, events: Sequence[Event | dict[str, Any]], escrow: str | None = None) -> AuditReport:
    return audit_events(world.job.id, events, escrow=escrow)


def found(report: AuditReport) -> list[tuple[str, str]]:
    return [(f.check, f.code) for f in report.discrepancies]


def complete_with(world: AuditWorld, **changes: object) -> Template:
    return build_validation_complete(replace(world.bodies["complete"], **changes))


def verdicts(world: AuditWorld, provider: str, verdict: Verdict) -> tuple[Verdict, ...]:
    rid = world.events[f"result {provider}"].id
    return tuple(verdict if v.result_id == rid else v for v in world.bodies["complete"].verdicts)


def test_a_consistent_job_is_clean(world: AuditWorld) -> None:
    report = audit(world, world.all())
    assert report.ok and found(report) == [] and report.warnings == ()
    assert report.events == len(world.events) and report.escrow == world.escrow.public_key_hex
    statuses = {f.check: f.status for f in report.findings}
    for check in ("job", "signatures", "offer", "funded", "verdict", "split", "terms", "rewards", "receipt"):
        assert statuses[check] is Status.OK, check
    assert statuses["refund"] is Status.NOT_APPLICABLE
    assert sum(f.check == "receipt" and f.status is Status.OK for f in report.findings) == 4
    assert "no discrepancy" in report.summary()


def test_events_in_any_order_and_duplicated_audit_the_same(world: AuditWorld) -> None:
    events = world.all()
    report = audit(world, [*(e.to_dict() for e in reversed(events)), *events[:3]])
    assert report.ok and report.events == len(world.events)


def test_a_median_that_is_not_the_published_scores_median(world: AuditWorld) -> None:
    rid = world.events["result alice"].id
    tampered = verdicts(world, "alice", Verdict(rid, True, Decimal("0.91"), 24_249_000))
    report = audit(world, world.replacing("complete", complete_with(world, verdicts=tampered)))
    assert found(report) == [("verdict", "median_mismatch")]
    assert "0.91" in report.discrepancies[0].message and "0.9085" in report.discrepancies[0].message


def test_a_verdict_the_scores_do_not_give(world: AuditWorld) -> None:
    rid = world.events["result alice"].id
    tampered = verdicts(world, "alice", Verdict(rid, False, Decimal("0.9085")))
    report = audit(world, world.replacing("complete", complete_with(world, verdicts=tampered)))
    assert found(report) == [("verdict", "verdict_mismatch")]


def test_a_reward_that_is_not_the_split_rule(world: AuditWorld) -> None:
    """Half the provider share is 24 249 500 msat; every payout is whole satoshis: 24 249 000."""
    rid = world.events["result alice"].id
    tampered = verdicts(world, "alice", Verdict(rid, True, Decimal("0.9085"), 24_249_500))
    report = audit(world, world.replacing("complete", complete_with(world, verdicts=tampered)))
    assert found(report) == [("rewards", "reward_mismatch")]


def test_a_decision_without_its_split(world: AuditWorld) -> None:
    report = audit(world, world.replacing("complete", complete_with(world, split=None)))
    assert found(report) == [("split", "no_split")]
    statuses = {f.check: f.status for f in report.findings}
    assert statuses["verdict"] is Status.NOT_APPLICABLE and statuses["rewards"] is Status.NOT_APPLICABLE


def test_a_score_by_someone_not_a_validator(world: AuditWorld) -> None:
    body = world.bodies["complete"]
    extra = PublishedScore(world.events["result alice"].id, world.keys["mallory"].public_key_hex, Decimal("1"))
    tmpl = complete_with(world, scores=(*body.scores, extra))
    # mallory's score also moves alice's median: the recomputation reports that too.
    assert ("scores", "score_not_by_validator") in found(audit(world, world.replacing("complete", tmpl)))


def test_changed_fee_terms_are_a_warning_not_a_discrepancy(world: AuditWorld) -> None:
    terms = replace(EXAMPLE_TERMS, fee_ppm=20_000)
    tmpl = build_announcement(Announcement(d="fedstr-escrow", name="audit test escrow", about="", terms=terms))
    report = audit(world, world.replacing("announcement", tmpl))
    assert report.ok
    assert [(f.check, f.code) for f in report.warnings] == [("terms", "fee_differs_from_terms")]


def _paid(world: AuditWorld, name: str, **changes: object) -> Template:
    return build_reward_paid(replace(world.bodies[name], **changes))


def test_a_receipt_whose_invoice_has_another_payment_hash(world: AuditWorld) -> None:
    paid = world.bodies["paid alice"]
    other = world.invoice("alice", paid.payment.amount_msat, preimage_and_hash("another")[1])
    report = audit(world, world.replacing("paid alice", _paid(world, "paid alice", bolt11=other)))
    assert found(report) == [("receipt", "bolt11_hash_mismatch")]


def test_a_receipt_whose_invoice_is_for_another_amount(world: AuditWorld) -> None:
    paid = world.bodies["paid alice"]
    other = world.invoice("alice", 24_000_000, paid.payment.payment_hash)
    report = audit(world, world.replacing("paid alice", _paid(world, "paid alice", bolt11=other)))
    assert found(report) == [("receipt", "bolt11_amount_mismatch")]


def test_a_receipt_without_its_invoice(world: AuditWorld) -> None:
    report = audit(world, world.replacing("paid alice", _paid(world, "paid alice", bolt11=None)))
    assert found(report) == [("receipt", "no_bolt11")]


def test_a_receipt_whose_preimage_does_not_hash_to_its_hash(world: AuditWorld) -> None:
    """The builder refuses to write one: the tags are edited by hand, then signed."""
    event = world.events["paid alice"]
    tags = tuple(
        ("payment", t[1], hashlib.sha256(b"not it").hexdigest(), t[3], t[4]) if t[0] == "payment" else t
        for t in event.tags
    )
    report = audit(world, world.replacing("paid alice", Template(event.kind, tags, event.content)))
    assert found(report) == [("receipt", "unparseable")]
    assert "invalid_payment" in report.discrepancies[0].message


def test_a_receipt_for_another_amount_than_the_reward(world: AuditWorld) -> None:
    rid = world.events["result alice"].id
    tmpl = build_reward_paid(world.receipt("alice", rid, 24_250_000))
    report = audit(world, world.replacing("paid alice", tmpl))
    assert found(report) == [("receipt", "amount_mismatch")]


def test_a_receipt_paying_someone_else_than_the_provider(world: AuditWorld) -> None:
    rid = world.events["result alice"].id
    tmpl = build_reward_paid(world.receipt("mallory", rid, 24_249_000))
    report = audit(world, world.replacing("paid alice", tmpl))
    assert found(report) == [("receipt", "wrong_payee")]


def test_a_provider_paid_twice(world: AuditWorld) -> None:
    paid = world.bodies["paid alice"]
    preimage, payment_hash = preimage_and_hash("alice again")
    again = replace(
        paid,
        payment=replace(paid.payment, payment_hash=payment_hash, preimage=preimage),
        bolt11=world.invoice("alice", 24_249_000, payment_hash),
    )
    report = audit(world, world.plus(build_reward_paid(again)))
    assert found(report) == [("receipt", "paid_twice")]


def test_a_receipt_for_a_rejected_result(world: AuditWorld) -> None:
    tmpl = build_reward_paid(world.receipt("carol", world.events["result carol"].id, 24_249_000))
    report = audit(world, world.plus(tmpl))
    assert found(report) == [("receipt", "receipt_for_rejected")]


def test_a_validator_fee_for_a_validator_whose_scores_did_not_count(world: AuditWorld) -> None:
    tmpl = build_reward_paid(world.receipt("mallory", world.events["evaluation validator 1"].id, 500_000))
    report = audit(world, world.plus(tmpl))
    assert sorted(found(report)) == [("receipt", "unknown_reward"), ("receipt", "wrong_payee")]


def test_a_model_key_for_a_rejected_result(world: AuditWorld) -> None:
    report = audit(world, world.plus(build_model_key(world.model_key("carol"))))
    assert found(report) == [("model key", "key_for_rejected")]


def test_a_refund_as_well_as_rewards(world: AuditWorld) -> None:
    refund = Refunded(world.job.id, world.keys["customer"].public_key_hex, "no_accepted_result", BID)
    report = audit(world, world.plus(build_refunded(refund)))
    assert found(report) == [("refund", "refund_and_release")]
    assert [(f.check, f.code) for f in report.warnings] == [("refund", "refund_despite_accepted")]


def test_a_refund_larger_than_the_funding(world: AuditWorld) -> None:
    kept = [e for n, e in world.events.items() if not n.startswith(("paid ", "key "))]
    refund = Refunded(world.job.id, world.keys["customer"].public_key_hex, "operator", BID + 1_000)
    report = audit(world, [*kept, world.sign("escrow", build_refunded(refund))])
    assert found(report) == [("refund", "refund_exceeds_funding")]


def test_an_event_posing_as_the_escrow_is_reported_and_ignored(world: AuditWorld) -> None:
    """mallory signs a receipt for rejected carol: a warning naming it, never read as the escrow's,
    and no discrepancy (a third party cannot make a clean job fail its audit)."""
    tmpl = build_reward_paid(world.receipt("carol", world.events["result carol"].id, 24_249_000))
    report = audit(world, world.plus(tmpl, signer="mallory"))
    assert found(report) == [] and report.ok
    assert [(f.check, f.code) for f in report.warnings] == [("signatures", "impostor")]


def test_an_event_with_a_bad_signature_claiming_the_escrow(world: AuditWorld) -> None:
    forged = world.events["paid alice"].to_dict()
    forged["sig"] = "00" * 64
    events = [e for n, e in world.events.items() if n != "paid alice"]
    report = audit(world, [*events, forged])
    assert found(report) == [] and [(f.check, f.code) for f in report.warnings] == [("signatures", "forged")]


def test_the_escrow_given_by_the_auditor_must_be_the_jobs(world: AuditWorld) -> None:
    report = audit(world, world.all(), escrow=world.keys["mallory"].public_key_hex)
    assert found(report) == [("job", "other_escrow")]


def test_without_the_job_request_nothing_can_be_audited(world: AuditWorld) -> None:
    with pytest.raises(AuditFetchError):
        audit(world, [e for n, e in world.events.items() if n != "job"])


# ---- unreadable scores (protocol.md §6 rule 5) -----------------------------------------------


def test_an_unreadable_score_at_the_median_rejects_the_result_unreadable(world: AuditWorld) -> None:
    carol = world.events["result carol"].id
    v1 = world.keys["validator 1"].public_key_hex
    body = world.bodies["complete"]
    scores = tuple(replace(s, value=None) if (s.result_id, s.validator) == (carol, v1) else s for s in body.scores)
    honest = complete_with(
        world, scores=scores, verdicts=verdicts(world, "carol", Verdict(carol, False, None, None, True))
    )
    assert audit(world, world.replacing("complete", honest)).ok
    dishonest = complete_with(world, scores=scores)  # still says "rejected 0.55"
    assert found(audit(world, world.replacing("complete", dishonest))) == [("verdict", "verdict_mismatch")]


VALIDATION = Validation("accuracy", Direction.MAX, Decimal("0.85"), 2)
SPLIT = MoneySplit(10_000_000, 100_000, 0, 3, 9_900_000)


def test_an_unreadable_score_off_the_median_does_not_decide() -> None:
    scores = {"v1": None, "v2": Decimal("0.9"), "v3": Decimal("0.95")}
    got = recompute([Scored("a", "p", scores)], validation=VALIDATION, policy="best", split=SPLIT, validators=())
    verdict = got.verdict("a")
    assert verdict is not None and verdict.accepted and verdict.median == Decimal("0.9")
    two_bad = {"v1": None, "v2": None, "v3": Decimal("0.95")}
    got = recompute([Scored("a", "p", two_bad)], validation=VALIDATION, policy="best", split=SPLIT, validators=())
    assert got.unreadable == {"a"} and got.verdict("a") == replace(
        verdict, accepted=False, median=None, reward_msat=0, unreadable=True
    )


def test_an_unreadable_score_is_the_worst_in_either_direction() -> None:
    low = Validation("loss", Direction.MIN, Decimal("0.2"), 2)
    scores = {"v1": None, "v2": Decimal("0.1")}
    for validation in (VALIDATION, low):
        got = recompute([Scored("a", "p", scores)], validation=validation, policy="best", split=SPLIT, validators=())
        assert got.unreadable == {"a"} and not got.decision.accepted


def test_a_tie_goes_to_the_candidate_received_first() -> None:
    same = {"v1": Decimal("0.9"), "v2": Decimal("0.9")}
    split = MoneySplit(10_000_000, 100_000, 0, 0, 9_900_000)
    for order in (["b", "a"], ["a", "b"]):
        got = recompute(
            [Scored(i, "p" + i, same) for i in order], validation=VALIDATION, policy="best", split=split, validators=()
        )
        assert got.decision.provider_rewards == {order[0]: 9_900_000}


def test_fewer_scores_than_the_quorum_is_no_quorum() -> None:
    got = recompute(
        [Scored("a", "p", {"v1": Decimal("1")})], validation=VALIDATION, policy="split", split=SPLIT, validators=()
    )
    verdict = got.verdict("a")
    assert verdict is not None and not verdict.accepted and verdict.median is None and got.unreadable == frozenset()


def test_the_command_exits_2_when_no_relay_answers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "ab" * 32, "--relay", "ws://127.0.0.1:1", "--timeout", "2"]) == 2
    err = capsys.readouterr().err
    assert "fetching from 1 relay…" in err and "could not fetch the job" in err


def test_the_command_refuses_a_malformed_job_id_or_relay(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "not-an-id", "--relay", "wss://relay.example.org"]) == 2
    assert main(["audit", "ab" * 32, "--relay", "https://relay.example.org"]) == 2
    assert "ws:// or wss://" in capsys.readouterr().err


# ---------------------------------------------------------------------------- a fallback round (§6b)


def _fallback(world: AuditWorld, validator: str, *, previous: str | None = None) -> Template:
    from service.nostr.protocol import EvalRound, build_evaluation_request, parse_evaluation_request

    first = parse_evaluation_request(world.events["evaluation request"])
    return build_evaluation_request(
        replace(
            first,
            validators=(world.keys[validator].public_key_hex,),
            round=EvalRound.FALLBACK,
            previous=previous or world.events["evaluation request"].id,
            deadline=first.deadline + 600,
        )
    )


def test_a_fallback_round_when_every_named_validator_scored_is_reported(world: AuditWorld) -> None:
    """Both named validators scored every candidate: a fallback round had no reason to be, and
    mallory's scores could not count."""
    problems = found(audit(world, world.plus(_fallback(world, "mallory"))))
    assert ("fallback", "too_many_fallback_validators") in problems
    assert ("fallback", "wrong_candidates") in problems


def test_a_fallback_round_asking_a_named_validator_or_not_following_the_first_is_reported(world: AuditWorld) -> None:
    assert ("fallback", "barred_validator") in found(audit(world, world.plus(_fallback(world, "validator 1"))))
    other = _fallback(world, "mallory", previous="ee" * 32)
    assert ("fallback", "wrong_previous") in found(audit(world, world.plus(other)))


def test_no_fallback_round_is_not_applicable(world: AuditWorld) -> None:
    statuses = {f.check: f.status for f in audit(world, world.all()).findings}
    assert statuses["fallback"] is Status.NOT_APPLICABLE
