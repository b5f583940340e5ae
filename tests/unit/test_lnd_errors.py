"""gRPC failures become typed errors (the mapping; live cases are in tests/integration)."""

from __future__ import annotations

import grpc
import pytest
from grpc.aio import AioRpcError, Metadata

from service.lightning import errors


def rpc_error(code: grpc.StatusCode, details: str) -> AioRpcError:
    return AioRpcError(code, Metadata(), Metadata(), details=details)


@pytest.mark.parametrize(
    "code,details,expected",
    [
        (grpc.StatusCode.UNAVAILABLE, "connection refused", errors.LndUnavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", errors.LndTimeout),
        (
            grpc.StatusCode.UNKNOWN,
            "verification failed: signature mismatch after caveat verification",
            errors.LndAuthError,
        ),
        (grpc.StatusCode.PERMISSION_DENIED, "permission denied", errors.LndAuthError),
        (grpc.StatusCode.ALREADY_EXISTS, "invoice is already paid", errors.PaymentAlreadyPaid),
        (grpc.StatusCode.ALREADY_EXISTS, "payment is in transition", errors.PaymentInTransition),
        (grpc.StatusCode.ALREADY_EXISTS, "payment already exists", errors.PaymentInTransition),
        (grpc.StatusCode.UNKNOWN, "invoice with payment hash already exists", errors.InvoiceAlreadyExists),
        (grpc.StatusCode.UNKNOWN, "invoice already canceled", errors.InvoiceStateError),
        (grpc.StatusCode.UNKNOWN, "invoice expired. Valid until 2026-01-01", errors.InvoiceExpired),
        (grpc.StatusCode.UNKNOWN, "self-payments not allowed", errors.SelfPayment),
        (grpc.StatusCode.NOT_FOUND, "there are no existing invoices", errors.LndNotFound),
        (grpc.StatusCode.UNKNOWN, "unable to locate invoice", errors.LndNotFound),
        (grpc.StatusCode.INVALID_ARGUMENT, "amount must be positive", errors.LndInvalidArgument),
        (grpc.StatusCode.INTERNAL, "something new", errors.LndError),
    ],
)
def test_mapping(code: grpc.StatusCode, details: str, expected: type[errors.LndError]) -> None:
    err = errors.from_rpc_error("Method", rpc_error(code, details))
    assert type(err) is expected
    assert err.method == "Method" and err.code == code and details in str(err)


def test_transport_codes_win_over_message_text() -> None:
    # An UNAVAILABLE whose text happens to mention an invoice is still a transport problem.
    err = errors.from_rpc_error("X", rpc_error(grpc.StatusCode.UNAVAILABLE, "invoice not found"))
    assert isinstance(err, errors.LndUnavailable)


async def test_the_macaroon_never_shows_in_a_repr_or_str() -> None:
    """The macaroon travels as per-call metadata; printing the client or its metadata hides it."""
    from service.lightning.client import LndClient

    secret = bytes(range(32)) * 3
    client = LndClient("127.0.0.1:1", b"not a real certificate", secret)
    try:
        shown = " ".join([repr(client), str(client), repr(client._md), str(client._md), f"{client._md}"])
        assert secret.hex() not in shown and secret.hex()[:16] not in shown
        assert client._md[0] == ("macaroon", secret.hex()), "what LND receives"
    finally:
        await client.close()
