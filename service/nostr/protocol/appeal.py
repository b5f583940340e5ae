"""Appeals (kind 7000, protocol.md §6c): the appellant's appeal and the escrow's answers.

After validation is complete, while the job's appeal window is open (``appeal_window_s`` in the
terms), the customer or the provider of a rejected result may appeal:

==================================  ========================================  ====================
status / info                       tags                                      body
==================================  ========================================  ====================
processing / appeal                 ``["e", <job>, <relay>, "job"]``,          :class:`Appeal`
(by the appellant)                  ``["e", <result>, <relay>, "result"]``
                                    (a provider), ``["p", <escrow>]``
processing / appeal window          ``["appeal_by", <unix>]``                  :class:`AppealWindow`
payment-required / appeal fee       ``["amount", <msat>, <bolt11>]``           :class:`AppealFee`
processing / appeal round           ``["appeal", <unix>]``                     :class:`AppealRoundStarted`
==================================  ========================================  ====================

The escrow's answers carry the job ``["e", <job>]`` and the addressee ``["p", …]``. An appeal's
content is its reason: bounded text, read only to check its bounds, never stored or echoed.
Who may appeal, and when, is the engine's (stateful) rule; the codec checks shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.nostr.nip01 import Event

from .errors import CodecError, CodecErrorReason
from .fields import (
    Tag,
    Tags,
    Template,
    amount_tag,
    arity,
    check_text,
    event_refs,
    event_tag,
    expect_kind,
    format_timestamp,
    parse_amount_tag,
    parse_timestamp,
    placeholder_event,
    pubkey_tag,
    single,
    single_pubkey_ref,
    template,
)
from .terms import KIND_FEEDBACK

R = CodecErrorReason

INFO_APPEAL = "appeal"
INFO_APPEAL_WINDOW = "appeal window"
INFO_APPEAL_FEE = "appeal fee"
INFO_APPEAL_ROUND = "appeal round"
MAX_REASON = 1000  # characters of an appeal's reason (its content)


@dataclass(frozen=True, slots=True)
class Appeal:
    """An appeal of a job's decision, signed by the appellant (``result_id``: a provider's own
    rejected result; None: the customer's appeal)."""

    id: str
    appellant: str
    created_at: int
    job_id: str
    escrow: str
    result_id: str | None = None
    job_relay: str = ""


@dataclass(frozen=True, slots=True)
class AppealWindow:
    """The decision is published and waits until ``deadline`` for an appeal (to the customer and
    each provider)."""

    job_id: str
    addressee: str
    deadline: int
    job_relay: str = ""


@dataclass(frozen=True, slots=True)
class AppealFee:
    """The escrow's answer to a valid appeal: the fee invoice (plain), payable until the appeal deadline."""

    job_id: str
    appellant: str
    amount_msat: int
    bolt11: str
    job_relay: str = ""


@dataclass(frozen=True, slots=True)
class AppealRoundStarted:
    """The appeal fee is paid: pool validators score every candidate again until ``deadline``; their
    verdict is final. One per addressee (the customer, each provider)."""

    job_id: str
    addressee: str
    deadline: int
    job_relay: str = ""


def _status(tags: Tags) -> tuple[str, str]:
    tag = single(tags, "status", R.MISSING_STATUS)
    assert tag is not None
    arity(tag, 3, 3, R.INVALID_STATUS)
    return tag[1], tag[2]


def is_appeal(event: Event) -> bool:
    """Whether a kind-7000 event says it is an appeal (``["status", "processing", "appeal"]``):
    the engine routes it to :func:`parse_appeal` (which may still refuse it)."""
    return event.kind == KIND_FEEDBACK and any(
        len(t) == 3 and t[0] == "status" and t[1] == "processing" and t[2] == INFO_APPEAL for t in event.tags
    )


def parse_appeal(event: Event, *, escrow_pubkey: str | None = None) -> Appeal:
    """``escrow_pubkey``, if given, must be the ``p`` tag (else ``not_for_us``)."""
    expect_kind(event, KIND_FEEDBACK)
    tags = event.tags
    if _status(tags) != ("processing", INFO_APPEAL):
        raise CodecError(R.INVALID_STATUS, "an appeal's status is ['status', 'processing', 'appeal']")
    escrow, _ = single_pubkey_ref(tags)
    if escrow_pubkey is not None and escrow != escrow_pubkey:
        raise CodecError(R.NOT_FOR_US, "the appeal is addressed to someone else")
    refs = event_refs(tags, ("job", "result"), ("job",))
    check_text(event.content, R.INVALID_APPEAL_REASON, "the appeal's reason", MAX_REASON, empty=True)
    job = refs["job"]
    result = refs.get("result")
    return Appeal(
        id=event.id,
        appellant=event.pubkey,
        created_at=event.created_at,
        job_id=job.id,
        escrow=escrow,
        result_id=result.id if result is not None else None,
        job_relay=job.relay,
    )


def build_appeal(
    *, job_id: str, escrow: str, result_id: str | None = None, reason: str = "", job_relay: str = ""
) -> Template:
    """An appeal to sign with the appellant's key (the customer: no ``result_id``)."""
    tags: list[Tag] = [("status", "processing", INFO_APPEAL), event_tag(job_id, job_relay, "job")]
    if result_id is not None:
        tags.append(event_tag(result_id, job_relay, "result"))
    tags.append(pubkey_tag(escrow))
    result = template(KIND_FEEDBACK, tags, reason)
    parse_appeal(placeholder_event(result))
    return result


def _job_and_addressee(tags: Tags) -> tuple[str, str, str]:
    job = event_refs(tags, ("job",), ("job",))["job"]
    pubkey, _ = single_pubkey_ref(tags)
    return job.id, job.relay, pubkey


def _expect(tags: Tags, status: str, info: str) -> None:
    if _status(tags) != (status, info):
        raise CodecError(R.INVALID_STATUS, f"expected status {status!r} / {info!r}")


def _deadline(tags: Tags, name: str) -> int:
    tag = single(tags, name, R.INVALID_DEADLINE)
    if tag is None:
        raise CodecError(R.INVALID_DEADLINE, f"no {name!r} tag")
    arity(tag, 2, 2, R.INVALID_DEADLINE)
    return parse_timestamp(tag[1], R.INVALID_DEADLINE, f"{name} deadline")


def _finish(tags: list[Tag], parser: object, body: object) -> Template:
    result = template(KIND_FEEDBACK, tags, "")
    if parser(placeholder_event(result)) != body:  # type: ignore[operator]
        raise ValueError(f"{type(body).__name__} does not round-trip: check its fields' types")
    return result


def parse_appeal_window(event: Event) -> AppealWindow:
    expect_kind(event, KIND_FEEDBACK)
    _expect(event.tags, "processing", INFO_APPEAL_WINDOW)
    deadline = _deadline(event.tags, "appeal_by")
    job_id, relay, addressee = _job_and_addressee(event.tags)
    return AppealWindow(job_id, addressee, deadline, relay)


def build_appeal_window(window: AppealWindow) -> Template:
    tags: list[Tag] = [
        ("status", "processing", INFO_APPEAL_WINDOW),
        ("appeal_by", format_timestamp(window.deadline, R.INVALID_DEADLINE, "appeal deadline")),
        event_tag(window.job_id, window.job_relay),
        pubkey_tag(window.addressee),
    ]
    return _finish(tags, parse_appeal_window, window)


def parse_appeal_fee(event: Event) -> AppealFee:
    expect_kind(event, KIND_FEEDBACK)
    _expect(event.tags, "payment-required", INFO_APPEAL_FEE)
    amount = single(event.tags, "amount", R.MISSING_AMOUNT)
    assert amount is not None
    amount_msat, bolt11 = parse_amount_tag(amount, bolt11_required=True)
    assert bolt11 is not None
    job_id, relay, appellant = _job_and_addressee(event.tags)
    return AppealFee(job_id, appellant, amount_msat, bolt11, relay)


def build_appeal_fee(fee: AppealFee) -> Template:
    tags: list[Tag] = [
        ("status", "payment-required", INFO_APPEAL_FEE),
        amount_tag(fee.amount_msat, fee.bolt11),
        event_tag(fee.job_id, fee.job_relay),
        pubkey_tag(fee.appellant),
    ]
    return _finish(tags, parse_appeal_fee, fee)


def parse_appeal_round(event: Event) -> AppealRoundStarted:
    expect_kind(event, KIND_FEEDBACK)
    _expect(event.tags, "processing", INFO_APPEAL_ROUND)
    deadline = _deadline(event.tags, "appeal")
    job_id, relay, addressee = _job_and_addressee(event.tags)
    return AppealRoundStarted(job_id, addressee, deadline, relay)


def build_appeal_round(started: AppealRoundStarted) -> Template:
    tags: list[Tag] = [
        ("status", "processing", INFO_APPEAL_ROUND),
        ("appeal", format_timestamp(started.deadline, R.INVALID_DEADLINE, "appeal round deadline")),
        event_tag(started.job_id, started.job_relay),
        pubkey_tag(started.addressee),
    ]
    return _finish(tags, parse_appeal_round, started)
