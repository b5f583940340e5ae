"""``fedstr-escrow audit <job id> --relay wss://… [--relay …] [--escrow <pubkey>] [--json]``.

Exit codes: 0 no discrepancy, 1 discrepancies, 2 the job could not be fetched (or bad arguments).
The progress line goes to stderr, the report to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable

from service.nostr.nip19 import Nip19Error, Nip19ErrorReason, pubkey_from_text
from service.nostr.protocol.fields import is_hex64

from .fetch import RelayReader, audit_job
from .report import AuditFetchError

OpenRelays = Callable[[list[str], float], RelayReader]  # (urls, timeout in seconds) -> a relay client

EXIT_OK, EXIT_DISCREPANCIES, EXIT_NOT_FETCHED = 0, 1, 2


def _hex64(text: str) -> str:
    text = text.strip()
    if not is_hex64(text):
        raise argparse.ArgumentTypeError("must be 64 lowercase hex characters")
    return text


def _pubkey(text: str) -> str:
    try:
        return pubkey_from_text(text)
    except Nip19Error as e:
        raise argparse.ArgumentTypeError(
            e.message if e.reason is Nip19ErrorReason.INVALID_HEX else f"invalid npub: {e.reason}"
        ) from None


def _relay(text: str) -> str:
    if not (text.startswith("ws://") or text.startswith("wss://")):
        raise argparse.ArgumentTypeError("a relay URL starts with ws:// or wss://")
    return text


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fedstr-escrow audit",
        description="Check a job's public record on Nostr: recompute its decision, check every amount and receipt.",
    )
    ap.add_argument("job", type=_hex64, help="the job request's event id (hex)")
    ap.add_argument("--relay", type=_relay, action="append", required=True, help="a relay to read (repeatable)")
    ap.add_argument("--escrow", type=_pubkey, help="the escrow's public key (hex or npub); default: the job's")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each relay (default 10)")
    return ap


def main(argv: list[str] | None, *, open_relays: OpenRelays) -> int:
    """``open_relays`` makes the relay client (``service/cli.py`` passes the agents' ``Relays``)."""
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help is 0, a usage error 2
        return int(e.code or 0)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        relays = open_relays(args.relay, args.timeout)
        report = asyncio.run(audit_job(relays, args.job, escrow=args.escrow, progress=progress))
    except AuditFetchError as e:
        print(f"fedstr-escrow audit: could not fetch the job: {e}", file=sys.stderr)
        return EXIT_NOT_FETCHED
    print(report.to_json() if args.json else report.text())
    return EXIT_OK if report.ok else EXIT_DISCREPANCIES
