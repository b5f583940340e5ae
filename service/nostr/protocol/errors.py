"""Codec errors: one stable, specific reason code per fault.

Every parse function raises :class:`CodecError` for anything it refuses; its
``reason`` is a :class:`CodecErrorReason` (a ``str`` enum, safe to store, to log
and to publish in a ``["status","error","<reason>: <message>"]`` feedback tag).
``message`` is a short English explanation; it never echoes attacker-controlled
text (only tag names and limits), so it can be published as is.

:data:`REASON_DESCRIPTIONS` is the one-line meaning of every code, used to build
the reason table in ``docs/protocol.md``.
"""

from __future__ import annotations

import enum


class CodecErrorReason(enum.StrEnum):
    """Why an event was refused. Values are stable: callers map them, customers read them."""

    # --- any kind ---------------------------------------------------------------------
    WRONG_KIND = "wrong_kind"
    NOT_FOR_US = "not_for_us"
    DUPLICATE_TAG = "duplicate_tag"
    MISSING_EVENT_REF = "missing_event_ref"
    INVALID_EVENT_REF = "invalid_event_ref"
    AMBIGUOUS_EVENT_REFS = "ambiguous_event_refs"
    MISSING_PUBKEY_REF = "missing_pubkey_ref"
    INVALID_PUBKEY_REF = "invalid_pubkey_ref"
    INVALID_RELAY = "invalid_relay"
    INVALID_EXPIRATION = "invalid_expiration"
    EXPIRED = "expired"
    # --- job request (5701) -----------------------------------------------------------
    INVALID_ESCROW = "invalid_escrow"
    UNSUPPORTED_INPUT = "unsupported_input"
    MISSING_SHARDS = "missing_shards"
    INVALID_SHARD = "invalid_shard"
    INVALID_SHARD_INDEX = "invalid_shard_index"
    DUPLICATE_SHARD = "duplicate_shard"
    TOO_MANY_SHARDS = "too_many_shards"
    INVALID_PREVIOUS_JOB = "invalid_previous_job"
    INVALID_PARAM = "invalid_param"
    DUPLICATE_PARAM = "duplicate_param"
    MISSING_BID = "missing_bid"
    INVALID_BID = "invalid_bid"
    BID_TOO_LOW = "bid_too_low"
    BID_TOO_HIGH = "bid_too_high"
    INVALID_VALIDATOR = "invalid_validator"
    DUPLICATE_VALIDATOR = "duplicate_validator"
    TOO_MANY_VALIDATORS = "too_many_validators"
    VALIDATOR_IS_CUSTOMER = "validator_is_customer"
    VALIDATOR_IS_ESCROW = "validator_is_escrow"
    MISSING_VALIDATION = "missing_validation"
    INVALID_VALIDATION = "invalid_validation"
    INVALID_METRIC = "invalid_metric"
    INVALID_DIRECTION = "invalid_direction"
    INVALID_THRESHOLD = "invalid_threshold"
    INVALID_QUORUM = "invalid_quorum"
    QUORUM_OUT_OF_RANGE = "quorum_out_of_range"
    MISSING_PAYOUT = "missing_payout"
    INVALID_PAYOUT = "invalid_payout"
    INVALID_VALIDATOR_FEE = "invalid_validator_fee"
    VALIDATOR_FEE_WITHOUT_VALIDATORS = "validator_fee_without_validators"
    FEES_EXCEED_BID = "fees_exceed_bid"
    VALIDATOR_FEE_TOO_LOW = "validator_fee_too_low"
    REWARD_TOO_SMALL = "reward_too_small"
    MISSING_DEADLINE = "missing_deadline"
    INVALID_DEADLINE = "invalid_deadline"
    DEADLINE_PASSED = "deadline_passed"
    DEADLINE_TOO_SOON = "deadline_too_soon"
    DEADLINE_ORDER = "deadline_order"
    DEADLINE_TOO_FAR = "deadline_too_far"
    INVALID_MODE = "invalid_mode"
    MODE_NOT_OFFERED = "mode_not_offered"
    HOLD_WINDOW_EXCEEDED = "hold_window_exceeded"
    EXPIRES_BEFORE_DEADLINE = "expires_before_deadline"
    INVALID_REFUND = "invalid_refund"
    INVALID_PROVIDER = "invalid_provider"
    DUPLICATE_PROVIDER = "duplicate_provider"
    TOO_MANY_PROVIDERS = "too_many_providers"
    PROVIDER_CONFLICT = "provider_conflict"
    # --- result (6701) ----------------------------------------------------------------
    WRONG_JOB = "wrong_job"
    WRONG_CUSTOMER = "wrong_customer"
    SIGNER_IS_CUSTOMER = "signer_is_customer"
    SIGNER_IS_ESCROW = "signer_is_escrow"
    SIGNER_IS_VALIDATOR = "signer_is_validator"
    MISSING_SHARD_REF = "missing_shard_ref"
    UNKNOWN_SHARD = "unknown_shard"
    SHARD_MISMATCH = "shard_mismatch"
    PROVIDER_NOT_ALLOWED = "provider_not_allowed"
    SHARD_NOT_ASSIGNED = "shard_not_assigned"
    MISSING_MODEL = "missing_model"
    INVALID_MODEL = "invalid_model"
    INVALID_MODEL_SHA256 = "invalid_model_sha256"
    INVALID_MODEL_SIZE = "invalid_model_size"
    INVALID_SEALED_MODEL = "invalid_sealed_model"
    MODEL_AND_SEALED = "model_and_sealed"
    INVALID_KEY = "invalid_key"
    DUPLICATE_KEY = "duplicate_key"
    MISSING_KEY = "missing_key"
    KEY_RECIPIENT_NOT_ALLOWED = "key_recipient_not_allowed"
    SEALING_REQUIRED = "sealing_required"
    SEALING_NEEDS_VALIDATORS = "sealing_needs_validators"
    INVALID_PAYOUT_DESTINATION = "invalid_payout_destination"
    INVALID_AMOUNT = "invalid_amount"
    INVALID_BOLT11 = "invalid_bolt11"
    # --- evaluation request / result (5702 / 6702) ------------------------------------
    MISSING_CANDIDATES = "missing_candidates"
    INVALID_CANDIDATE = "invalid_candidate"
    DUPLICATE_CANDIDATE = "duplicate_candidate"
    MISSING_SCORES = "missing_scores"
    INVALID_SCORE = "invalid_score"
    INVALID_SCORE_VALUE = "invalid_score_value"
    NON_FINITE_SCORE = "non_finite_score"
    SCORE_OUT_OF_RANGE = "score_out_of_range"
    DUPLICATE_SCORE = "duplicate_score"
    INVALID_FALLBACK_REQUEST = "invalid_fallback_request"
    # --- feedback (7000) and deletion (5) ---------------------------------------------
    MISSING_STATUS = "missing_status"
    INVALID_STATUS = "invalid_status"
    UNSUPPORTED_FEEDBACK = "unsupported_feedback"
    MISSING_AMOUNT = "missing_amount"
    INVALID_ESCROW_STATE = "invalid_escrow_state"
    INVALID_VERDICT = "invalid_verdict"
    INVALID_PAYMENT = "invalid_payment"
    INVALID_KIND_REF = "invalid_kind_ref"
    INVALID_APPEAL_REASON = "invalid_appeal_reason"
    # --- announcement (31990) and shard decryption ------------------------------------
    INVALID_ANNOUNCEMENT = "invalid_announcement"
    UNDECRYPTABLE_SHARD = "undecryptable_shard"
    INVALID_SEALING = "invalid_sealing"
    INVALID_BASELINE = "invalid_baseline"
    INVALID_ROUND_PARAM = "invalid_round_param"
    UNDECRYPTABLE_SCORES = "undecryptable_scores"
    SCORES_AND_ENCRYPTED = "scores_and_encrypted"
    INVALID_POOL = "invalid_pool"
    INVALID_CLAIM_BY = "invalid_claim_by"
    PROVIDER_CAPABILITIES = "provider_capabilities"
    # --- provider capabilities (31990 by a provider, §1a) ----------------------------------
    INVALID_CAPABILITIES = "invalid_capabilities"
    INVALID_SPLIT = "invalid_split"


R = CodecErrorReason

REASON_DESCRIPTIONS: dict[CodecErrorReason, str] = {
    R.WRONG_KIND: "the event's kind is not the one this parser reads",
    R.NOT_FOR_US: "the job names no escrow tag, or another escrow's key, or another escrow is "
    "addressed (`p`); the caller ignores it silently, never answers it",
    R.DUPLICATE_TAG: "a tag that must appear at most once appears twice",
    R.MISSING_EVENT_REF: "a required `e` tag is absent",
    R.INVALID_EVENT_REF: "an `e` tag is malformed (arity, id, relay hint, unknown marker)",
    R.AMBIGUOUS_EVENT_REFS: "`e` tags mix marked and unmarked forms, repeat a role, are too many, "
    "or name one id for two roles",
    R.MISSING_PUBKEY_REF: "a required `p` tag is absent",
    R.INVALID_PUBKEY_REF: "a `p` tag is malformed (arity, pubkey, relay hint)",
    R.INVALID_RELAY: "a relay URL (`relays` tag or relay hint) is not ws:// or wss://",
    R.INVALID_EXPIRATION: "the NIP-40 `expiration` tag is malformed",
    R.EXPIRED: "the NIP-40 expiration time is not after `now`",
    R.INVALID_ESCROW: "the `escrow` tag names us but is malformed (arity, relay hint)",
    R.UNSUPPORTED_INPUT: "an `i` tag of a type other than `url`, `nip44` or `job`",
    R.MISSING_SHARDS: "no shard (`i` … `url`/`nip44`) tag",
    R.INVALID_SHARD: "a shard tag is malformed (arity, URL, relay hint, NIP-44 payload, provider key)",
    R.INVALID_SHARD_INDEX: "a shard label is not `shard-<k>` with k a canonical integer",
    R.DUPLICATE_SHARD: "two shards carry the same index",
    R.TOO_MANY_SHARDS: "more shards than the escrow's `max_shards`",
    R.INVALID_PREVIOUS_JOB: 'the previous-round link `["i", <id>, "job"]` is malformed',
    R.INVALID_PARAM: "a `param` tag is malformed (arity, name charset, value), or too many",
    R.DUPLICATE_PARAM: "two `param` tags share a name",
    R.MISSING_BID: "no `bid` tag",
    R.INVALID_BID: "the bid is not a canonical msat amount",
    R.BID_TOO_LOW: "the bid is below the escrow's `min_bid_msat`",
    R.BID_TOO_HIGH: "the bid is above the escrow's `max_bid_msat`",
    R.INVALID_VALIDATOR: "a `validator` tag is malformed",
    R.DUPLICATE_VALIDATOR: "a validator is named twice",
    R.TOO_MANY_VALIDATORS: "more validators than the escrow's `max_validators`",
    R.VALIDATOR_IS_CUSTOMER: "the customer names itself as a validator (omit validators instead)",
    R.VALIDATOR_IS_ESCROW: "the escrow is named as a validator",
    R.MISSING_VALIDATION: "no `validation` tag",
    R.INVALID_VALIDATION: "the `validation` tag has the wrong arity",
    R.INVALID_METRIC: "the metric name is empty, too long or outside `[A-Za-z0-9_.:@/+-]`",
    R.INVALID_DIRECTION: "the direction is not `max` or `min`",
    R.INVALID_THRESHOLD: "the threshold is not a plain finite decimal",
    R.INVALID_QUORUM: "the quorum is not a canonical integer",
    R.QUORUM_OUT_OF_RANGE: "quorum < 1, or > the number of validators (1 when the customer validates)",
    R.MISSING_PAYOUT: "no `payout` policy tag",
    R.INVALID_PAYOUT: "the payout policy is not `best` or `split`",
    R.INVALID_VALIDATOR_FEE: "the `validator_fee` is not a canonical msat amount",
    R.VALIDATOR_FEE_WITHOUT_VALIDATORS: "a non-zero `validator_fee` with no validator (the customer validates)",
    R.FEES_EXCEED_BID: "escrow fee + validator fees >= bid: nothing left for providers",
    R.VALIDATOR_FEE_TOO_LOW: "a non-zero `validator_fee` below the escrow's `min_payout_msat`",
    R.REWARD_TOO_SMALL: "the smallest reward the job may pay (under `split`: the provider share divided among "
    "shards x `max_results_per_shard` results) is below the escrow's `min_payout_msat`",
    R.MISSING_DEADLINE: "no `deadline` tag",
    R.INVALID_DEADLINE: "the `deadline` tag is malformed",
    R.DEADLINE_PASSED: "the results deadline is not after `now`",
    R.DEADLINE_TOO_SOON: "the results deadline is less than `min_results_window_s` after `now`",
    R.DEADLINE_ORDER: "the validation deadline is not after the results deadline",
    R.DEADLINE_TOO_FAR: "the validation deadline is more than `max_job_duration_s` after `now`",
    R.INVALID_MODE: "the mode is not `hold`, `custodial` or `auto`",
    R.MODE_NOT_OFFERED: "the requested mode is not among the escrow's `modes`",
    R.HOLD_WINDOW_EXCEEDED: "mode `hold` (or `auto` when only hold is offered) with a validation deadline "
    "more than `max_hold_seconds` after `now`",
    R.EXPIRES_BEFORE_DEADLINE: "the NIP-40 `expiration` is before the validation deadline: relays would drop the "
    "request while providers and validators still need it",
    R.INVALID_REFUND: "the `refund` destination is neither a lud16 address nor an lnurl",
    R.INVALID_PROVIDER: "a provider `p` tag is malformed",
    R.DUPLICATE_PROVIDER: "a provider is named twice",
    R.TOO_MANY_PROVIDERS: "more provider `p` tags than the limit",
    R.PROVIDER_CONFLICT: "a named provider (a `p` tag or a shard's recipient) is the customer, "
    "the escrow or a validator",
    R.WRONG_JOB: "the result's `e` tag is not this job's id",
    R.WRONG_CUSTOMER: "the result's `p` tag is not this job's customer",
    R.SIGNER_IS_CUSTOMER: "the result is signed by the customer",
    R.SIGNER_IS_ESCROW: "the result is signed by the escrow",
    R.SIGNER_IS_VALIDATOR: "the result is signed by a validator",
    R.MISSING_SHARD_REF: "the result has no shard `i` tag",
    R.UNKNOWN_SHARD: "the result names a shard label the job does not have",
    R.SHARD_MISMATCH: "the result's shard tag is not a verbatim copy of the job's",
    R.PROVIDER_NOT_ALLOWED: "the signer is not among the job's `p` providers",
    R.SHARD_NOT_ASSIGNED: "the shard is encrypted to another provider",
    R.MISSING_MODEL: "the result has no `model` tag",
    R.INVALID_MODEL: "the `model` tag is malformed (arity, URL)",
    R.INVALID_MODEL_SHA256: "the model hash is not 64 lowercase hex characters",
    R.INVALID_MODEL_SIZE: "the model size is not a canonical positive integer within limits",
    R.INVALID_SEALED_MODEL: "the `sealed` tag is malformed (arity, URL, hashes, sizes: the ciphertext is the model "
    "+ 28 bytes)",
    R.MODEL_AND_SEALED: "a result carries both a `model` and a `sealed` tag",
    R.INVALID_KEY: "a `key` tag is malformed (arity, recipient pubkey, NIP-44 payload shape), or too many",
    R.DUPLICATE_KEY: "one recipient has two `key` tags",
    R.MISSING_KEY: "a sealed result has no `key` for the escrow or for one of the job's designated validators",
    R.KEY_RECIPIENT_NOT_ALLOWED: "a sealed result's `key` is for someone other than the escrow and the job's "
    "validators (the customer gets the key from the escrow, when the provider is paid)",
    R.SEALING_REQUIRED: "the job requires sealed results (`sealing required`) and the result is plain",
    R.SEALING_NEEDS_VALIDATORS: "sealed results need named validators: the customer would validate, so it "
    "would hold the key before paying",
    R.INVALID_PAYOUT_DESTINATION: "the result's `payout` tag is malformed (type, lud16, lnurl)",
    R.INVALID_AMOUNT: "an `amount` tag is malformed or its amount is not a canonical msat amount > 0",
    R.INVALID_BOLT11: "a BOLT11 invoice string does not have the shape of one",
    R.MISSING_CANDIDATES: "the evaluation request has no candidate",
    R.INVALID_CANDIDATE: "a candidate `i` tag is malformed",
    R.DUPLICATE_CANDIDATE: "a candidate is listed twice",
    R.MISSING_SCORES: "the evaluation result has no `score` tag",
    R.INVALID_SCORE: "a `score` tag is malformed (arity, result id, model hash)",
    R.INVALID_SCORE_VALUE: "a score value is not a plain decimal",
    R.NON_FINITE_SCORE: "a score value is NaN or infinite",
    R.SCORE_OUT_OF_RANGE: "a score (or threshold) has more than 15 digits before the point or 12 after it",
    R.DUPLICATE_SCORE: "one evaluation result scores the same result twice",
    R.INVALID_FALLBACK_REQUEST: "a fallback evaluation request lacks its `previous` link, a first-round one "
    "carries one or a `key` tag, or a `key` tag is malformed, repeated, or not for a candidate and a named validator",
    R.MISSING_STATUS: "the feedback has no `status` tag",
    R.INVALID_STATUS: "the `status` tag is malformed or does not fit this feedback",
    R.UNSUPPORTED_FEEDBACK: "a feedback status the escrow does not act on (ignored)",
    R.MISSING_AMOUNT: "a required `amount` tag is absent",
    R.INVALID_ESCROW_STATE: "the `escrow` state tag of an escrow feedback is malformed or unknown",
    R.INVALID_VERDICT: "an `accepted`/`rejected` tag is malformed",
    R.INVALID_PAYMENT: "a `payment` receipt tag is malformed, or the preimage does not hash to the hash",
    R.INVALID_KIND_REF: "a deletion's `k` tag is not a kind number",
    R.INVALID_APPEAL_REASON: "an appeal's reason (its content) is longer than 1000 characters or holds control "
    "characters",
    R.INVALID_ANNOUNCEMENT: "the announcement's `d`/`k` tags or JSON terms are malformed",
    R.UNDECRYPTABLE_SHARD: "a NIP-44 shard does not decrypt (wrong key, tampered) or is not a URL",
    R.INVALID_SEALING: "the `sealing` tag is not `required` or `optional`",
    R.INVALID_BASELINE: "a `baseline` tag is malformed (model sha256, URL, minimum improvement >= 0)",
    R.INVALID_ROUND_PARAM: 'the `["param", "round", …]` value is not `fallback` or `single`',
    R.UNDECRYPTABLE_SCORES: "sealed scores (`encrypted`) do not decrypt for the escrow or are not a JSON list "
    "of `score` tags",
    R.SCORES_AND_ENCRYPTED: "an evaluation result marked `encrypted` also carries `score` tags in the clear",
    R.INVALID_SPLIT: "a validation complete's `split` tag is malformed, or its parts do not add up to the bid",
    R.INVALID_POOL: "the announcement's validator pool is malformed (not a list of {pubkey, name})",
    R.INVALID_CLAIM_BY: "a reward claimable's or claim expired's `claim_by` tag is not one unix time",
    R.PROVIDER_CAPABILITIES: "a kind-31990 event marked `fedstr-provider` (its `d` or `t` tag) is a provider's "
    "capabilities (§1a), not an escrow's announcement",
    R.INVALID_CAPABILITIES: "a provider's capability event is malformed: its `d`/`k`/`t` tags, or its JSON "
    "(name, tasks, hardware, max_model_bytes, price_msat_per_shard, escrows)",
}


class CodecError(ValueError):
    """An event (or a value to build one from) was refused; ``reason`` is a :class:`CodecErrorReason`."""

    def __init__(self, reason: CodecErrorReason, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(f"{reason.value}: {message}")

    def feedback_text(self) -> str:
        """``"<reason>: <message>"``, the third item of an error ``status`` tag."""
        return f"{self.reason.value}: {self.message}"
