"""Job result (kind 6701 = job kind + 1000, signed by a provider): protocol.md §5.

:func:`parse_result` checks one result against its (already parsed) job: which job
and customer it answers, who signed it, which shard it trained on and whether the
signer may submit for that shard, the model reference, and the optional payout
destination. It does not look at the clock or at other results: "before the
results deadline" and "the provider's first valid result" are the engine's rules.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from service.nostr.nip01 import Event

from .errors import CodecError, CodecErrorReason
from .fields import (
    Invoice,
    Tag,
    Template,
    amount_tag,
    arity,
    check_singles,
    event_refs,
    event_tag,
    expect_kind,
    format_uint,
    is_lnurl,
    is_lud16,
    is_url,
    parse_amount_tag,
    parse_hex64,
    parse_uint,
    pubkey_tag,
    single,
    single_pubkey_ref,
    template,
)
from .job import JobRequest
from .sealing import SealedModel, key_tag, read_keys, read_sealed_tag, sealed_tag
from .shards import parse_shard_label
from .terms import Sealing

R = CodecErrorReason

SINGLE_TAGS = ("model", "sealed", "payout", "amount", "request", "i")
MAX_MODEL_BYTES = 2**53 - 1
PAYOUT_KINDS = ("lud16", "lnurl")


@dataclass(frozen=True, slots=True)
class ModelRef:
    """``["model", <url>, <sha256 hex>, <bytes>]``: where the trained model is and what it is."""

    url: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class PayoutAddress:
    """``["payout", "lud16"|"lnurl", <address>]``: where the provider wants its reward."""

    kind: str
    address: str


@dataclass(frozen=True, slots=True)
class JobResult:
    id: str
    provider: str
    created_at: int
    job_id: str
    customer: str
    shard_index: int
    model: ModelRef | None  # a plain result's model; None when sealed
    payout_address: PayoutAddress | None = None
    invoice: Invoice | None = None
    content: str = ""
    sealed: SealedModel | None = None  # a sealed result's model (protocol.md §5a)

    @property
    def model_sha256(self) -> str:
        """The model's (plaintext's) sha256, sealed or not: scores and copies are judged by it."""
        if self.sealed is not None:
            return self.sealed.sha256
        assert self.model is not None
        return self.model.sha256

    @property
    def model_size(self) -> int:
        if self.sealed is not None:
            return self.sealed.size_bytes
        assert self.model is not None
        return self.model.size_bytes

    @property
    def model_url(self) -> str:
        """Where the model's bytes are: the ciphertext's URL for a sealed result."""
        if self.sealed is not None:
            return self.sealed.url
        assert self.model is not None
        return self.model.url


def _read_model(tag: Tag) -> ModelRef:
    arity(tag, 4, 4, R.INVALID_MODEL)
    _, url, sha256, size = tag
    if not is_url(url):
        raise CodecError(R.INVALID_MODEL, "model url must be a printable-ASCII URL with a scheme")
    parse_hex64(sha256, R.INVALID_MODEL_SHA256, "model sha256")
    size_bytes = parse_uint(size, R.INVALID_MODEL_SIZE, "model size", MAX_MODEL_BYTES)
    if size_bytes == 0:
        raise CodecError(R.INVALID_MODEL_SIZE, "model size must be positive")
    return ModelRef(url=url, sha256=sha256, size_bytes=size_bytes)


def _read_payout(tag: Tag) -> PayoutAddress:
    arity(tag, 3, 3, R.INVALID_PAYOUT_DESTINATION)
    _, kind, address = tag
    if kind == "lud16" and is_lud16(address):
        return PayoutAddress(kind, address)
    if kind == "lnurl" and is_lnurl(address):
        return PayoutAddress(kind, address)
    raise CodecError(
        R.INVALID_PAYOUT_DESTINATION, "payout must be ['payout','lud16',name@domain] or ['payout','lnurl',lnurl1…]"
    )


def parse_result(event: Event, job: JobRequest) -> JobResult:
    """Check a signature-verified result event against ``job``."""
    expect_kind(event, job.result_kind)
    tags = event.tags
    check_singles(tags, SINGLE_TAGS)
    if event_refs(tags, ("job",), ("job",))["job"].id != job.id:
        raise CodecError(R.WRONG_JOB, "the result's 'e' tag is not this job")
    # ["p", <customer>] as in NIP-90, plus the routing tag ["p", <escrow>].
    addressed = [t for t in tags if t and t[0] == "p" and not (len(t) >= 2 and t[1] == job.spec.escrow)]
    customer, _ = single_pubkey_ref(tuple(addressed))
    if customer != job.customer:
        raise CodecError(R.WRONG_CUSTOMER, "the result's 'p' tag is not this job's customer")
    signer = event.pubkey
    if signer == job.customer:
        raise CodecError(R.SIGNER_IS_CUSTOMER, "the customer cannot submit a result")
    if signer == job.spec.escrow:
        raise CodecError(R.SIGNER_IS_ESCROW, "the escrow cannot submit a result")
    if signer in job.spec.validators:
        raise CodecError(R.SIGNER_IS_VALIDATOR, "a validator cannot submit a result")
    shard_ref = single(tags, "i", R.MISSING_SHARD_REF)
    assert shard_ref is not None
    try:
        index = parse_shard_label(shard_ref[-1])
    except CodecError:
        raise CodecError(R.UNKNOWN_SHARD, "the result's 'i' tag does not end with a shard label") from None
    shard = job.shard(index)
    if shard is None:
        raise CodecError(R.UNKNOWN_SHARD, "the job has no shard with this label")
    if shard_ref != shard.to_tag_unchecked():
        raise CodecError(R.SHARD_MISMATCH, "the result's 'i' tag must copy the job's shard tag verbatim")
    refusal = job.submit_refusal(signer, index)
    if refusal is not None:
        raise CodecError(refusal, "this provider may not submit a result for this shard")
    model_tag, sealed_tag_ = single(tags, "model"), single(tags, "sealed")
    model: ModelRef | None = None
    sealed: SealedModel | None = None
    if model_tag is not None and sealed_tag_ is not None:
        raise CodecError(R.MODEL_AND_SEALED, "a result has either a 'model' or a 'sealed' tag")
    if sealed_tag_ is not None:
        sealed = _read_sealed(tags, sealed_tag_, job)
    elif model_tag is None:
        raise CodecError(R.MISSING_MODEL, "the result has no 'model' (or 'sealed') tag")
    else:
        if job.spec.sealing is Sealing.REQUIRED:
            raise CodecError(R.SEALING_REQUIRED, "this job requires a sealed result")
        model = _read_model(model_tag)
    payout_tag = single(tags, "payout")
    payout = _read_payout(payout_tag) if payout_tag is not None else None
    amount = single(tags, "amount")
    invoice = None
    if amount is not None:
        # NIP-90 allows the amount alone ("what I ask for"); only an invoice is a destination.
        amount_msat, bolt11 = parse_amount_tag(amount, bolt11_required=False)
        if bolt11 is not None:
            invoice = Invoice(amount_msat, bolt11)
    request = single(tags, "request")
    if request is not None:
        arity(request, 2, 2, R.INVALID_EVENT_REF)
    return JobResult(
        id=event.id,
        provider=signer,
        created_at=event.created_at,
        job_id=job.id,
        customer=customer,
        shard_index=index,
        model=model,
        payout_address=payout,
        invoice=invoice,
        content=event.content,
        sealed=sealed,
    )


def _read_sealed(tags: tuple[Tag, ...], tag: Tag, job: JobRequest) -> SealedModel:
    """The ``sealed`` tag and its ``key`` tags: one key for the escrow and for every designated
    validator, for nobody else (the customer gets its key from the escrow, when the provider is paid)."""
    if job.customer_validates:
        raise CodecError(R.SEALING_NEEDS_VALIDATORS, "a sealed result needs the job's named validators")
    model = read_sealed_tag(tag)
    keys = read_keys(tags)
    allowed = {job.spec.escrow, *job.spec.validators}
    if any(k.recipient not in allowed for k in keys):
        raise CodecError(R.KEY_RECIPIENT_NOT_ALLOWED, "a key is for someone other than the escrow and the validators")
    if not allowed <= {k.recipient for k in keys}:
        raise CodecError(R.MISSING_KEY, "a sealed result needs a key for the escrow and every validator")
    return replace(model, keys=keys)


def build_result(
    job: JobRequest,
    *,
    shard_index: int,
    model: ModelRef | SealedModel,
    payout_address: PayoutAddress | None = None,
    invoice: Invoice | None = None,
    content: str = "",
    job_relay: str = "",
    request: Event | None = None,
) -> Template:
    """A provider's result for one shard of ``job`` (``request``: the job event, copied as NIP-90 does).
    ``model`` is a :class:`ModelRef` (plain) or a :class:`~.sealing.SealedModel` with its keys."""
    shard = job.shard(shard_index) if type(shard_index) is int else None
    if shard is None:
        raise CodecError(R.UNKNOWN_SHARD, "the job has no shard with this index")
    tags: list[Tag] = [
        event_tag(job.id, job_relay),
        pubkey_tag(job.customer),
        pubkey_tag(job.spec.escrow),
        shard.to_tag_unchecked(),
    ]
    if isinstance(model, SealedModel):
        tags.append(sealed_tag(model))
        tags += [key_tag(k) for k in model.keys]
        _read_sealed(tuple(tags), tags[-1 - len(model.keys)], job)
    else:
        if job.spec.sealing is Sealing.REQUIRED:  # as parse_result: the builder writes nothing it refuses
            raise CodecError(R.SEALING_REQUIRED, "this job requires a sealed result")
        model_tag: Tag = (
            "model",
            model.url,
            model.sha256,
            format_uint(model.size_bytes, R.INVALID_MODEL_SIZE, "model size", MAX_MODEL_BYTES),
        )
        if any(type(item) is not str for item in model_tag):
            raise TypeError("model url and sha256 must be strings")
        _read_model(model_tag)
        tags.append(model_tag)
    if payout_address is not None:
        payout_tag: Tag = ("payout", payout_address.kind, payout_address.address)
        _read_payout(payout_tag)
        tags.append(payout_tag)
    if invoice is not None:
        tags.append(amount_tag(invoice.amount_msat, invoice.bolt11))
    if request is not None:
        tags.append(("request", request.to_json()))
    if type(content) is not str:
        raise TypeError("content must be a string")
    return template(job.result_kind, tags, content)
