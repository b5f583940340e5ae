"""The validation round: evaluation request (kind 5702, by the escrow) and evaluation
result (kind 6702, by a validator): protocol.md §6.

A 6702 references two events. Decision (protocol.md was silent on how to tell them
apart): the *marked* form ``["e", <id>, <relay-or-"">, "request"|"job"]`` is what we
write; the design reference's *order* form (first ``e`` = evaluation request, second
= job, no markers) is accepted too. Whether a score counts (designated validator,
sha256 equal to the result's, before the validation deadline, first score of that
validator for that result) is the engine's rule: it needs the stored request and results.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass, replace
from decimal import Decimal

from service.nostr import nip44
from service.nostr.nip01 import Event, SecretKey

from .errors import CodecError, CodecErrorReason
from .fields import (
    BASELINE,
    UNREADABLE,
    Tag,
    Template,
    arity,
    event_refs,
    event_tag,
    expect_kind,
    format_decimal,
    format_timestamp,
    is_url,
    named,
    parse_hex64,
    parse_pubkey_ref,
    parse_relay_hint,
    parse_score_value,
    parse_timestamp,
    placeholder_event,
    pubkey_tag,
    single_pubkey_ref,
    template,
)
from .shards import is_nip44_payload
from .terms import KIND_EVALUATION_REQUEST, KIND_EVALUATION_RESULT

R = CodecErrorReason

_METRIC = re.compile(r"[A-Za-z0-9_.:@/+\-]{1,64}")
REQUEST_ROLES = ("request", "job")
#: The events an evaluation request references: the job, and (a fallback round) the first request.
REQUEST_REFS = ("job", "previous")
#: A score value meaning "the sealed model did not open to its commitment" (protocol.md §6).


# ----------------------------------------------------------------- 5702 (escrow)


@dataclass(frozen=True, slots=True)
class Candidate:
    """``["i", <result event id>, "event", <relay-or-"">]``: one result to score."""

    result_id: str
    relay: str = ""


class EvalRound(enum.StrEnum):
    """Which round an evaluation request opens (``["param", "round", …]``; absent: the first)."""

    FIRST = "first"  # §6: the job's named validators
    FALLBACK = "fallback"  # §6b: validators from the escrow's pool, after the first round missed quorum
    APPEAL = "appeal"  # §6c: validators from the escrow's pool, after a paid appeal (its verdict is final)

    @property
    def pooled(self) -> bool:
        """A pool round (fallback or appeal): it links the first request as ``previous`` and may carry keys."""
        return self is not EvalRound.FIRST


@dataclass(frozen=True, slots=True)
class ValidatorKey:
    """``["key", <result id>, <validator pubkey>, <NIP-44 payload escrow -> validator>]``: a sealed
    candidate's content key for a validator the provider gave none (a fallback round, §6b)."""

    result_id: str
    validator: str
    payload: str


@dataclass(frozen=True, slots=True)
class EvaluationRequest:
    job_id: str
    candidates: tuple[Candidate, ...]
    validators: tuple[str, ...]
    metric: str
    deadline: int
    job_relay: str = ""
    # ``["baseline", <model sha256>, <url>]``: the job's baseline, which every validator scores too
    baseline: tuple[str, str] | None = None
    round: EvalRound = EvalRound.FIRST
    previous: str | None = None  # a fallback round's: the first evaluation request's id
    previous_relay: str = ""
    keys: tuple[ValidatorKey, ...] = ()  # a fallback round's keys of sealed candidates

    def key_for(self, result_id: str, validator: str) -> ValidatorKey | None:
        return next((k for k in self.keys if k.result_id == result_id and k.validator == validator), None)


def _read_param(tags: tuple[Tag, ...], name: str, *, required: bool = True) -> str | None:
    found = [tag for tag in named(tags, "param") if len(tag) >= 2 and tag[1] == name]
    if not found and not required:
        return None
    if len(found) != 1:
        raise CodecError(R.INVALID_PARAM, f"exactly one {name!r} param is required")
    arity(found[0], 3, 3, R.INVALID_PARAM)
    return found[0][2]


def _read_validator_keys(
    tags: tuple[Tag, ...], candidates: list[Candidate], validators: list[str]
) -> tuple[ValidatorKey, ...]:
    keys: list[ValidatorKey] = []
    ids = {c.result_id for c in candidates}
    for tag in named(tags, "key"):
        arity(tag, 4, 4, R.INVALID_FALLBACK_REQUEST)
        result_id = parse_hex64(tag[1], R.INVALID_FALLBACK_REQUEST, "key result id")
        validator = parse_hex64(tag[2], R.INVALID_FALLBACK_REQUEST, "key validator pubkey")
        if result_id not in ids or validator not in validators:
            raise CodecError(R.INVALID_FALLBACK_REQUEST, "a 'key' tag is not for a candidate and a named validator")
        if not is_nip44_payload(tag[3]):
            raise CodecError(R.INVALID_FALLBACK_REQUEST, "a 'key' payload must be a NIP-44 v2 payload")
        if any(k.result_id == result_id and k.validator == validator for k in keys):
            raise CodecError(R.INVALID_FALLBACK_REQUEST, "two 'key' tags for one candidate and validator")
        keys.append(ValidatorKey(result_id, validator, tag[3]))
    return tuple(keys)


def parse_evaluation_request(event: Event, *, kind: int = KIND_EVALUATION_REQUEST) -> EvaluationRequest:
    expect_kind(event, kind)
    tags = event.tags
    refs = event_refs(tags, REQUEST_REFS, ("job",))
    job = refs["job"]
    candidates: list[Candidate] = []
    for tag in named(tags, "i"):
        arity(tag, 3, 4, R.INVALID_CANDIDATE)
        if tag[2] != "event":
            raise CodecError(R.INVALID_CANDIDATE, "candidate input type must be 'event'")
        result_id = parse_hex64(tag[1], R.INVALID_CANDIDATE, "candidate result id")
        relay = parse_relay_hint(tag[3], R.INVALID_CANDIDATE, "candidate relay hint") if len(tag) == 4 else ""
        if any(c.result_id == result_id for c in candidates):
            raise CodecError(R.DUPLICATE_CANDIDATE, "a candidate is listed twice")
        candidates.append(Candidate(result_id, relay))
    if not candidates:
        raise CodecError(R.MISSING_CANDIDATES, "no candidate 'i' tag")
    validators: list[str] = []
    for tag in named(tags, "p"):
        pubkey, _ = parse_pubkey_ref(tag)
        if pubkey in validators:
            raise CodecError(R.DUPLICATE_VALIDATOR, "a validator is named twice")
        validators.append(pubkey)
    if not validators:
        raise CodecError(R.MISSING_PUBKEY_REF, "no validator 'p' tag")
    metric = _read_param(tags, "metric")
    assert metric is not None
    if _METRIC.fullmatch(metric) is None:
        raise CodecError(R.INVALID_METRIC, "metric must match [A-Za-z0-9_.:@/+-]{1,64}")
    deadline = parse_timestamp(_read_param(tags, "deadline") or "", R.INVALID_DEADLINE, "validation deadline")
    round_text = _read_param(tags, "round", required=False)
    if round_text is not None and round_text not in (EvalRound.FALLBACK, EvalRound.APPEAL):
        raise CodecError(
            R.INVALID_ROUND_PARAM, "an evaluation request's 'round' param can only be 'fallback' or 'appeal'"
        )
    eval_round = EvalRound(round_text) if round_text is not None else EvalRound.FIRST
    previous = refs.get("previous")
    if (previous is None) == eval_round.pooled:
        raise CodecError(
            R.INVALID_FALLBACK_REQUEST, "a pool round (and only one) links the first request as 'previous'"
        )
    keys = _read_validator_keys(tags, candidates, validators)
    if keys and eval_round is EvalRound.FIRST:
        raise CodecError(R.INVALID_FALLBACK_REQUEST, "a first-round request carries no 'key' tag")
    baselines = named(tags, "baseline")
    if len(baselines) > 1:
        raise CodecError(R.INVALID_BASELINE, "at most one 'baseline' tag")
    baseline = None
    if baselines:
        arity(baselines[0], 3, 3, R.INVALID_BASELINE)
        sha256 = parse_hex64(baselines[0][1], R.INVALID_BASELINE, "baseline model sha256")
        if not is_url(baselines[0][2]):
            raise CodecError(R.INVALID_BASELINE, "the baseline url must be a printable-ASCII URL with a scheme")
        baseline = (sha256, baselines[0][2])
    return EvaluationRequest(
        job_id=job.id,
        candidates=tuple(candidates),
        validators=tuple(validators),
        metric=metric,
        deadline=deadline,
        job_relay=job.relay,
        baseline=baseline,
        round=eval_round,
        previous=previous.id if previous is not None else None,
        previous_relay=previous.relay if previous is not None else "",
        keys=keys,
    )


def build_evaluation_request(request: EvaluationRequest, *, kind: int = KIND_EVALUATION_REQUEST) -> Template:
    fallback = request.round.pooled
    if fallback != (request.previous is not None):
        raise CodecError(R.INVALID_FALLBACK_REQUEST, "a pool round (and only one) names its previous request")
    # A fallback request's refs are marked (job, previous); a first round's single ref stays unmarked.
    tags: list[Tag] = [event_tag(request.job_id, request.job_relay, "job" if fallback else None)]
    if request.previous is not None:
        tags.append(event_tag(request.previous, request.previous_relay, "previous"))
    for candidate in request.candidates:
        parse_hex64(candidate.result_id, R.INVALID_CANDIDATE, "candidate result id")
        tags.append(
            (
                "i",
                candidate.result_id,
                "event",
                parse_relay_hint(candidate.relay, R.INVALID_CANDIDATE, "candidate relay hint"),
            )
        )
    tags += [pubkey_tag(validator) for validator in request.validators]
    tags.append(("param", "metric", request.metric))
    tags.append(("param", "deadline", format_timestamp(request.deadline, R.INVALID_DEADLINE, "deadline")))
    if request.baseline is not None:
        tags.append(("baseline", *request.baseline))
    if fallback:
        tags.append(("param", "round", request.round.value))
    tags += [("key", k.result_id, k.validator, k.payload) for k in request.keys]
    result = template(kind, tags, "")
    parse_evaluation_request(placeholder_event(result), kind=kind)
    return result


# --------------------------------------------------------------- 6702 (validator)


@dataclass(frozen=True, slots=True)
class Score:
    """``["score", <result id>, <value>, <model sha256>]``: one validator's score of one result
    (``result_id`` :data:`BASELINE`: of the job's baseline model).
    ``value`` None is ``"unreadable"``: a sealed model that did not open to its commitment."""

    result_id: str
    value: Decimal | None
    model_sha256: str

    @property
    def unreadable(self) -> bool:
        return self.value is None


@dataclass(frozen=True, slots=True)
class EvaluationResult:
    id: str
    validator: str
    created_at: int
    request_id: str
    job_id: str
    escrow: str
    scores: tuple[Score, ...]  # empty while sealed (see :func:`open_scores`)
    sealed_payload: str | None = None  # the NIP-44 payload of sealed scores (to the escrow)

    @property
    def sealed(self) -> bool:
        return self.sealed_payload is not None


def _read_score(tag: Tag) -> Score:
    arity(tag, 4, 4, R.INVALID_SCORE)
    _, result_id, value, sha256 = tag
    if result_id != BASELINE:
        parse_hex64(result_id, R.INVALID_SCORE, "scored result id")
    decimal = parse_score_value(value)  # None: unreadable
    parse_hex64(sha256, R.INVALID_SCORE, "scored model sha256")
    return Score(result_id, decimal, sha256)


def parse_evaluation_result(
    event: Event, *, escrow_pubkey: str | None = None, kind: int = KIND_EVALUATION_RESULT
) -> EvaluationResult:
    """A validator's scores. ``escrow_pubkey``, if given, must be the ``p`` tag (else ``not_for_us``)."""
    expect_kind(event, kind)
    tags = event.tags
    escrow, _ = single_pubkey_ref(tags)
    if escrow_pubkey is not None and escrow != escrow_pubkey:
        raise CodecError(R.NOT_FOR_US, "the evaluation result is addressed to another escrow")
    refs = event_refs(tags, REQUEST_ROLES, REQUEST_ROLES)
    result = EvaluationResult(
        id=event.id,
        validator=event.pubkey,
        created_at=event.created_at,
        request_id=refs["request"].id,
        job_id=refs["job"].id,
        escrow=escrow,
        scores=(),
    )
    if named(tags, "encrypted"):
        # Sealed scores (NIP-90's encrypted form): the score tags are the NIP-44 content, to the escrow.
        if named(tags, "score"):
            raise CodecError(R.SCORES_AND_ENCRYPTED, "sealed scores carry no 'score' tag in the clear")
        if not is_nip44_payload(event.content):
            raise CodecError(R.UNDECRYPTABLE_SCORES, "sealed scores must be a NIP-44 v2 payload")
        return replace(result, sealed_payload=event.content)
    return replace(result, scores=_read_scores(tags))


def _read_scores(tags: tuple[Tag, ...]) -> tuple[Score, ...]:
    scores: list[Score] = []
    seen: set[str] = set()
    for tag in named(tags, "score"):
        score = _read_score(tag)
        if score.result_id in seen:
            raise CodecError(R.DUPLICATE_SCORE, "one result is scored twice in this event")
        seen.add(score.result_id)
        scores.append(score)
    if not scores:
        raise CodecError(R.MISSING_SCORES, "no 'score' tag")
    return tuple(scores)


def open_scores(result: EvaluationResult, escrow: SecretKey) -> EvaluationResult:
    """The scores of a sealed evaluation result, read by the escrow it is encrypted to (the same
    checks as scores in the clear). A result in the clear is returned as it is."""
    if result.sealed_payload is None:
        return result
    try:
        conv = nip44.conversation_key(escrow.secret_bytes, result.validator)
        body = json.loads(nip44.decrypt(result.sealed_payload, conv))
    except (ValueError, RecursionError):  # Nip44Error is a ValueError, and so is a JSON error
        raise CodecError(R.UNDECRYPTABLE_SCORES, "the sealed scores do not decrypt for this escrow") from None
    if type(body) is not list or not all(
        type(tag) is list and all(type(item) is str for item in tag) and tag and tag[0] == "score" for tag in body
    ):
        raise CodecError(R.UNDECRYPTABLE_SCORES, "sealed scores must be a JSON list of 'score' tags")
    return replace(result, scores=_read_scores(tuple(tuple(tag) for tag in body)), sealed_payload=None)


def score_tag(score: Score) -> Tag:
    tag: Tag = (
        "score",
        score.result_id,
        UNREADABLE if score.value is None else format_decimal(score.value, R.INVALID_SCORE_VALUE, "score"),
        score.model_sha256,
    )
    if any(type(item) is not str for item in tag):
        raise TypeError("score result id and sha256 must be strings")
    return tag


def build_evaluation_result(
    *,
    request_id: str,
    job_id: str,
    escrow: str,
    scores: tuple[Score, ...],
    request_relay: str = "",
    job_relay: str = "",
    content: str = "",
    kind: int = KIND_EVALUATION_RESULT,
    seal_with: SecretKey | None = None,
    nonce: bytes | None = None,
) -> Template:
    """A validator's scores; ``seal_with`` (the validator's key): sealed, NIP-44-encrypted to the
    escrow until its decision (then ``content`` is the payload; ``nonce``: tests only)."""
    tags: list[Tag] = [
        event_tag(request_id, request_relay, "request"),
        event_tag(job_id, job_relay, "job"),
        pubkey_tag(escrow),
    ]
    score_tags = [score_tag(score) for score in scores]
    _read_scores(tuple(score_tags))
    if type(content) is not str:
        raise TypeError("content must be a string")
    if seal_with is not None:
        body = json.dumps([list(t) for t in score_tags], separators=(",", ":"))
        conv = nip44.conversation_key(seal_with.secret_bytes, escrow)
        tags.append(("encrypted",))
        result = template(kind, tags, nip44.encrypt(body, conv, nonce))
    else:
        result = template(kind, [*tags, *score_tags], content)
    parse_evaluation_result(placeholder_event(result), kind=kind)
    return result
