"""The escrow protocol codec: NIP-90-shaped events of the FEDSTR escrow (docs/protocol.md).

Pure functions, no I/O. ``parse_*`` functions take an event whose id and signature
were already checked (:func:`service.nostr.nip01.verify_event`) and return a frozen
dataclass, or raise :class:`CodecError` whose ``reason`` (:class:`CodecErrorReason`)
names the one fault found first. ``build_*`` functions return a :class:`Template`
``(kind, tags, content)`` to sign with :func:`service.nostr.nip01.sign_event`; each
refuses (``CodecError``) to write what its parser would refuse.

Modules, one per concept:

* :mod:`.errors` - :class:`CodecError`, the reason codes and their descriptions;
* :mod:`.fields` - amounts, hex, decimals, URLs, lud16/lnurl/bolt11 shapes, ``e``/``p`` tags;
* :mod:`.terms` - kinds, modes, policies, :class:`EscrowTerms`;
* :mod:`.announcement` - kind 31990 by the escrow (§1);
* :mod:`.capability` - kind 31990 by a provider: its capabilities (§1a);
* :mod:`.job` - kind 5701 (§2);
* :mod:`.shards` - its shard tags, plain and private (NIP-44);
* :mod:`.money` - the money split (§9);
* :mod:`.result` - kind 6701 (§5);
* :mod:`.sealing` - sealed results: the ``sealed``/``key`` tags and the AEAD (§5a);
* :mod:`.evaluation` - kinds 5702 / 6702 (§6);
* :mod:`.feedback` - kind 7000: offer, funded, verdicts, rewards, refund, errors, payee invoices;
* :mod:`.appeal` - kind 7000 appeals: the appeal, its fee invoice, the appeal round (§6c);
* :mod:`.deletion` - kind 5 (NIP-09);
* :mod:`.examples` - the example events of docs/protocol.md, built with fixed keys.

NIP-40 expiration lives in :mod:`service.nostr.nip40`.
"""

from __future__ import annotations

from service.bitcoin import MAX_MSAT

from .announcement import Announcement, PoolValidator, build_announcement, parse_announcement
from .appeal import (
    Appeal,
    AppealFee,
    AppealRoundStarted,
    AppealWindow,
    build_appeal,
    build_appeal_fee,
    build_appeal_round,
    build_appeal_window,
    is_appeal,
    parse_appeal,
    parse_appeal_fee,
    parse_appeal_round,
    parse_appeal_window,
)
from .capability import (
    CAPABILITY_TOPIC,
    Capabilities,
    TaskOffer,
    build_capabilities,
    parse_capabilities,
)
from .deletion import Deletion, build_deletion, parse_deletion
from .errors import REASON_DESCRIPTIONS, CodecError, CodecErrorReason
from .evaluation import (
    Candidate,
    EvalRound,
    EvaluationRequest,
    EvaluationResult,
    Score,
    ValidatorKey,
    build_evaluation_request,
    build_evaluation_result,
    open_scores,
    parse_evaluation_request,
    parse_evaluation_result,
)
from .feedback import (
    Cancelled,
    CancelReason,
    ClaimExpired,
    DeadlineExtension,
    ErrorFeedback,
    EscrowFeedback,
    EscrowOffer,
    FallbackStarted,
    Feedback,
    Funded,
    ModelKey,
    PaymentProof,
    PublishedScore,
    Refunded,
    RefundReason,
    RewardClaimable,
    RewardPaid,
    ValidationComplete,
    Verdict,
    build_cancelled,
    build_claim_expired,
    build_deadline_extension,
    build_error_feedback,
    build_escrow_offer,
    build_fallback_started,
    build_funded,
    build_model_key,
    build_payee_invoice,
    build_refunded,
    build_rejection,
    build_reward_claimable,
    build_reward_paid,
    build_validation_complete,
    parse_cancelled,
    parse_claim_expired,
    parse_deadline_extension,
    parse_error_feedback,
    parse_escrow_feedback,
    parse_escrow_offer,
    parse_fallback_started,
    parse_feedback,
    parse_funded,
    parse_model_key,
    parse_refunded,
    parse_reward_claimable,
    parse_reward_paid,
    parse_validation_complete,
)
from .fields import BASELINE, Invoice, Template
from .job import (
    Baseline,
    JobRequest,
    JobSpec,
    RoundParam,
    Validation,
    build_job_request,
    parse_job_request,
)
from .money import MoneySplit, money_split, split_shares, whole_sats
from .result import JobResult, ModelRef, PayoutAddress, build_result, parse_result
from .sealing import KeyEnvelope, Sealed, SealedModel, SealError, open_sealed, seal, sealed_model, unwrap_key, wrap_key
from .shards import Shard, decrypt_shard, encrypt_shard
from .terms import (
    KIND_ANNOUNCEMENT,
    KIND_DELETION,
    KIND_EVALUATION_REQUEST,
    KIND_EVALUATION_RESULT,
    KIND_FEEDBACK,
    KIND_JOB_REQUEST,
    KIND_JOB_RESULT,
    Direction,
    EscrowTerms,
    Mode,
    Network,
    PayoutPolicy,
    Sealing,
)

__all__ = [
    "CAPABILITY_TOPIC",
    "Capabilities",
    "TaskOffer",
    "build_capabilities",
    "parse_capabilities",
    "BASELINE",
    "Appeal",
    "AppealFee",
    "AppealRoundStarted",
    "AppealWindow",
    "build_appeal",
    "build_appeal_fee",
    "build_appeal_round",
    "build_appeal_window",
    "is_appeal",
    "parse_appeal",
    "parse_appeal_fee",
    "parse_appeal_round",
    "parse_appeal_window",
    "Baseline",
    "FallbackStarted",
    "build_fallback_started",
    "parse_fallback_started",
    "EvalRound",
    "RoundParam",
    "ValidatorKey",
    "DeadlineExtension",
    "build_deadline_extension",
    "parse_deadline_extension",
    "PoolValidator",
    "open_scores",
    "ModelKey",
    "PublishedScore",
    "build_model_key",
    "parse_model_key",
    "KeyEnvelope",
    "Sealed",
    "SealedModel",
    "SealError",
    "open_sealed",
    "seal",
    "sealed_model",
    "unwrap_key",
    "wrap_key",
    "Sealing",
    "KIND_ANNOUNCEMENT",
    "KIND_DELETION",
    "KIND_EVALUATION_REQUEST",
    "KIND_EVALUATION_RESULT",
    "KIND_FEEDBACK",
    "KIND_JOB_REQUEST",
    "KIND_JOB_RESULT",
    "MAX_MSAT",
    "REASON_DESCRIPTIONS",
    "Announcement",
    "CancelReason",
    "Cancelled",
    "Candidate",
    "CodecError",
    "CodecErrorReason",
    "Deletion",
    "Direction",
    "ErrorFeedback",
    "EscrowFeedback",
    "EscrowOffer",
    "EscrowTerms",
    "EvaluationRequest",
    "EvaluationResult",
    "Feedback",
    "Funded",
    "Invoice",
    "JobRequest",
    "JobResult",
    "JobSpec",
    "Mode",
    "ModelRef",
    "MoneySplit",
    "Network",
    "PaymentProof",
    "PayoutAddress",
    "PayoutPolicy",
    "RefundReason",
    "Refunded",
    "RewardClaimable",
    "ClaimExpired",
    "RewardPaid",
    "Score",
    "Shard",
    "Template",
    "Validation",
    "ValidationComplete",
    "Verdict",
    "build_announcement",
    "build_cancelled",
    "build_deletion",
    "build_error_feedback",
    "build_escrow_offer",
    "build_evaluation_request",
    "build_evaluation_result",
    "build_funded",
    "build_job_request",
    "build_payee_invoice",
    "build_refunded",
    "build_rejection",
    "build_result",
    "build_reward_claimable",
    "build_claim_expired",
    "build_reward_paid",
    "build_validation_complete",
    "decrypt_shard",
    "encrypt_shard",
    "money_split",
    "parse_announcement",
    "parse_cancelled",
    "parse_deletion",
    "parse_error_feedback",
    "parse_escrow_feedback",
    "parse_escrow_offer",
    "parse_evaluation_request",
    "parse_evaluation_result",
    "parse_feedback",
    "parse_funded",
    "parse_job_request",
    "parse_refunded",
    "parse_result",
    "parse_reward_claimable",
    "parse_claim_expired",
    "parse_reward_paid",
    "parse_validation_complete",
    "split_shares",
    "whole_sats",
]
