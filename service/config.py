"""Typed settings, read from ``FEDSTR_*`` environment variables (or a ``.env`` file).

Defaults suit a local regtest run; ``devstack/stack env`` prints the values that
point the service at the local network. Secrets are ``SecretStr`` so they never
appear in reprs, logs or error messages.
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlparse

import bech32
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Network = Literal["mainnet", "testnet", "signet", "regtest"]

# LND adds this many blocks to a payment's final CLTV delta (routing.BlockPadding, lnd v0.20) and
# refuses a cltv_limit that does not exceed the sum; a route needs room for its hops' deltas on top
# (80 blocks: one hop at LND's default time_lock_delta).
LND_BLOCK_PADDING = 3
PAYOUT_ROUTE_CLTV_ROOM = 80


def payout_cltv_problem(max_final_cltv: int, cltv_limit: int) -> str | None:
    """Why an invoice's final CLTV limit does not fit under the payout CLTV limit, or None."""
    need = max_final_cltv + LND_BLOCK_PADDING + PAYOUT_ROUTE_CLTV_ROOM
    if cltv_limit < need:
        return (
            f"FEDSTR_PAYOUT_CLTV_LIMIT ({cltv_limit}) must be at least FEDSTR_PAYOUT_MAX_FINAL_CLTV "
            f"({max_final_cltv}) + {LND_BLOCK_PADDING} (LND's block padding) + {PAYOUT_ROUTE_CLTV_ROOM} "
            f"(room for a route's hops) = {need}: an invoice we accept must be payable within the limit"
        )
    return None


# A bearer token shorter than this could fall to online guessing or a word list; 32 random
# characters (``secrets.token_urlsafe(32)`` gives 43) are far beyond any guessing budget even
# from many addresses at the throttle's pace. docs/operations.md, "Keys and secrets".
MIN_TOKEN_CHARS = 32


MAX_POOL = 64  # protocol.md §1: at most 64 validators in an announcement's pool
_HEX64 = re.compile(r"[0-9a-f]{64}")


def parse_pool_entry(entry: str) -> tuple[str, str]:
    """One ``name=<64-hex pubkey or npub>`` of FEDSTR_VALIDATOR_POOL, as (name, hex pubkey)."""
    name, sep, key = entry.strip().partition("=")
    name, key = name.strip(), key.strip()
    problem = f"FEDSTR_VALIDATOR_POOL: {entry.strip()[:80]!r} is not name=<64-hex pubkey or npub>"
    if not sep or not name or len(name) > 64 or not name.isprintable():
        raise ValueError(problem + " (a name is 1 to 64 printable characters)")
    if key.lower().startswith("npub1"):
        # Decoded with the bech32 library itself: settings import no service package (no cycle).
        hrp, words = bech32.bech32_decode(key)
        data = bech32.convertbits(words, 5, 8, False) if hrp == "npub" and words is not None else None
        if data is None or len(data) != 32:
            raise ValueError(problem + " (the npub does not decode)")
        key = bytes(data).hex()
    key = key.lower()
    if _HEX64.fullmatch(key) is None:
        raise ValueError(problem)
    return name, key


def token_problem(value: str) -> str | None:
    """Why ``value`` cannot be a bearer token (admin, metrics), or None if it can.

    The one rule, used by the settings' validator and again when the app is built (settings
    made with ``model_copy`` skip validators)."""
    if not value.strip():
        return "must not be empty (leave the variable unset to disable what it protects)"
    if len(value.strip()) < MIN_TOKEN_CHARS:
        return (
            f"must be at least {MIN_TOKEN_CHARS} characters (e.g. python3 -c 'import secrets; "
            "print(secrets.token_urlsafe(32))')"
        )
    return None


class Settings(BaseSettings):
    # Errors never echo the refused value: it may be a secret (a token, the Nostr key).
    model_config = SettingsConfigDict(env_prefix="FEDSTR_", env_file=".env", extra="ignore", hide_input_in_errors=True)

    network: Network = "regtest"
    database_url: str = "sqlite+aiosqlite:///./fedstr-escrow.sqlite3"

    lnd_grpc_host: str = "127.0.0.1:10009"
    lnd_tls_cert_path: Path | None = None
    lnd_macaroon_path: Path | None = None
    lnd_timeout_seconds: float = Field(default=15.0, gt=0, le=300)

    relays: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # The escrow's Nostr identity: 64 hex characters or nsec1…; if unset, the key file
    # is used, and created (mode 0600) with a fresh key on first run.
    nostr_secret_key: SecretStr | None = None
    nostr_key_file: Path = Path("fedstr-escrow.nostr-key")

    # Escrow terms (announced in kind 31990; docs/escrow.md).
    fee_base_msat: int = Field(default=1_000, ge=0)
    fee_ppm: int = Field(default=10_000, ge=0, le=1_000_000)
    min_bid_msat: int = Field(default=100_000, ge=1)
    max_bid_msat: int = Field(default=100_000_000_000, ge=1)
    max_validators: int = Field(default=9, ge=1, le=64)
    # The validator pool announced (NIP-89) and shown in /v1/info: validators the operator vouches
    # for, "name=<64-hex pubkey or npub>,…" (protocol.md §1); empty: no pool. Read as (name, hex).
    validator_pool: Annotated[list[tuple[str, str]], NoDecode] = Field(default_factory=list)
    max_shards: int = Field(default=32, ge=1, le=256)
    min_results_window_seconds: int = Field(default=600, ge=0)
    max_job_duration_seconds: int = Field(default=30 * 86_400, ge=60)
    escrow_modes: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["hold", "custodial"])
    max_hold_seconds: int = Field(default=3 * 86_400, ge=0)
    # Every payout is at least this (whole satoshis); requests that could pay less are refused.
    min_payout_msat: int = Field(default=1_000, ge=1_000, multiple_of=1_000)
    max_results_per_shard: int = Field(default=4, ge=1, le=64)  # candidates per shard, first received
    # A payout waiting for its payee's invoice may be claimed this long from its creation (announced
    # as claim_window_s), then it expires to the operator's unclaimed account; 0: wait for ever.
    claim_window_seconds: int = Field(default=30 * 86_400, ge=0)
    # The payee is reminded this long before its claim window ends (at most half the window).
    claim_reminder_seconds: int = Field(default=3 * 86_400, ge=0)
    # Appeals (announced as appeal_window_s / appeal_fee_msat; docs/escrow.md "Appeals"): a decision
    # waits this long before money moves, for a paid appeal. 0 (the default): no appeals, so
    # payouts are not delayed; the operator turns it on.
    appeal_window_seconds: int = Field(default=0, ge=0, le=30 * 86_400)
    appeal_fee_msat: int = Field(default=10_000, ge=1_000, multiple_of=1_000)  # whole satoshis
    appeal_round_seconds: int = Field(default=600, ge=1, le=7 * 86_400)  # the appeal round's window
    # Intake budget, whatever the source (relay or REST), counted in the database (docs/escrow.md).
    job_requests_per_minute: int = Field(default=120, ge=1)  # accepted requests, all keys
    job_requests_per_minute_per_key: int = Field(default=10, ge=1)  # any outcome, one key
    max_open_offers: int = Field(default=200, ge=1)  # unfunded offers open at once
    max_open_offers_per_key: int = Field(default=3, ge=1)
    # Replies also go to the first relays of a request's NIP-90 `relays` tag (never private addresses).
    reply_relays_max: int = Field(default=3, ge=0, le=16)
    reply_relays_allow_private: bool = False  # dev/test only

    # Escrow invoices (see docs/lightning.md).
    invoice_expiry_seconds: int = Field(default=600, ge=60, le=86_400)  # the payment window
    hold_block_seconds: int = Field(default=480, ge=1)  # pessimistic block time for CLTV sizing
    hold_speedup: float = Field(default=1.7, ge=1.0)  # blocks may come this much faster
    hold_margin_blocks: int = Field(default=36, ge=0)  # on top of the job's own duration
    hold_max_cltv_blocks: int = Field(default=1008, ge=40, le=2016)  # above this: custodial
    hold_expiry_delta: int = Field(default=12, ge=1)  # LND's --invoices.holdexpirydelta
    guard_margin_blocks: int = Field(default=12, ge=1)  # we act this much before LND would
    guard_interval_seconds: float = Field(default=30.0, gt=0)
    sweep_interval_seconds: float = Field(default=30.0, gt=0)
    # How long LND keeps our canceled hold invoices before the sweep deletes them there (ours stay); 0: kept.
    canceled_invoice_retention_seconds: float = Field(default=7 * 86400.0, ge=0)
    max_invoice_streams: int = Field(default=1000, ge=0, le=100_000)  # SubscribeSingleInvoice streams
    unstreamed_sweep_seconds: float = Field(default=2.0, gt=0)  # sweep period while some have none
    # Payouts (docs/lightning.md). The routing-fee limit is amount × ppm, capped; no floor (a floor
    # let a payee's route take 10 sat from a 1-sat payout). Removed: FEDSTR_PAYOUT_FEE_FLOOR_MSAT.
    payout_fee_floor_msat: int | None = None
    payout_fee_ppm: int = Field(default=5_000, ge=0, le=1_000_000)
    payout_fee_cap_msat: int = Field(default=5_000_000, ge=0)
    payout_timeout_seconds: int = Field(default=60, ge=5, le=600)
    # EstimateRouteFee's probe before a payee's invoice is first paid (its time limit); 0: no quote.
    payout_fee_quote_seconds: int = Field(default=10, ge=0, le=120)
    payout_max_attempts: int = Field(default=3, ge=1, le=20)
    payout_retry_seconds: float = Field(default=60.0, ge=0)
    payout_invoice_min_expiry_seconds: int = Field(default=300, ge=0)
    payout_max_final_cltv: int = Field(default=288, ge=18)  # blocks; the payee's invoice's final CLTV
    # the longest an HTLC of ours may be locked (blocks, whole route); at most LND's --max-cltv-expiry
    payout_cltv_limit: int = Field(default=432, ge=40, le=2016)
    payout_lease_seconds: float = Field(default=300.0, gt=0)  # a dead worker's claim expires after this
    payout_concurrency: int = Field(default=20, ge=1, le=400)  # payments in flight per replica
    payout_reconcile_seconds: float = Field(default=60.0, gt=0)  # `unknown` payouts, those a dead worker left
    payout_reconcile_budget_seconds: float = Field(default=5.0, gt=0, le=120)  # per payout, per pass
    effect_lease_seconds: float = Field(default=120.0, gt=0)
    reconcile_interval_seconds: float = Field(default=300.0, gt=0)
    reconcile_threshold_msat: int = Field(default=0, ge=0)  # above this, payouts pause and an alert is raised
    lnurl_allow_private: bool = False  # dev/test only: LNURL on loopback
    webhook_window_seconds: int = Field(default=300, ge=10, le=3600)
    # One bad item never blocks the others (service/quarantine.py, docs/operations.md): an item
    # that keeps failing is retried with backoff, then quarantined until an operator replays it.
    quarantine_after: int = Field(default=5, ge=1, le=100)  # failures before quarantine
    item_retry_base_seconds: float = Field(default=1.0, ge=0, le=3600)  # first backoff, doubling ...
    item_retry_max_seconds: float = Field(default=300.0, ge=0, le=86_400)  # ... up to this
    # Deadlines that survive the escrow's outages (service/liveness.py, docs/escrow.md): every process
    # beats every heartbeat_seconds; a stretch longer than the tolerance that no beat covers is an
    # outage, and a deadline it touched is extended. Intervals are kept for the retention (longer
    # than any job lives: an outage pruned early could no longer extend a deadline).
    heartbeat_seconds: float = Field(default=5.0, gt=0, le=300)
    heartbeat_tolerance_seconds: float = Field(default=15.0, gt=0, le=3600)
    # a result may reach the escrow this long after the results deadline (relay latency; protocol.md)
    results_grace_seconds: int = Field(default=60, ge=0, le=3600)
    # after an outage across a deadline, the deadline is at least this long after the escrow's return
    # (the relays' backlog of what was sent meanwhile is read first)
    outage_catch_up_seconds: int = Field(default=60, ge=0, le=3600)
    # a fallback evaluation round's window (docs/escrow.md): when quorum is missed at the validation
    # deadline and validators from the pool are asked to score
    fallback_round_seconds: int = Field(default=600, ge=1, le=7 * 86_400)
    liveness_retention_seconds: int = Field(default=90 * 86_400, ge=3600)

    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=1, le=65535)

    public_url: str | None = None  # the API's external base URL (NIP-98 checks the signed URL against it)
    max_body_bytes: int = Field(default=131_072, ge=1024)
    events_per_minute: float = Field(default=120.0, gt=0)  # per client address and per pubkey
    events_burst: int = Field(default=60, ge=1)
    invoices_per_minute: float = Field(default=20.0, gt=0)
    invoices_burst: int = Field(default=10, ge=1)
    admin_token: SecretStr | None = None  # unset: admin API and dashboard disabled (503)
    metrics_token: SecretStr | None = None  # bearer token of /metrics (the admin token works too)
    # Proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (IPs or CIDRs); empty:
    # proxy headers are ignored from everyone, loopback included.
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Blob store (/blobs, Blossom BUD-01/02; service/api/blobs.py).
    blob_dir: Path = Path("./blobs")  # created 0700 on first use
    # A blob streams through the store (hashed and size-checked as it arrives, served from its
    # file, byte ranges for resuming): the limits bound disk, never memory.
    blob_max_bytes: int = Field(default=512 * 1024**2, ge=1)  # one blob (a model of 100 MB+ fits)
    blob_io_chunk_bytes: int = Field(default=1024**2, ge=4096, le=64 * 1024**2)  # per write / read of a blob file
    blob_uploads_per_minute: float = Field(default=30.0, gt=0)  # per client address and per pubkey
    blob_uploads_burst: int = Field(default=10, ge=1)
    blob_allowed_pubkeys: Annotated[list[str], NoDecode] = Field(default_factory=list)  # hex or npub; empty = any
    blob_auth_max_age_seconds: int = Field(default=3600, ge=60, le=86_400)
    blob_key_quota_bytes: int = Field(default=2 * 1024**3, ge=1)  # per key, over its open jobs (>= max_bytes)
    blob_key_quota_count: int = Field(default=64, ge=1)
    blob_store_quota_bytes: int = Field(default=16 * 1024**3, ge=1)  # the whole store (>= key quota)
    blob_retention_seconds: int = Field(default=7 * 86_400, ge=0)  # after the last referencing job ended
    blob_unreferenced_grace_seconds: int = Field(default=3600, ge=0)  # blobs no job references
    blob_sweep_interval_seconds: float = Field(default=300.0, gt=0)  # the leader's expiry sweep
    blob_sweep_batch: int = Field(default=500, ge=1, le=100_000)  # blobs deleted per pass at most
    webhook_secret: SecretStr | None = None

    @field_validator("payout_fee_floor_msat")
    @classmethod
    def _no_fee_floor(cls, v: int | None) -> int | None:
        if v:  # 0 (or unset) means no floor, which is what the service does
            raise ValueError(
                "FEDSTR_PAYOUT_FEE_FLOOR_MSAT is no longer supported: a payout's routing-fee limit is "
                "its amount × FEDSTR_PAYOUT_FEE_PPM, capped by FEDSTR_PAYOUT_FEE_CAP_MSAT, with no "
                "floor (a floor let a payee's route take more than the payout's fraction); unset it"
            )
        return v

    @model_validator(mode="after")
    def _payout_cltv_fits(self) -> Settings:
        problem = payout_cltv_problem(self.payout_max_final_cltv, self.payout_cltv_limit)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _blob_limits_coherent(self) -> Settings:
        # A key whose quota is below one blob could never upload a blob of the allowed size.
        if self.blob_key_quota_bytes < self.blob_max_bytes:
            raise ValueError("FEDSTR_BLOB_KEY_QUOTA_BYTES must be at least FEDSTR_BLOB_MAX_BYTES")
        if self.blob_store_quota_bytes < self.blob_key_quota_bytes:
            raise ValueError("FEDSTR_BLOB_STORE_QUOTA_BYTES must be at least FEDSTR_BLOB_KEY_QUOTA_BYTES")
        return self

    @model_validator(mode="after")
    def _tolerance_above_heartbeat(self) -> Settings:
        # A tolerance at or below the beat would see an outage between every two beats.
        if self.heartbeat_tolerance_seconds <= self.heartbeat_seconds:
            raise ValueError(
                f"FEDSTR_HEARTBEAT_TOLERANCE_SECONDS ({self.heartbeat_tolerance_seconds}) must exceed "
                f"FEDSTR_HEARTBEAT_SECONDS ({self.heartbeat_seconds}); 3 x the heartbeat is the default"
            )
        return self

    @field_validator("lnd_grpc_host")
    @classmethod
    def _host_port(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected host:port, got {v!r}")
        return v

    @field_validator("relays", mode="before")
    @classmethod
    def _parse_relays(cls, v: object) -> object:
        # Accept a JSON list or a comma-separated string.
        if isinstance(v, str):
            v = v.strip()
            if not v:
                return []
            if v.startswith("["):
                try:
                    return json.loads(v)
                except json.JSONDecodeError as e:
                    raise ValueError(f"FEDSTR_RELAYS is not valid JSON: {e.msg}") from None
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("admin_token", "metrics_token")
    @classmethod
    def _check_token(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None:
            return None
        problem = token_problem(v.get_secret_value())
        if problem is not None:
            raise ValueError(problem)
        return SecretStr(v.get_secret_value().strip())

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _parse_proxies(cls, v: object) -> object:
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                try:
                    return json.loads(v)
                except json.JSONDecodeError as e:
                    raise ValueError(f"not valid JSON: {e.msg}") from None
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, v: list[str]) -> list[str]:
        for item in v:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR network") from None
        return v

    @field_validator("blob_allowed_pubkeys", mode="before")
    @classmethod
    def _parse_blob_keys(cls, v: object) -> object:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @field_validator("validator_pool", mode="before")
    @classmethod
    def _parse_validator_pool(cls, v: object) -> object:
        if isinstance(v, str):
            return [parse_pool_entry(item) for item in v.split(",") if item.strip()]
        return v

    @field_validator("validator_pool")
    @classmethod
    def _check_validator_pool(cls, v: list[tuple[str, str]]) -> list[tuple[str, str]]:
        out = [parse_pool_entry(f"{name}={key}") for name, key in v]
        if len(out) > MAX_POOL:
            raise ValueError(f"FEDSTR_VALIDATOR_POOL: at most {MAX_POOL} validators")
        if len({key for _, key in out}) != len(out):
            raise ValueError("FEDSTR_VALIDATOR_POOL: a validator's key is listed twice")
        return out

    @field_validator("escrow_modes", mode="before")
    @classmethod
    def _parse_modes(cls, v: object) -> object:
        if isinstance(v, str):
            return [m.strip() for m in v.split(",") if m.strip()]
        return v

    @field_validator("escrow_modes")
    @classmethod
    def _check_modes(cls, v: list[str]) -> list[str]:
        if not v or not set(v) <= {"hold", "custodial"}:
            raise ValueError("escrow_modes must be a non-empty list of 'hold' and/or 'custodial'")
        return v

    @field_validator("relays")
    @classmethod
    def _check_relays(cls, v: list[str]) -> list[str]:
        for url in v:
            u = urlparse(url)
            if u.scheme not in ("ws", "wss") or not u.hostname:
                raise ValueError(f"relay URL must be ws:// or wss:// with a host, got {url!r}")
        return v

    @field_validator("database_url")
    @classmethod
    def _check_db(cls, v: str) -> str:
        if not (v.startswith("sqlite+aiosqlite://") or v.startswith("postgresql+asyncpg://")):
            raise ValueError("database_url must use sqlite+aiosqlite:// or postgresql+asyncpg://")
        return v
