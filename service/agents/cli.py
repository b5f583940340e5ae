"""``fedstr-escrow agent …``: run one reference agent (or the whole demo) from the command line.

    fedstr-escrow agent whoami    --role provider --name alice
    fedstr-escrow agent provider  --escrow-url URL --name alice --lnd-host … [--dishonest | --lazy] [--jobs N]
                                  [--trust-validator PK …] [--max-threshold D] [--min-reward-per-shard-msat N]
                                  [--hardware TEXT]
    fedstr-escrow agent validator --escrow-url URL --name victor --lnd-host … [--holdout-index I --holdout-count N]
    fedstr-escrow agent customer  --escrow-url URL (--provider PK … | --discover N) --validator PK … --lnd-host …
                                  [--rounds N] [--hardware TEXT] [--max-runtime-s S]
    fedstr-escrow agent demo      --escrow-url URL [--stack .devstack/dev/stack.json] [--rounds N]

``main(argv)`` takes the arguments after ``agent``. See docs/agents.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path

from service.nostr.nip19 import Nip19Error, Nip19ErrorReason, encode_npub, pubkey_from_text

from . import ml
from .common import DEFAULT_KEY_DIR, AgentError, escrow_info, escrow_terms, key_path, load_key
from .customer import Customer, RoundConfig
from .relay import RelayError, Relays
from .storage import DEFAULT_MAX_MODEL_BYTES, Blobs
from .tasks import DIGITS

log = logging.getLogger("fedstr_escrow.agents")
DEFAULT_STACK = Path(".devstack/dev/stack.json")


def _pubkey(text: str) -> str:
    try:
        return pubkey_from_text(text)
    except Nip19Error as e:
        raise argparse.ArgumentTypeError(
            e.message if e.reason is Nip19ErrorReason.INVALID_HEX else f"invalid npub: {e.reason}"
        ) from None


def _decimal(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError("not a decimal number") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _common(ap: argparse.ArgumentParser, *, lnd: bool = True) -> None:
    g = ap.add_argument_group("escrow, relays and blobs")
    g.add_argument("--escrow-url", help="the escrow service's base URL: reads /v1/info (pubkey, relays)")
    g.add_argument("--escrow", type=_pubkey, help="the escrow's public key (hex or npub), instead of --escrow-url")
    g.add_argument("--relay", action="append", default=[], help="relay URL (repeatable; default: the escrow's)")
    g.add_argument("--blob-url", help="Blossom server URL (default: <escrow-url>/blobs)")
    g.add_argument(
        "--max-model-bytes",
        type=int,
        default=DEFAULT_MAX_MODEL_BYTES,
        help="the largest model (or sealed model) fetched from others, in bytes (default %(default)s)",
    )
    g = ap.add_argument_group("identity")
    g.add_argument("--name", default="default", help="agent name: the key is <key-dir>/<role>-<name>.key")
    g.add_argument("--key-dir", type=Path, default=DEFAULT_KEY_DIR, help="where keys live (default %(default)s)")
    if lnd:
        g = ap.add_argument_group("the agent's own LND node")
        g.add_argument("--lnd-host", help="LND gRPC host:port")
        g.add_argument("--lnd-cert", type=Path, help="LND TLS certificate")
        g.add_argument(
            "--lnd-macaroon", type=Path, help="LND macaroon (invoice macaroon for payees, admin for customers)"
        )
        g.add_argument("--stack", type=Path, help="a devstack stack.json, with --node: take the node from it")
        g.add_argument("--node", choices=("customer", "payee", "escrow"), help="the devstack node to use")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fedstr-escrow agent", description="FEDSTR reference agents")
    ap.add_argument("--log-level", default="WARNING")
    sub = ap.add_subparsers(dest="command", required=True)

    w = sub.add_parser("whoami", help="print (creating if needed) an agent's public key")
    w.add_argument("--role", choices=("customer", "provider", "validator"), required=True)
    w.add_argument("--name", default="default")
    w.add_argument("--key-dir", type=Path, default=DEFAULT_KEY_DIR)

    c = sub.add_parser("customer", help="post rounds, pay them, aggregate the accepted models")
    _common(c)
    who = c.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--provider",
        action="append",
        type=_pubkey,
        help="provider public key (repeatable): one shard each, encrypted to it",
    )
    who.add_argument(
        "--discover",
        type=_positive,
        metavar="N",
        help="find N providers from their capability events instead (task, this escrow, a price per shard "
        "the bid covers, --hardware)",
    )
    c.add_argument("--hardware", help="the hardware asked of the providers (param hardware; default: any)")
    c.add_argument(
        "--max-runtime-s", type=_positive, help="the providers' training time limit in seconds (param max_runtime_s)"
    )
    c.add_argument("--validator", action="append", type=_pubkey, default=[], help="validator public key (repeatable)")
    c.add_argument("--quorum", type=int, help="scores needed per model (default: all validators, or 1)")
    c.add_argument("--threshold", type=_decimal, default=Decimal("0.8"), help="accuracy a model must reach")
    c.add_argument("--bid-msat", type=int, default=RoundConfig.bid_msat)
    c.add_argument("--validator-fee-msat", type=int, default=RoundConfig.validator_fee_msat)
    c.add_argument("--payout", choices=("split", "best"), default="split")
    c.add_argument("--mode", choices=("auto", "hold", "custodial"), default="auto")
    c.add_argument(
        "--results-in",
        type=int,
        default=None,
        help="seconds to the results deadline (default: the escrow's minimum window + 30, at least 60)",
    )
    c.add_argument(
        "--validation-in",
        type=int,
        default=None,
        help="seconds to the validation deadline "
        "(default: results + 180; keep 90+ s after results + the escrow's 60 s grace)",
    )
    c.add_argument("--max-iter", type=int, default=RoundConfig.max_iter, help="training iterations asked of providers")
    c.add_argument("--fee-limit-msat", type=int, default=RoundConfig.fee_limit_msat)
    c.add_argument("--refund", help="lud16 / lnurl for a custodial refund")
    c.add_argument("--rounds", type=int, default=1, help="chain N rounds (each starts from the last average)")
    c.add_argument("--previous-job", help="link the first round to this earlier job id")
    c.add_argument("--seed", type=int, default=ml.DEFAULT_SEED, help="data split seed")
    c.add_argument(
        "--no-sealing",
        action="store_true",
        help="do not require sealed results (then providers may publish their models in the clear)",
    )
    c.add_argument(
        "--key-timeout", type=float, default=RoundConfig.key_timeout, help="seconds to wait for the escrow's model keys"
    )

    p = sub.add_parser("provider", help="train on assigned shards, publish models, claim rewards")
    _common(p)
    p.add_argument("--lud16", help="lightning address to be paid at (instead of, or without, an LND node)")
    p.add_argument("--dishonest", action="store_true", help="return random weights instead of training (testing)")
    p.add_argument(
        "--lazy", action="store_true", help="return the job's starting model unchanged (testing relative acceptance)"
    )
    p.add_argument("--max-iter", type=int, default=10, help="training iterations unless the job says otherwise")
    p.add_argument("--jobs", type=int, help="exit after this many jobs (default: run until interrupted)")
    p.add_argument("--since", type=int, help="also handle jobs published since this Unix time (default: now-60)")
    p.add_argument("--allow-private-lnurl", action="store_true", help="development: lud16 on localhost/http")
    g = p.add_argument_group("acceptance policy (applied to each job before training)")
    g.add_argument(
        "--trust-validator",
        action="append",
        type=_pubkey,
        default=None,
        help="a validator we trust (repeatable); default: the escrow's announced validator pool",
    )
    g.add_argument(
        "--min-reward-per-shard-msat",
        type=int,
        default=0,
        help="refuse jobs paying less per shard (announced as our price)",
    )
    g.add_argument("--hardware", help="the hardware we announce and take jobs for (default: cpu:<cores>)")
    g.add_argument("--max-threshold", type=_decimal, help="refuse 'max' jobs whose threshold is above this")
    g.add_argument("--min-threshold", type=_decimal, help="refuse 'min' jobs whose threshold is below this")
    g.add_argument(
        "--allow-unsealed",
        action="store_true",
        help="take jobs whose result cannot be sealed (the customer validates: it reads the model unpaid)",
    )
    g.add_argument("--no-seal", action="store_true", help="publish the model in the clear when the job allows it")

    v = sub.add_parser("validator", help="score candidate models on held-out data, claim fees")
    _common(v)
    v.add_argument("--lud16", help="lightning address to be paid at (instead of, or without, an LND node)")
    v.add_argument("--holdout-index", type=int, default=0, help="which part of the hold-out pool is ours")
    v.add_argument("--holdout-count", type=int, default=1, help="how many parts the pool is cut into")
    v.add_argument(
        "--text-holdout",
        type=Path,
        help="DiLoCo jobs: a file of held-out text to score language models on (without it we score digits only)",
    )
    v.add_argument("--seed", type=int, default=ml.DEFAULT_SEED, help="data split seed")
    v.add_argument("--jobs", type=int, help="exit after this many evaluation requests")
    v.add_argument("--since", type=int, help="also answer requests published since this Unix time")
    v.add_argument("--allow-private-lnurl", action="store_true", help="development: lud16 on localhost/http")
    v.add_argument(
        "--plain-scores", action="store_true", help="publish scores in the clear (default: sealed to the escrow)"
    )

    d = sub.add_parser("demo", help="a whole round: 1 customer, 3 providers (1 dishonest), 2 validators")
    d.add_argument("--escrow-url", default="http://127.0.0.1:8080", help="the escrow service (default %(default)s)")
    d.add_argument("--stack", type=Path, default=DEFAULT_STACK, help="devstack stack.json (default %(default)s)")
    d.add_argument("--relay", help="relay URL (default: the escrow's first relay)")
    d.add_argument("--blob-url", help="Blossom server URL (default: <escrow-url>/blobs)")
    d.add_argument("--rounds", type=int, default=1)
    d.add_argument("--results-in", type=int, default=60)
    d.add_argument("--validation-in", type=int, default=240)
    d.add_argument("--key-dir", type=Path, help="keep the demo's keys here (default: fresh keys each run)")
    d.add_argument("--seed", type=int, default=ml.DEFAULT_SEED)
    d.add_argument("--json", action="store_true", help="print the summary as JSON")
    return ap


# ----------------------------------------------------------------------------- wiring


def _lnd(args: argparse.Namespace, *, required: bool):
    from service.lightning.client import LndClient

    if args.stack or args.node:
        if not (args.stack and args.node):
            raise AgentError("--stack and --node go together")
        node = json.loads(args.stack.read_text())["nodes"][args.node]
        return LndClient.from_files(node["rpc"], node["tls_cert"], node["macaroon"])
    if args.lnd_host or args.lnd_cert or args.lnd_macaroon:
        if not (args.lnd_host and args.lnd_cert and args.lnd_macaroon):
            raise AgentError("--lnd-host, --lnd-cert and --lnd-macaroon go together")
        return LndClient.from_files(args.lnd_host, args.lnd_cert, args.lnd_macaroon)
    if required:
        raise AgentError("this agent needs an LND node: --lnd-host/--lnd-cert/--lnd-macaroon or --stack/--node")
    return None


async def _endpoints(args: argparse.Namespace) -> tuple[str, Relays, str, str | None]:
    """(escrow pubkey, relays, blob URL, network) from the flags and, if given, /v1/info."""
    escrow, relays, network = args.escrow, list(args.relay), None
    if args.escrow_url:
        info = await escrow_info(args.escrow_url)
        if escrow and escrow != info.pubkey:
            raise AgentError("--escrow differs from the key the --escrow-url announces")
        escrow, network = info.pubkey, info.network or None
        relays = relays or list(info.relays)
    if not escrow:
        raise AgentError("give --escrow-url or --escrow")
    if not relays:
        raise AgentError("give --relay (the escrow announced none)")
    blob_url = args.blob_url or (f"{args.escrow_url.rstrip('/')}/blobs" if args.escrow_url else None)
    if not blob_url:
        raise AgentError("give --blob-url (or --escrow-url, whose /blobs is used)")
    return escrow, Relays(relays), blob_url, network


def _say(phase: str, message: str) -> None:
    print(f"{phase:<10} {message}", flush=True)


def _dump(obj: object) -> str:
    def default(o: object) -> object:
        if hasattr(o, "__dict__"):
            return {k: v for k, v in o.__dict__.items() if k != "model"}
        return str(o)

    return json.dumps(obj, default=default, indent=2, sort_keys=True)


async def _customer(args: argparse.Namespace) -> int:
    escrow, relays, blob_url, _ = await _endpoints(args)
    key = load_key(args.key_dir, "customer", args.name)
    terms = await escrow_terms(relays, escrow)
    window = (terms.min_results_window_s + 30) if terms else 630
    results_in = args.results_in or max(60, window)
    config = RoundConfig(
        bid_msat=args.bid_msat,
        validator_fee_msat=args.validator_fee_msat,
        threshold=args.threshold,
        quorum=args.quorum or max(1, len(args.validator)),
        payout=args.payout,
        mode=args.mode,
        results_in=results_in,
        validation_in=args.validation_in or results_in + 180,
        max_iter=args.max_iter,
        fee_limit_msat=args.fee_limit_msat,
        refund=args.refund,
        sealing=not args.no_sealing,
        key_timeout=args.key_timeout,
        hardware=args.hardware,
        max_runtime_s=args.max_runtime_s,
    )
    count = args.discover or len(args.provider)
    split = ml.split_digits(count, max(1, len(args.validator)), seed=args.seed)
    lnd = _lnd(args, required=True)
    try:
        customer = Customer(
            key,
            relays,
            escrow,
            Blobs(blob_url, key, max_model_bytes=args.max_model_bytes),
            lnd,
            name=args.name,
            terms=terms,
            progress=_say,
            escrow_url=args.escrow_url,
        )
        _say("setup", f"customer {args.name} {key.public_key_hex} -> escrow {escrow[:12]} on {', '.join(relays.urls)}")
        providers = args.provider or await customer.discover(
            count, task=DIGITS, config=config, validators=args.validator
        )
        previous, model, reports = args.previous_job, None, []
        for n in range(1, args.rounds + 1):
            report = await customer.run_round(
                providers=providers,
                validators=args.validator,
                shards=list(split.shards),
                test=split.test,
                config=config,
                previous_job=previous,
                start_model=model,
                round_no=n,
            )
            reports.append(report.summary())
            _say(
                "round",
                f"round {n}: job {report.job_id} {report.outcome}, accuracy {report.accuracy}, "
                f"paid {report.paid_msat} msat",
            )
            if report.model is None:
                break
            previous, model = report.job_id, report.model
    finally:
        await lnd.close()
    if args.json:
        print(_dump(reports))
    return 0 if reports and all(r["outcome"] == "validated" for r in reports) else 1


async def _payee(args: argparse.Namespace) -> int:
    from .provider import AcceptancePolicy, Provider
    from .validator import Validator

    escrow, relays, blob_url, network = await _endpoints(args)
    key = load_key(args.key_dir, args.role, args.name)
    lnd = _lnd(args, required=not args.lud16)
    common = dict(
        lnd=lnd,
        lud16=args.lud16,
        name=args.name,
        progress=_say,
        network=network,
        allow_private_lnurl=args.allow_private_lnurl,
    )
    agent: Provider | Validator
    try:
        if args.role == "provider":
            policy = AcceptancePolicy(
                min_reward_per_shard_msat=args.min_reward_per_shard_msat,
                max_threshold=args.max_threshold,
                min_threshold=args.min_threshold,
                trusted_validators=frozenset(args.trust_validator) if args.trust_validator else None,
                require_sealing=not args.allow_unsealed,
            )
            agent = Provider(
                key,
                relays,
                escrow,
                Blobs(blob_url, key, max_model_bytes=args.max_model_bytes),
                dishonest=args.dishonest,
                lazy=args.lazy,
                max_iter=args.max_iter,
                policy=policy,
                seal=not args.no_seal,
                hardware=args.hardware,
                **common,
            )
        else:
            holdout = ml.validator_holdout(args.holdout_index, args.holdout_count, seed=args.seed)
            agent = Validator(
                key,
                relays,
                escrow,
                Blobs(blob_url, key, max_model_bytes=args.max_model_bytes),
                holdout,
                escrow_url=args.escrow_url,
                seal_scores=not args.plain_scores,
                text_holdout=args.text_holdout.read_bytes() if args.text_holdout else None,
                **common,
            )
        _say(
            "setup",
            f"{args.role} {args.name} {key.public_key_hex} ({encode_npub(key.public_key_hex)}) "
            f"watching {', '.join(relays.urls)} for escrow {escrow[:12]}",
        )
        reports = await agent.serve(jobs=args.jobs, since=args.since)
    finally:
        if lnd is not None:
            await lnd.close()
    if args.json:
        print(_dump(reports))
    return 0 if all(getattr(r, "error", None) is None for r in reports) else 1  # a refused job is no error


async def _demo(args: argparse.Namespace) -> int:
    from .demo import demo_problems, format_summary, print_progress, run_demo

    config = RoundConfig(results_in=args.results_in, validation_in=args.validation_in)
    summary = await run_demo(
        args.stack,
        args.escrow_url,
        args.relay,
        args.blob_url,
        rounds=args.rounds,
        progress=print_progress(),
        config=config,
        key_dir=args.key_dir,
        seed=args.seed,
    )
    print(_dump(summary) if args.json else format_summary(summary))
    validated = summary["rounds"] and all(r["outcome"] == "validated" for r in summary["rounds"])
    return 0 if validated and not demo_problems(summary) else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "whoami":
        key = load_key(args.key_dir, args.role, args.name)
        print(
            f"{key.public_key_hex}\n{encode_npub(key.public_key_hex)}\n{key_path(args.key_dir, args.role, args.name)}"
        )
        return 0
    args.role = args.command
    run = {"customer": _customer, "provider": _payee, "validator": _payee, "demo": _demo}[args.command]
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130
    except (AgentError, RelayError, ValueError, OSError) as exc:
        print(f"fedstr-escrow agent {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
