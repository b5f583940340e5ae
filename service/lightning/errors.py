"""Typed errors for LND calls.

Hierarchy::

    LndError                       any failed LND call (carries method and gRPC code)
    ├── LndUnavailable             node unreachable, restarting, or not ready (retry with backoff)
    ├── LndTimeout                 the call's deadline passed (outcome unknown for writes)
    ├── LndAuthError               TLS/macaroon rejected (misconfiguration; do not retry)
    ├── LndNotFound                no such invoice / payment
    ├── LndInvalidArgument         LND refused the request's arguments
    ├── InvoiceAlreadyExists       an invoice with this payment hash exists already
    ├── InvoiceStateError          settle/cancel not allowed in the invoice's current state
    ├── PaymentAlreadyPaid         this payment hash was already paid by our node
    ├── PaymentInTransition        a payment for this hash is in flight: track it, do not resend
    ├── InvoiceExpired             the payment request has expired
    └── SelfPayment                the invoice is our own node's

Messages carry LND's own text, which names no secret; the macaroon and TLS
material are never part of an error.
"""

from __future__ import annotations

import grpc


class LndError(Exception):
    def __init__(self, method: str, detail: str, code: grpc.StatusCode | None = None) -> None:
        self.method = method
        self.detail = detail
        self.code = code
        super().__init__(f"{method}: {detail}" + (f" ({code.name})" if code else ""))


class LndUnavailable(LndError):
    pass


class LndTimeout(LndError):
    pass


class LndAuthError(LndError):
    pass


class LndNotFound(LndError):
    pass


class LndInvalidArgument(LndError):
    pass


class InvoiceAlreadyExists(LndError):
    pass


class InvoiceStateError(LndError):
    pass


class PaymentAlreadyPaid(LndError):
    pass


class PaymentInTransition(LndError):
    pass


class InvoiceExpired(LndError):
    pass


class SelfPayment(LndError):
    pass


# LND's error texts (lnd v0.20 invoices/, payments/db, routing/) mapped to our types.
# Checked in order; the first substring found wins.
_MESSAGES: tuple[tuple[str, type[LndError]], ...] = (
    ("invoice is already paid", PaymentAlreadyPaid),
    ("payment is in transition", PaymentInTransition),
    ("payment already exists", PaymentInTransition),  # initiated, not yet in flight
    ("invoice with payment hash already exists", InvoiceAlreadyExists),
    ("invoice already settled", InvoiceStateError),
    ("invoice already canceled", InvoiceStateError),
    ("invoice still open", InvoiceStateError),
    ("invoice not canceled", InvoiceStateError),  # DeleteCanceledInvoice
    ("cannot settle", InvoiceStateError),
    ("cannot cancel", InvoiceStateError),
    ("invoice expired", InvoiceExpired),
    ("self-payments not allowed", SelfPayment),
    ("unable to locate invoice", LndNotFound),
    ("there are no existing invoices", LndNotFound),
    ("invoice not found", LndNotFound),
    ("payment isn't initiated", LndNotFound),
    ("verification failed", LndAuthError),  # macaroon signature/caveat check
    ("expected 1 macaroon", LndAuthError),
    ("cannot get macaroon", LndAuthError),
    ("permission denied", LndAuthError),
    ("server is still in the process of starting", LndUnavailable),
    ("in the process of starting up", LndUnavailable),  # lnd v0.20 rpcperms.ErrRPCStarting
    ("wallet locked, unlock it", LndUnavailable),  # rpcperms.ErrWalletLocked
    ("waiting to start", LndUnavailable),
)

_CODES: dict[grpc.StatusCode, type[LndError]] = {
    grpc.StatusCode.UNAVAILABLE: LndUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: LndTimeout,
    grpc.StatusCode.UNAUTHENTICATED: LndAuthError,
    grpc.StatusCode.PERMISSION_DENIED: LndAuthError,
    grpc.StatusCode.NOT_FOUND: LndNotFound,
    grpc.StatusCode.INVALID_ARGUMENT: LndInvalidArgument,
}


def from_rpc_error(method: str, err: grpc.RpcError) -> LndError:
    code = err.code() if hasattr(err, "code") else None
    detail = (err.details() if hasattr(err, "details") else None) or str(code or "unknown error")
    low = detail.lower()
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    ):
        return _CODES[code](method, detail, code)
    for text, cls in _MESSAGES:
        if text in low:
            return cls(method, detail, code)
    return _CODES.get(code, LndError)(method, detail, code)
