"""A small typed LND client over ``grpc.aio``.

One secure channel (TLS certificate + macaroon) is built per client and closed
on shutdown; every unary call has a deadline; every gRPC failure becomes a typed
:mod:`service.lightning.errors` exception. Results are plain dataclasses, so
nothing outside this package touches protobuf messages.

Amounts are integer millisatoshis throughout; payment hashes and preimages are
``bytes`` (32 bytes). Streams are async iterators; leaving the ``async for``
cancels the underlying gRPC call.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from service.lightning import errors
from service.lightning._stubs import inv, inv_grpc, ln, ln_grpc, rt, rt_grpc

MAX_MESSAGE_BYTES = 50 * 1024 * 1024
MAX_FEE_QUERY_MSAT = 2**62  # "no fee limit" for QueryRoutes (its default limit is about the amount)


# Our names for LND's enums, valued by the generated stubs (proto/lightning.proto), so a number
# never appears here; a value LND adds later maps to the default given to _enum.
class InvoiceState(enum.Enum):
    OPEN = ln.Invoice.OPEN
    SETTLED = ln.Invoice.SETTLED
    CANCELED = ln.Invoice.CANCELED
    ACCEPTED = ln.Invoice.ACCEPTED


class HtlcState(enum.Enum):
    ACCEPTED = ln.InvoiceHTLCState.ACCEPTED
    SETTLED = ln.InvoiceHTLCState.SETTLED
    CANCELED = ln.InvoiceHTLCState.CANCELED


class PaymentStatus(enum.Enum):
    UNKNOWN = ln.Payment.UNKNOWN  # deprecated: LND never sends it; our default for a value we do not know
    IN_FLIGHT = ln.Payment.IN_FLIGHT
    SUCCEEDED = ln.Payment.SUCCEEDED
    FAILED = ln.Payment.FAILED
    INITIATED = ln.Payment.INITIATED  # created, no HTLC attempted yet

    @property
    def final(self) -> bool:
        return self in (PaymentStatus.SUCCEEDED, PaymentStatus.FAILED)


class HtlcAttemptStatus(enum.Enum):
    """The state of one HTLC LND sent for a payment (``HTLCAttempt.status``)."""

    IN_FLIGHT = ln.HTLCAttempt.IN_FLIGHT
    SUCCEEDED = ln.HTLCAttempt.SUCCEEDED
    FAILED = ln.HTLCAttempt.FAILED


class FailureReason(enum.Enum):
    NONE = ln.FAILURE_REASON_NONE
    TIMEOUT = ln.FAILURE_REASON_TIMEOUT
    NO_ROUTE = ln.FAILURE_REASON_NO_ROUTE
    ERROR = ln.FAILURE_REASON_ERROR
    INCORRECT_PAYMENT_DETAILS = ln.FAILURE_REASON_INCORRECT_PAYMENT_DETAILS
    INSUFFICIENT_BALANCE = ln.FAILURE_REASON_INSUFFICIENT_BALANCE
    CANCELED = ln.FAILURE_REASON_CANCELED  # the payment was canceled (SendPaymentRequest.cancelable)


def _enum(cls: type[enum.Enum], value: int, default: enum.Enum) -> Any:
    try:
        return cls(int(value))
    except ValueError:
        return default


@dataclass(frozen=True, slots=True)
class NodeInfo:
    pubkey: str
    alias: str
    version: str
    block_height: int
    block_hash: str
    synced_to_chain: bool
    synced_to_graph: bool
    network: str
    num_active_channels: int
    num_peers: int


@dataclass(frozen=True, slots=True)
class AddedInvoice:
    payment_hash: bytes
    payment_request: str
    add_index: int


@dataclass(frozen=True, slots=True)
class InvoiceHtlc:
    amt_msat: int
    accept_height: int
    expiry_height: int
    state: HtlcState


@dataclass(frozen=True, slots=True)
class Invoice:
    payment_hash: bytes
    state: InvoiceState
    value_msat: int
    amt_paid_msat: int
    payment_request: str
    memo: str
    add_index: int
    settle_index: int
    creation_date: int
    settle_date: int
    expiry: int
    cltv_expiry: int
    htlcs: tuple[InvoiceHtlc, ...] = field(default_factory=tuple)

    @property
    def expires_at(self) -> int:
        return self.creation_date + self.expiry


@dataclass(frozen=True, slots=True)
class PaymentHtlc:
    """One HTLC LND sent for a payment, as its payment record shows it."""

    status: HtlcAttemptStatus
    attempt_time_ns: int  # when LND sent it (unix ns)
    resolve_time_ns: int  # when it settled or failed (0 while in flight)
    expiry_height: int  # the route's total time lock: the block height at which our node may time it out


@dataclass(frozen=True, slots=True)
class Payment:
    payment_hash: bytes
    status: PaymentStatus
    value_msat: int
    fee_msat: int
    preimage: bytes | None
    failure_reason: FailureReason
    payment_index: int
    creation_time_ns: int
    htlc_attempts: int = 0  # HTLCs LND has sent for it, whatever became of them
    htlcs: tuple[PaymentHtlc, ...] = ()  # each of them (ListPayments / TrackPaymentV2 report them all)

    @property
    def left(self) -> bool:
        """Whether money may have left: an HTLC was attempted (LND records each attempt before it
        sends the HTLC), or it succeeded. LND v0.20 reports a payment IN_FLIGHT from its creation,
        before any HTLC, so the status alone does not tell. A FAILED payment has no HTLC in flight
        (LND fails a payment only once its HTLCs are resolved)."""
        return self.htlc_attempts > 0 or self.status is PaymentStatus.SUCCEEDED


@dataclass(frozen=True, slots=True)
class BlindedPath:
    """One blinded payment path of an invoice (bLIP 39; LND's ``BlindedPaymentPath``): the one real
    node of the path (its introduction node), how many hops it has counting that node, and the
    aggregate policy of its hops, which the payer pays on top of the route to the introduction node."""

    introduction_node: str  # 33-byte compressed key, hex
    num_hops: int  # the introduction node included; the last hop is the (blinded) recipient
    base_fee_msat: int
    fee_ppm: int
    total_cltv_delta: int  # the whole path's, the recipient's final CLTV delta included
    htlc_min_msat: int
    htlc_max_msat: int


@dataclass(frozen=True, slots=True)
class BlindedPathsWanted:
    """What a blinded invoice's paths should be (``BlindedPathConfig``; None: the node's
    ``--routing.blinding.*`` setting): real hops before this node at least, hops in all (dummy
    hops pad a shorter path), paths at most, nodes no path may use (hex keys)."""

    min_real_hops: int | None = None
    num_hops: int | None = None
    max_paths: int | None = None
    omit_nodes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ChannelHtlcs:
    """Our node's HTLCs not resolved yet (``ListChannels``, ``PendingChannels``)."""

    open_hashes: frozenset[str]  # payment hashes (hex) of the HTLCs on our open channels
    on_chain_outgoing: int  # outgoing HTLCs of our channels being force-closed, not swept yet
    waiting_close: int  # channels whose closing transaction is not confirmed yet


@dataclass(frozen=True, slots=True)
class PayReq:
    destination: str  # for a blinded invoice a one-time key, not the recipient's node (bLIP 39)
    payment_hash: bytes
    num_msat: int
    timestamp: int
    expiry: int
    cltv_expiry: int
    description: str
    description_hash: bytes | None
    payment_addr: bytes
    blinded_paths: tuple[BlindedPath, ...] = ()


@dataclass(frozen=True, slots=True)
class RouteFeeQuote:
    """``EstimateRouteFee``'s answer for an invoice: the fee of the route its probe found (LND calls
    it a lower bound) when ``failure_reason`` is NONE; otherwise why the probe found no route."""

    fee_msat: int
    time_lock_delay: int
    failure_reason: FailureReason


@dataclass(frozen=True, slots=True)
class ChannelBalance:
    local_msat: int
    remote_msat: int
    pending_open_local_msat: int


class _Macaroon(tuple):
    """The per-call metadata carrying the macaroon; its repr never shows the secret.

    Sent as call metadata rather than through ``metadata_call_credentials``: grpc runs a
    credentials plugin on a new thread for every call, which cost more CPU than the
    call itself under load (bench.escrow).
    """

    def __new__(cls, macaroon_hex: str) -> _Macaroon:
        return super().__new__(cls, (("macaroon", macaroon_hex),))

    def __repr__(self) -> str:
        return "<macaroon>"

    __str__ = __repr__


def _invoice(m: Any) -> Invoice:
    return Invoice(
        payment_hash=bytes(m.r_hash),
        state=_enum(InvoiceState, m.state, InvoiceState.OPEN),
        value_msat=int(m.value_msat),
        amt_paid_msat=int(m.amt_paid_msat),
        payment_request=m.payment_request,
        memo=m.memo,
        add_index=int(m.add_index),
        settle_index=int(m.settle_index),
        creation_date=int(m.creation_date),
        settle_date=int(m.settle_date),
        expiry=int(m.expiry),
        cltv_expiry=int(m.cltv_expiry),
        htlcs=tuple(
            InvoiceHtlc(
                amt_msat=int(h.amt_msat),
                accept_height=int(h.accept_height),
                expiry_height=int(h.expiry_height),
                state=_enum(HtlcState, h.state, HtlcState.ACCEPTED),
            )
            for h in m.htlcs
        ),
    )


def _payment(m: Any) -> Payment:
    return Payment(
        payment_hash=bytes.fromhex(m.payment_hash) if m.payment_hash else b"",
        status=_enum(PaymentStatus, m.status, PaymentStatus.UNKNOWN),
        value_msat=int(m.value_msat),
        fee_msat=int(m.fee_msat),
        preimage=bytes.fromhex(m.payment_preimage) if m.payment_preimage.strip("0") else None,
        failure_reason=_enum(FailureReason, m.failure_reason, FailureReason.ERROR),
        payment_index=int(m.payment_index),
        creation_time_ns=int(m.creation_time_ns),
        htlc_attempts=len(m.htlcs),
        htlcs=tuple(
            PaymentHtlc(
                status=_enum(HtlcAttemptStatus, h.status, HtlcAttemptStatus.IN_FLIGHT),
                attempt_time_ns=int(h.attempt_time_ns),
                resolve_time_ns=int(h.resolve_time_ns),
                expiry_height=int(h.route.total_time_lock),
            )
            for h in m.htlcs
        ),
    )


def _blinded_path(m: Any) -> BlindedPath:
    return BlindedPath(
        introduction_node=bytes(m.blinded_path.introduction_node).hex(),
        num_hops=len(m.blinded_path.blinded_hops),
        base_fee_msat=int(m.base_fee_msat),
        fee_ppm=int(m.proportional_fee_rate),
        total_cltv_delta=int(m.total_cltv_delta),
        htlc_min_msat=int(m.htlc_min_msat),
        htlc_max_msat=int(m.htlc_max_msat),
    )


def _check_hash(name: str, value: bytes) -> bytes:
    if not isinstance(value, bytes | bytearray) or len(value) != 32:
        raise ValueError(f"{name} must be 32 bytes")
    return bytes(value)


class LndClient:
    """Typed access to one LND node. Build once (in the app's lifespan), close on shutdown."""

    def __init__(self, host: str, tls_cert: bytes, macaroon: bytes, *, timeout: float = 15.0) -> None:
        if not tls_cert:
            raise ValueError("LND TLS certificate is empty")
        if not macaroon:
            raise ValueError("LND macaroon is empty")
        self.host = host
        self.timeout = timeout
        self._md = _Macaroon(macaroon.hex())
        creds = grpc.ssl_channel_credentials(root_certificates=tls_cert)
        self._channel = grpc.aio.secure_channel(
            host,
            creds,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        self._ln = ln_grpc.LightningStub(self._channel)
        self._inv = inv_grpc.InvoicesStub(self._channel)
        self._rt = rt_grpc.RouterStub(self._channel)

    @classmethod
    def from_files(
        cls, host: str, tls_cert_path: Path | str, macaroon_path: Path | str, *, timeout: float = 15.0
    ) -> LndClient:
        try:
            cert = Path(tls_cert_path).read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read LND TLS certificate {tls_cert_path}: {e.strerror}") from None
        try:
            mac = Path(macaroon_path).read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read LND macaroon {macaroon_path}: {e.strerror}") from None
        return cls(host, cert, mac, timeout=timeout)

    def __repr__(self) -> str:
        return f"LndClient({self.host!r})"

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> LndClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(self, method: str, call: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return await call(request, timeout=timeout or self.timeout, metadata=self._md)
        except grpc.RpcError as e:
            raise errors.from_rpc_error(method, e) from None

    async def _stream(self, method: str, call: Any) -> AsyncIterator[Any]:
        try:
            async for msg in call:
                yield msg
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and call.cancelled():
                return
            raise errors.from_rpc_error(method, e) from None
        finally:
            call.cancel()

    # ---- node ------------------------------------------------------------
    async def get_info(self) -> NodeInfo:
        r = await self._unary("GetInfo", self._ln.GetInfo, ln.GetInfoRequest())
        network = r.chains[0].network if r.chains else ""
        return NodeInfo(
            pubkey=r.identity_pubkey,
            alias=r.alias,
            version=r.version,
            block_height=r.block_height,
            block_hash=r.block_hash,
            synced_to_chain=r.synced_to_chain,
            synced_to_graph=r.synced_to_graph,
            network=network,
            num_active_channels=r.num_active_channels,
            num_peers=r.num_peers,
        )

    async def channel_htlcs(self) -> ChannelHtlcs:
        """Our node's HTLCs that are not resolved: on open channels (by payment hash), and outgoing ones
        of channels being force-closed (on chain: LND gives no hash for them) or waiting to close."""
        chans, pending = await asyncio.gather(
            self._unary("ListChannels", self._ln.ListChannels, ln.ListChannelsRequest()),
            self._unary("PendingChannels", self._ln.PendingChannels, ln.PendingChannelsRequest()),
        )
        return ChannelHtlcs(
            open_hashes=frozenset(bytes(h.hash_lock).hex() for c in chans.channels for h in c.pending_htlcs),
            on_chain_outgoing=sum(
                1 for c in pending.pending_force_closing_channels for h in c.pending_htlcs if not h.incoming
            ),
            waiting_close=len(pending.waiting_close_channels),
        )

    async def channel_balance(self) -> ChannelBalance:
        r = await self._unary("ChannelBalance", self._ln.ChannelBalance, ln.ChannelBalanceRequest())
        return ChannelBalance(
            local_msat=int(r.local_balance.msat),
            remote_msat=int(r.remote_balance.msat),
            pending_open_local_msat=int(r.pending_open_local_balance.msat),
        )

    # ---- invoices ----------------------------------------------------------
    async def add_invoice(
        self,
        value_msat: int,
        *,
        memo: str = "",
        expiry: int = 3600,
        description_hash: bytes | None = None,
        private: bool = False,
        blinded: BlindedPathsWanted | None = None,
    ) -> AddedInvoice:
        """``AddInvoice``; with ``blinded``, an invoice that reaches this node over blinded paths only
        (``is_blinded``; LND signs it with a one-time key and writes no route hints)."""
        if value_msat <= 0:
            raise ValueError("invoice amount must be positive")
        req = ln.Invoice(
            value_msat=value_msat, memo=memo, expiry=expiry, private=private, description_hash=description_hash or b""
        )
        if blinded is not None:
            req.is_blinded = True
            cfg = req.blinded_path_config
            if blinded.min_real_hops is not None:
                cfg.min_num_real_hops = blinded.min_real_hops
            if blinded.num_hops is not None:
                cfg.num_hops = blinded.num_hops
            if blinded.max_paths is not None:
                cfg.max_num_paths = blinded.max_paths
            cfg.node_omission_list.extend(bytes.fromhex(k) for k in blinded.omit_nodes)
        r = await self._unary("AddInvoice", self._ln.AddInvoice, req)
        return AddedInvoice(payment_hash=bytes(r.r_hash), payment_request=r.payment_request, add_index=int(r.add_index))

    async def add_hold_invoice(
        self,
        payment_hash: bytes,
        value_msat: int,
        *,
        memo: str = "",
        expiry: int = 3600,
        cltv_expiry: int = 80,
        description_hash: bytes | None = None,
        private: bool = False,
    ) -> AddedInvoice:
        _check_hash("payment_hash", payment_hash)
        if value_msat <= 0:
            raise ValueError("invoice amount must be positive")
        req = inv.AddHoldInvoiceRequest(
            hash=payment_hash,
            value_msat=value_msat,
            memo=memo,
            expiry=expiry,
            cltv_expiry=cltv_expiry,
            description_hash=description_hash or b"",
            private=private,
        )
        r = await self._unary("AddHoldInvoice", self._inv.AddHoldInvoice, req)
        return AddedInvoice(payment_hash=payment_hash, payment_request=r.payment_request, add_index=int(r.add_index))

    async def lookup_invoice(self, payment_hash: bytes) -> Invoice:
        req = inv.LookupInvoiceMsg(payment_hash=_check_hash("payment_hash", payment_hash))
        return _invoice(await self._unary("LookupInvoiceV2", self._inv.LookupInvoiceV2, req))

    async def list_invoices(
        self, *, index_offset: int = 0, max_invoices: int = 1000, pending_only: bool = False
    ) -> tuple[list[Invoice], int]:
        """Invoices with add_index > index_offset, oldest first (only open and accepted ones with
        ``pending_only``); returns them and the last index."""
        req = ln.ListInvoiceRequest(
            index_offset=index_offset, num_max_invoices=max_invoices, reversed=False, pending_only=pending_only
        )
        r = await self._unary("ListInvoices", self._ln.ListInvoices, req)
        return [_invoice(i) for i in r.invoices], int(r.last_index_offset)

    async def settle_invoice(self, preimage: bytes) -> None:
        req = inv.SettleInvoiceMsg(preimage=_check_hash("preimage", preimage))
        await self._unary("SettleInvoice", self._inv.SettleInvoice, req)

    async def cancel_invoice(self, payment_hash: bytes) -> None:
        req = inv.CancelInvoiceMsg(payment_hash=_check_hash("payment_hash", payment_hash))
        await self._unary("CancelInvoice", self._inv.CancelInvoice, req)

    async def delete_canceled_invoice(self, payment_hash: bytes) -> None:
        """``DeleteCanceledInvoice``: remove a canceled invoice from LND's database (LND refuses one in
        any other state: :class:`errors.InvoiceStateError`; an unknown one: :class:`errors.LndNotFound`)."""
        req = ln.DelCanceledInvoiceReq(invoice_hash=_check_hash("payment_hash", payment_hash).hex())
        await self._unary("DeleteCanceledInvoice", self._ln.DeleteCanceledInvoice, req)

    async def subscribe_invoices(self, *, add_index: int = 0, settle_index: int = 0) -> AsyncIterator[Invoice]:
        """New invoices after ``add_index`` and settlements after ``settle_index``, then live updates.

        LND replays what happened after the given indices before streaming live
        changes, so a subscriber that stores the indices misses nothing. The stream
        reports OPEN and SETTLED only (never ACCEPTED or CANCELED).
        """
        call = self._ln.SubscribeInvoices(
            ln.InvoiceSubscription(add_index=add_index, settle_index=settle_index), metadata=self._md
        )
        async for m in self._stream("SubscribeInvoices", call):
            yield _invoice(m)

    async def subscribe_single_invoice(self, payment_hash: bytes) -> AsyncIterator[Invoice]:
        """Every state of one invoice, starting with its current state (OPEN/ACCEPTED/SETTLED/CANCELED)."""
        req = inv.SubscribeSingleInvoiceRequest(r_hash=_check_hash("payment_hash", payment_hash))
        async for m in self._stream("SubscribeSingleInvoice", self._inv.SubscribeSingleInvoice(req, metadata=self._md)):
            yield _invoice(m)

    # ---- payments ----------------------------------------------------------
    async def decode_pay_req(self, payment_request: str) -> PayReq:
        r = await self._unary("DecodePayReq", self._ln.DecodePayReq, ln.PayReqString(pay_req=payment_request))
        return PayReq(
            destination=r.destination,
            payment_hash=bytes.fromhex(r.payment_hash),
            num_msat=int(r.num_msat),
            timestamp=int(r.timestamp),
            expiry=int(r.expiry),
            cltv_expiry=int(r.cltv_expiry),
            description=r.description,
            description_hash=bytes.fromhex(r.description_hash) if r.description_hash else None,
            payment_addr=bytes(r.payment_addr),
            blinded_paths=tuple(_blinded_path(b) for b in r.blinded_paths),
        )

    async def send_payment(
        self,
        payment_request: str,
        *,
        fee_limit_msat: int,
        timeout_seconds: int = 60,
        cltv_limit: int = 0,
        amt_msat: int = 0,
        cancelable: bool = False,
    ) -> AsyncIterator[Payment]:
        """``SendPaymentV2``: a stream of the payment's states until SUCCEEDED or FAILED.

        ``cancelable``: ending the stream (leaving the ``async for``, a cancelled task, a closed
        channel) stops LND's payment loop: no further HTLC is sent, and a payment with none in
        flight ends FAILED with ``FAILURE_REASON_CANCELED``; one already sent may still succeed.

        ``fee_limit_msat`` is required; 0 means "zero-fee routes only" (routerrpc's rule, lnd
        v0.20 router.proto; tested on regtest), never "no limit". ``cltv_limit`` bounds the
        whole route's time lock in blocks (0: LND's ``--max-cltv-expiry``, 2016 by default).
        """
        if fee_limit_msat < 0:
            raise ValueError("fee_limit_msat must not be negative")
        if timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be positive")
        if cltv_limit < 0:
            raise ValueError("cltv_limit must not be negative")
        req = rt.SendPaymentRequest(
            payment_request=payment_request,
            fee_limit_msat=fee_limit_msat,
            timeout_seconds=timeout_seconds,
            cltv_limit=cltv_limit,
            amt_msat=amt_msat,
            no_inflight_updates=False,
            cancelable=cancelable,
        )
        async for m in self._stream("SendPaymentV2", self._rt.SendPaymentV2(req, metadata=self._md)):
            yield _payment(m)

    async def pay(self, payment_request: str, *, fee_limit_msat: int, timeout_seconds: int = 60) -> Payment:
        """Send and wait for the final state (blocks while a hold invoice holds the HTLC)."""
        last: Payment | None = None
        async for p in self.send_payment(
            payment_request, fee_limit_msat=fee_limit_msat, timeout_seconds=timeout_seconds
        ):
            last = p
            if p.status.final:
                return p
        if last is None:
            raise errors.LndError("SendPaymentV2", "stream ended without a payment update")
        return last

    async def route_fee(self, payment_request: str, *, cltv_limit: int = 0) -> int | None:
        """The fee (msat) of the route LND would choose for this invoice with no fee limit, or None
        if it finds none: ``QueryRoutes`` with the invoice's destination, amount, final CLTV, route
        hints and features, without mission control (the graph as it is). Sends nothing.

        For a blinded invoice: ``QueryRoutes`` to its blinded paths, whose fees (the paths'
        aggregate ones, dummy hops' included) are part of the total. Paths that start at this node
        are left out: LND v0.20.2 refuses the whole query for one ("introduction point as own node
        not supported"), and cannot pay one either."""
        d = await self._unary("DecodePayReq", self._ln.DecodePayReq, ln.PayReqString(pay_req=payment_request))
        common: dict[str, Any] = {
            "amt_msat": int(d.num_msat),
            "cltv_limit": cltv_limit,
            "fee_limit": ln.FeeLimit(fixed_msat=MAX_FEE_QUERY_MSAT),
            "use_mission_control": False,
        }
        if d.blinded_paths:
            me = bytes.fromhex((await self.get_info()).pubkey)
            paths = [b for b in d.blinded_paths if bytes(b.blinded_path.introduction_node) != me]
            if not paths:
                return None
            # no destination, final CLTV delta or features: the paths carry them (lightning.proto)
            req = ln.QueryRoutesRequest(blinded_payment_paths=paths, **common)
        else:
            req = ln.QueryRoutesRequest(
                pub_key=d.destination,
                final_cltv_delta=int(d.cltv_expiry),
                route_hints=list(d.route_hints),
                dest_features=list(d.features.keys()),
                **common,
            )
        try:
            r = await self._unary("QueryRoutes", self._ln.QueryRoutes, req)
        except errors.LndError as e:
            if "unable to find a path" in e.detail:
                return None
            raise
        return int(r.routes[0].total_fees_msat) if r.routes else None

    async def estimate_route_fee(self, payment_request: str, *, timeout_seconds: int) -> RouteFeeQuote:
        """``EstimateRouteFee`` by payment request: LND sends a probe to the invoice's node with a
        random payment hash (nobody can settle it: nothing is paid) and reports the fee of the route
        that reached it. ``timeout_seconds`` bounds LND's probe loop (cancelling the call does not
        stop it); the call's deadline is that plus a little. (A probe's HTLC can still be held past
        it by a node on the route, as any payment's can.)"""
        if timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be positive")
        req = rt.RouteFeeRequest(payment_request=payment_request, timeout=timeout_seconds)
        r = await self._unary("EstimateRouteFee", self._rt.EstimateRouteFee, req, timeout=timeout_seconds + 2.0)
        return RouteFeeQuote(
            fee_msat=int(r.routing_fee_msat),
            time_lock_delay=int(r.time_lock_delay),
            failure_reason=_enum(FailureReason, r.failure_reason, FailureReason.ERROR),
        )

    async def current_payment(self, payment_hash: bytes) -> Payment | None:
        """LND's view of a payment now: the first update of ``TrackPaymentV2`` (never waiting for a
        final state); None if LND does not know the hash."""
        try:
            async with aclosing(self.track_payment(payment_hash)) as stream, asyncio.timeout(self.timeout):
                async for p in stream:
                    return p
        except errors.LndNotFound:
            return None
        raise errors.LndError("TrackPaymentV2", "the stream ended without a payment update")

    async def track_payment(
        self, payment_hash: bytes, *, no_inflight_updates: bool = False
    ) -> AsyncGenerator[Payment, None]:
        """``TrackPaymentV2``: the payment's current state, then updates until final."""
        req = rt.TrackPaymentRequest(
            payment_hash=_check_hash("payment_hash", payment_hash), no_inflight_updates=no_inflight_updates
        )
        async for m in self._stream("TrackPaymentV2", self._rt.TrackPaymentV2(req, metadata=self._md)):
            yield _payment(m)
