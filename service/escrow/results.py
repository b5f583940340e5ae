"""Counted results as rows and as the machine sees them (``escrow_results``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from service.escrow.machine import ResultView
from service.escrow.models import Result
from service.payouts.types import Destination, DestinationKind


def result_columns(job_id: str, r: ResultView, created_at: int, received_at: float) -> dict[str, Any]:
    return {
        "id": r.id,
        "job_id": job_id,
        "provider": r.provider,
        "shard_index": r.shard_index,
        "model_url": r.model_url,
        "model_sha256": r.model_sha256,
        "payout_kind": r.payout_to.kind,
        "payout_address": r.payout_to.value or None,
        "invoice_bolt11": r.invoice_bolt11,
        "invoice_msat": r.invoice_msat,
        "created_at": created_at,
        "received_at": datetime.fromtimestamp(received_at, UTC),
        "ciphertext_sha256": r.ciphertext_sha256,
        "key_sha256": r.key_sha256,
        "customer_key": r.customer_key,
    }


def result_view(row: Result) -> ResultView:
    kind = DestinationKind(row.payout_kind)
    payout_to = Destination(kind, row.payout_address or "") if kind is not DestinationKind.NONE else Destination.none()
    return ResultView(
        row.id,
        row.provider,
        row.shard_index,
        row.model_sha256,
        payout_to,
        row.invoice_bolt11,
        row.invoice_msat,
        row.model_url,
        ciphertext_sha256=row.ciphertext_sha256,
        key_sha256=row.key_sha256,
        customer_key=row.customer_key,
    )
