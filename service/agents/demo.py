"""A whole federated-learning round (or several) with the reference agents, against a running escrow.

Cast: one customer (pays from the devstack's ``customer`` LND node), three providers
``alice``, ``bob`` and ``mallory`` (mallory is dishonest: random weights) and two
validators ``victor`` and ``vera``; every payee creates its own invoices on the ``payee``
node. Each round: the customer posts 3 private shards, 2 validators, quorum 2,
``payout split``; the providers train, the validators score, the escrow decides and pays;
the customer averages the accepted models (FedAvg). The providers announce their capabilities
first (protocol.md §1a, each its own price per shard) and the customer discovers them
(:func:`discover_cast`), cheapest first, instead of being given their keys. With ``rounds > 1`` each round links
the previous job and starts from the previous round's averaged model.

Every model is sealed (protocol.md §5a): the customer reads a model only with the content key
the escrow releases once its provider is paid. A last round (``refund_round``) asks for an
accuracy no model reaches (:data:`REFUND_THRESHOLD`, still within the providers' policy): it is
refunded, and the customer gets no key at all. The summary shows, per model, whether the
customer received its key and could read it (:func:`sealing_problems` checks it).

:func:`run_demo` prints progress through ``progress(phase, message)`` and returns a summary:
who got what (msat), fees, accuracy per round, keys, time per phase.

``task="diloco"`` plays DiLoCo rounds of a small language model instead (the ``lm`` extra;
:mod:`service.agents.lm`): alice and bob run the inner AdamW steps on their text shards,
mallory is lazy (returns the round's global model unchanged), the validators score held-out
loss, and the customer applies the outer Nesterov step, its momentum kept from round to round.
The summary shows the global model's loss per round.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path

import httpx

from service.audit import AuditFetchError, audit_job
from service.lightning.client import LndClient
from service.nostr.nip01 import SecretKey
from service.nostr.protocol import EscrowTerms

from . import ml
from .common import AgentError, Progress, escrow_announcement, escrow_info, load_key
from .customer import Customer, RoundConfig, RoundReport
from .provider import AcceptancePolicy, Provider, ProviderReport
from .relay import Relays
from .storage import Blobs
from .tasks import DEFAULT_INNER_STEPS, DIGITS, DILOCO, DiLoCoRun
from .validator import Validator, ValidatorReport

PROVIDER_NAMES = ("alice", "bob", "mallory")  # the last one is dishonest
#: What each provider announces as its price per shard (and takes at least): all below the
#: demo round's reward per shard (about 950 000 msat), so that the customer discovers all three.
PROVIDER_PRICES_MSAT = {"alice": 200_000, "bob": 250_000, "mallory": 100_000}
VALIDATOR_NAMES = ("victor", "vera")
#: The providers take no job asking more accuracy than this; the refunded round asks exactly it,
#: which no model of the demo reaches (about 0.9 after one round).
MAX_THRESHOLD = Decimal("0.99")
REFUND_THRESHOLD = MAX_THRESHOLD
#: DiLoCo: the most held-out loss (nats per byte) an accepted model may have (an untrained model
#: has about 5.5, uniform over bytes), and the one the refunded round asks (no model reaches it).
LM_THRESHOLD = Decimal("4.5")
LM_REFUND_THRESHOLD = Decimal("0.5")
#: DiLoCo rounds use relative acceptance: a model must beat the round's global model on the
#: validators' hold-outs by this much (nats per byte), so a lazy provider is never paid.
LM_MIN_IMPROVEMENT = Decimal("0.01")
TASKS = ("digits", "diloco")


def demo_key(key_dir: Path | str | None, role: str, name: str) -> SecretKey:
    """A demo agent's key: fresh, or kept in ``key_dir`` (as ``<role>-demo-<name>.key``)."""
    return SecretKey.generate() if key_dir is None else load_key(key_dir, role, f"demo-{name}")


def demo_validator_pool(key_dir: Path | str) -> list[tuple[str, str]]:
    """``(pubkey, name)`` of the demo's validators (keys kept in ``key_dir``): the pool the demo's
    escrow announces, so that the providers' default policy trusts them."""
    return [(demo_key(key_dir, "validator", name).public_key_hex, name) for name in VALIDATOR_NAMES]


def print_progress(start: float | None = None) -> Progress:
    """A ``progress`` callback printing ``[  12.3s] phase      message``."""
    t0 = time.monotonic() if start is None else start

    def show(phase: str, message: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {phase:<10} {message}", flush=True)

    return show


@dataclass
class Cast:
    """The agents of the demo, sharing relays, escrow and blob server."""

    customer: Customer
    providers: list[Provider]
    validators: list[Validator]
    split: ml.DigitsSplit
    diloco: DiLoCoRun | None = None  # the DiLoCo task's chain of rounds (None: digits)
    names: dict[str, str] = field(default_factory=dict)  # pubkey -> name
    roles: dict[str, str] = field(default_factory=dict)  # pubkey -> role
    announced_since: int | None = None  # when the providers announced their capabilities
    # the providers the customer found (run_demo), in shard order; None: the cast's, in its order
    discovered: list[str] | None = None

    @property
    def task(self) -> str:
        return DIGITS if self.diloco is None else DILOCO

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Cast]:
        """Providers announce their capabilities, then they and the validators listen (in the
        background) while the block runs."""
        since = int(time.time()) - 5
        # discovery reads only these announcements (signed from now on), not an earlier run's
        self.announced_since = int(time.time())
        await asyncio.gather(*(p.publish_capabilities() for p in self.providers))
        tasks = [
            *(
                asyncio.create_task(p.serve(since=since, announce=False), name=f"serve {p.name}")
                for p in self.providers
            ),
            *(asyncio.create_task(v.serve(since=since), name=f"serve {v.name}") for v in self.validators),
        ]
        try:
            await asyncio.sleep(0.5)  # let the subscriptions reach the relays
            yield self
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t


def build_cast(
    *,
    relays: Relays,
    escrow: str,
    blob_url: str,
    customer_lnd: LndClient,
    payee_lnd: LndClient,
    terms: EscrowTerms | None,
    progress: Progress,
    key_dir: Path | str | None = None,
    seed: int = ml.DEFAULT_SEED,
    network: str | None = None,
    escrow_url: str | None = None,
    pool: frozenset[str] | None = None,
    task: str = "digits",
    inner_steps: int = DEFAULT_INNER_STEPS,
) -> Cast:
    """The demo's agents. ``pool``: the escrow's announced validator pool. When it holds the demo's
    validators the providers keep their default policy (trust the pool); otherwise (an escrow that
    announces none, fresh keys) they are told to trust the demo's validators by name."""

    def key(role: str, name: str) -> SecretKey:
        return demo_key(key_dir, role, name)

    split = ml.split_digits(len(PROVIDER_NAMES), len(VALIDATOR_NAMES), seed=seed)
    diloco: DiLoCoRun | None = None
    text_holdouts: tuple[bytes | None, ...] = (None,) * len(VALIDATOR_NAMES)
    if task == "diloco":
        from . import lm

        text = lm.split_corpus(len(PROVIDER_NAMES), len(VALIDATOR_NAMES), seed=seed)
        diloco = DiLoCoRun(text.shards, text.test, lm.LMConfig(), inner_steps=inner_steps)
        text_holdouts = text.holdouts
    elif task != "digits":
        raise ValueError(f"unknown task {task!r} (one of {', '.join(TASKS)})")
    ck = key("customer", "carol")
    customer = Customer(
        ck,
        relays,
        escrow,
        Blobs(blob_url, ck),
        customer_lnd,
        name="carol",
        terms=terms,
        progress=progress,
        escrow_url=escrow_url,
    )
    validator_keys = [key("validator", name) for name in VALIDATOR_NAMES]
    ours = frozenset(k.public_key_hex for k in validator_keys)
    policy = AcceptancePolicy(max_threshold=MAX_THRESHOLD)
    if pool is None or not ours <= pool:
        policy = replace(policy, trusted_validators=ours)
        progress(
            "setup", "the escrow's validator pool does not name the demo's validators: providers trust them by name"
        )
    providers = []
    for name in PROVIDER_NAMES:
        k = key("provider", name)
        providers.append(
            Provider(
                k,
                relays,
                escrow,
                Blobs(blob_url, k),
                lnd=payee_lnd,
                name=name,
                dishonest=(name == "mallory" and diloco is None),
                lazy=(name == "mallory" and diloco is not None),
                policy=replace(policy, min_reward_per_shard_msat=PROVIDER_PRICES_MSAT[name]),
                progress=progress,
                network=network,
            )
        )
    validators = []
    for i, (name, k) in enumerate(zip(VALIDATOR_NAMES, validator_keys, strict=True)):
        validators.append(
            Validator(
                k,
                relays,
                escrow,
                Blobs(blob_url, k),
                split.holdouts[i],
                lnd=payee_lnd,
                name=name,
                progress=progress,
                network=network,
                escrow_url=escrow_url,
                text_holdout=text_holdouts[i],
            )
        )
    cast = Cast(customer=customer, providers=providers, validators=validators, split=split, diloco=diloco)
    everyone: list[Customer | Provider | Validator] = [customer, *providers, *validators]
    for agent in everyone:
        cast.names[agent.pubkey] = agent.name
        cheat = (
            " (dishonest)" if getattr(agent, "dishonest", False) else " (lazy)" if getattr(agent, "lazy", False) else ""
        )
        cast.roles[agent.pubkey] = agent.role + cheat
    return cast


async def job_state(
    service_url: str | None, job_id: str, *, wait_for: tuple[str, ...] = ("closed", "refunded"), timeout: float = 60.0
) -> str | None:
    """The job's state from ``GET /v1/jobs/<id>``, waiting (up to ``timeout``) for a final one."""
    if not service_url:
        return None
    state = None
    end = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=10, trust_env=False) as http:
        while time.monotonic() < end:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                r = await http.get(f"{service_url.rstrip('/')}/v1/jobs/{job_id}")
                if r.status_code == 200:
                    state = r.json().get("state")
                    if state in wait_for:
                        return state
            await asyncio.sleep(0.5)
    return state


async def run_round(
    cast: Cast,
    *,
    config: RoundConfig,
    round_no: int = 1,
    previous: RoundReport | None = None,
    service_url: str | None = None,
    progress: Progress | None = None,
    agent_timeout: float = 240.0,
) -> dict:
    """One round with ``cast`` (which must be :meth:`Cast.running`); returns the round's summary."""
    show = progress or cast.customer.progress
    t0 = time.monotonic()
    metric = "accuracy" if cast.diloco is None else "val_loss"
    show(
        "round",
        f"round {round_no}"
        + (f" (from job {previous.job_id[:8]}, {metric} {previous.test_value})" if previous else ""),
    )
    report = await cast.customer.run_round(
        providers=cast.discovered or [p.pubkey for p in cast.providers],
        validators=[v.pubkey for v in cast.validators],
        shards=list(cast.split.shards),
        test=cast.split.test,
        config=config,
        round_no=round_no,
        previous_job=previous.job_id if previous else None,
        start_model=previous.model if previous and cast.diloco is None else None,
        task=cast.diloco,
    )
    job_id = report.job_id
    t_verdict = time.monotonic()
    p_reports: list[ProviderReport] = []
    v_reports: list[ValidatorReport] = []
    for p in cast.providers:
        p_reports.append(await p.report_for(job_id, agent_timeout))
    for v in cast.validators:
        v_reports.append(await v.report_for(job_id, agent_timeout))
    state = await job_state(service_url, job_id)
    if state:
        show("closed", f"job {job_id[:8]} is {state}")
    report.timings["payouts"] = round(time.monotonic() - t_verdict, 3)

    payees: dict[str, dict] = {}
    pairs: list[tuple[Provider | Validator, ProviderReport | ValidatorReport]] = [
        *zip(cast.providers, p_reports, strict=True),
        *zip(cast.validators, v_reports, strict=True),
    ]
    for agent, r in pairs:
        reward = r.reward
        payees[agent.name] = {
            "role": cast.roles[agent.pubkey],
            "pubkey": agent.pubkey,
            "received_msat": reward.amount_msat if reward and reward.paid else 0,
            "paid": bool(reward and reward.paid),
            "payment_hash": reward.payment_hash if reward else None,
            "escrow_routing_fee_msat": reward.routing_fee_msat if reward and reward.paid else None,
            "note": (reward.why if reward and not reward.paid else "") or (r.error or ""),
        }
        if isinstance(r, ProviderReport):
            payees[agent.name].update(
                accepted=r.accepted, median=r.median, result_id=r.result_id, train_seconds=round(r.train_seconds, 3)
            )
        else:
            payees[agent.name].update(scores={cast_name(cast, report, rid): s for rid, s in r.scores.items()})
    paid_out = sum(p["received_msat"] for p in payees.values())
    routing = sum(p["escrow_routing_fee_msat"] or 0 for p in payees.values())
    summary = {
        "round": round_no,
        "job_id": job_id,
        "previous_job": report.previous_job,
        "state": state,
        "outcome": report.outcome,
        "mode": report.mode,
        "accuracy": report.accuracy,
        "metric": report.metric,
        "test_value": report.test_value,
        "outer_momentum_norm": (
            cast.diloco.momentum_norms[-1]
            if cast.diloco is not None and report.test_value is not None and cast.diloco.momentum_norms
            else None
        ),
        "models": [
            {
                "provider": cast.names.get(c.provider, c.provider[:8]),
                "shard": c.shard_index,
                "accepted": c.accepted,
                "median": c.median,
                "reward_msat": c.reward_msat,
                "customer_accuracy": c.accuracy,
                "customer_test_value": c.test_value,
                "sealed": c.sealed,
                "key_received": c.key_received,
                "key_source": c.key_source,
                "readable": c.readable,
                **({"problem": c.problem} if c.problem else {}),
            }
            for c in report.candidates
        ],
        "customer": {
            "name": cast.customer.name,
            "bid_msat": report.bid_msat,
            "paid_msat": report.paid_msat,
            "routing_fee_msat": report.routing_fee_msat,
            "payment": report.payment_status,
        },
        "payees": payees,
        "escrow": {
            "fee_msat_announced": report.escrow_fee_msat,
            "kept_msat": report.bid_msat - paid_out if report.outcome == "validated" else 0,
            "routing_fees_paid_msat": routing,
        },
        "timings": dict(report.timings, round_total=round(time.monotonic() - t0, 3)),
        "_report": report,
    }
    show(
        "summary",
        f"round {round_no}: {report.metric} {report.test_value}, "
        + ", ".join(f"{n} {p['received_msat']} msat" for n, p in payees.items()),
    )
    return summary


async def discover_cast(cast: Cast, config: RoundConfig) -> list[str]:
    """The customer finds its providers from their capability events (protocol.md §1a), as it would
    on a public relay; in the demo they must be the cast's own (a stranger announcing for this
    escrow on the same relay would never answer)."""
    found = await cast.customer.discover(
        len(cast.providers),
        task=cast.task,
        config=config,
        validators=[v.pubkey for v in cast.validators],
        since=cast.announced_since,
    )
    strangers = [pk[:12] for pk in found if pk not in {p.pubkey for p in cast.providers}]
    if strangers:
        raise AgentError(f"discovered providers that are not the demo's: {', '.join(strangers)}")
    return found


def cast_name(cast: Cast, report: RoundReport, result_id: str) -> str:
    for c in report.candidates:
        if c.result_id == result_id:
            return cast.names.get(c.provider, result_id[:8])
    return result_id[:8]


async def run_demo(
    stack_json_path: str | Path,
    service_url: str,
    relay_url: str | None = None,
    blob_url: str | None = None,
    rounds: int = 1,
    progress: Progress | None = None,
    *,
    config: RoundConfig | None = None,
    key_dir: Path | str | None = None,
    seed: int = ml.DEFAULT_SEED,
    refund_round: bool = True,
    task: str = "digits",
    inner_steps: int = DEFAULT_INNER_STEPS,
) -> dict:
    """Play ``rounds`` rounds against the escrow at ``service_url`` on the devstack of ``stack_json_path``,
    then (``refund_round``) one that asks for :data:`REFUND_THRESHOLD` and is refunded
    (``summary["refund_round"]``).

    ``relay_url`` defaults to the escrow's first relay (``/v1/info``), ``blob_url`` to
    ``<service_url>/blobs``. Keys are fresh unless ``key_dir`` is given.
    """
    t0 = time.monotonic()
    show = progress or print_progress(t0)
    stack = json.loads(Path(stack_json_path).read_text())
    info = await escrow_info(service_url)
    relays = Relays([relay_url] if relay_url else list(info.relays or [stack["relay"]["url"]]))
    blob_url = blob_url or f"{service_url.rstrip('/')}/blobs"
    announcement = await escrow_announcement(relays, info.pubkey)
    terms = announcement.terms if announcement else None
    pool = frozenset(v.pubkey for v in announcement.validator_pool) if announcement else None
    if config is None:
        config = (
            RoundConfig(threshold=LM_THRESHOLD, min_improvement=LM_MIN_IMPROVEMENT)
            if task == "diloco"
            else RoundConfig()
        )
    config = fit_config(config, terms)
    # the providers' training must end before the results deadline: the request says so
    config = replace(config, max_runtime_s=config.max_runtime_s or config.results_in)
    refund_threshold = LM_REFUND_THRESHOLD if task == "diloco" else REFUND_THRESHOLD
    show(
        "setup",
        f"escrow {info.pubkey[:12]} ({info.network}) on {', '.join(relays.urls)}; blobs at {blob_url}; "
        f"fee {terms.fee_base_msat if terms else '?'} msat + {terms.fee_ppm if terms else '?'} ppm; "
        f"deadlines +{config.results_in}s/+{config.validation_in}s",
    )
    nodes = stack["nodes"]
    customer_lnd = LndClient.from_files(
        nodes["customer"]["rpc"], nodes["customer"]["tls_cert"], nodes["customer"]["macaroon"]
    )
    payee_lnd = LndClient.from_files(nodes["payee"]["rpc"], nodes["payee"]["tls_cert"], nodes["payee"]["macaroon"])
    out: dict = {"escrow": info.pubkey, "relays": list(relays.urls), "blob_url": blob_url, "rounds": []}
    try:
        cast = build_cast(
            relays=relays,
            escrow=info.pubkey,
            blob_url=blob_url,
            customer_lnd=customer_lnd,
            payee_lnd=payee_lnd,
            terms=terms,
            progress=show,
            key_dir=key_dir,
            seed=seed,
            network=info.network or None,
            escrow_url=service_url,
            pool=pool,
            task=task,
            inner_steps=inner_steps,
        )
        out["agents"] = {name: {"pubkey": pk, "role": cast.roles[pk]} for pk, name in cast.names.items()}
        for name, a in out["agents"].items():
            show("setup", f"{name:<8} {a['role']:<22} {a['pubkey']}")
        previous: RoundReport | None = None
        if cast.diloco is not None:
            out["initial_val_loss"] = await asyncio.to_thread(cast.diloco.global_loss)
            show("setup", f"DiLoCo: the initial global model's test loss is {out['initial_val_loss']:.4f} nats/byte")
        async with cast.running():
            cast.discovered = await discover_cast(cast, config)
            for n in range(1, rounds + 1):
                summary = await run_round(
                    cast, config=config, round_no=n, previous=previous, service_url=service_url, progress=show
                )
                previous = summary.pop("_report")
                out["rounds"].append(summary)
                if previous.model is None:
                    show("stop", f"round {n} produced no model; stopping")
                    break
            if refund_round:
                summary = await run_round(
                    cast,
                    config=replace(config, threshold=refund_threshold),
                    round_no=len(out["rounds"]) + 1,
                    service_url=service_url,
                    progress=show,
                )
                summary.pop("_report")
                out["refund_round"] = summary
        out["discovered"] = [cast.names.get(pk, pk[:12]) for pk in cast.discovered or []]
        out["audits"] = await audit_rounds(relays, out, escrow=info.pubkey, progress=show)
    finally:
        await customer_lnd.close()
        await payee_lnd.close()
    totals: dict[str, int] = {}
    for r in out["rounds"]:
        for name, p in r["payees"].items():
            totals[name] = totals.get(name, 0) + p["received_msat"]
    out["totals_msat"] = totals
    out["task"] = task
    out["accuracy"] = [r["accuracy"] for r in out["rounds"]]
    out["val_loss"] = [r["test_value"] for r in out["rounds"]] if task == "diloco" else []
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


async def audit_rounds(relays: Relays, summary: dict, *, escrow: str, progress: Progress) -> list[dict]:
    """What anyone can check from the relays alone (``fedstr-escrow audit``), for every round of
    ``summary``: each job's decision recomputed from its published scores, and its amounts and
    receipts checked. A job the audit could not fetch is reported, not raised."""
    audits: list[dict] = []
    refund = summary.get("refund_round")
    for r in [*summary["rounds"], *([refund] if refund else [])]:
        try:
            report = await audit_job(relays, r["job_id"], escrow=escrow)
        except AuditFetchError as e:
            audits.append({"job_id": r["job_id"], "ok": False, "summary": f"not fetched: {e}", "discrepancies": []})
            continue
        progress("audit", report.summary())
        audits.append(
            {
                "job_id": r["job_id"],
                "ok": report.ok,
                "summary": report.summary(),
                "discrepancies": [f.as_dict() for f in report.discrepancies],
            }
        )
    return audits


def audit_problems(summary: dict) -> list[str]:
    """Every round's public record must audit clean."""
    problems = [f"job {a['job_id'][:12]}: {a['summary']}" for a in summary.get("audits", []) if not a["ok"]]
    for a in summary.get("audits", []):
        problems += [f"job {a['job_id'][:12]}: {d['code']}: {d['message']}" for d in a["discrepancies"]]
    if "audits" not in summary:
        problems.append("the rounds were not audited")
    return problems


def demo_problems(summary: dict) -> list[str]:
    """What went wrong in a demo run that otherwise finished: fair exchange, public record, and
    (DiLoCo) the training itself."""
    return sealing_problems(summary) + audit_problems(summary) + diloco_problems(summary)


def diloco_problems(summary: dict) -> list[str]:
    """DiLoCo rounds must lower the global model's held-out loss, round over round."""
    if summary.get("task") != "diloco":
        return []
    losses = [summary.get("initial_val_loss"), *summary.get("val_loss", [])]
    if any(v is None for v in losses):
        return [f"a round produced no global model: losses {losses}"]
    problems = [
        f"round {i}: the global model's loss did not fall ({losses[i - 1]} -> {losses[i]})"
        for i in range(1, len(losses))
        if not losses[i] < losses[i - 1]
    ]
    for r in summary["rounds"]:
        for name, p in r["payees"].items():
            if "(lazy)" in p["role"] and p["received_msat"]:
                problems.append(f"round {r['round']}: the lazy {name} was paid {p['received_msat']} msat")
            if p["role"] == "provider" and not p["received_msat"]:
                problems.append(f"round {r['round']}: the honest {name} was not paid")
    return problems


def sealing_problems(summary: dict) -> list[str]:
    """What broke the demo's fair exchange, if anything: the customer must have received the key of
    (and read) every paid model and no other (no rejected model, no model of the refunded round)."""
    problems: list[str] = []
    for r in summary["rounds"]:
        for m in r["models"]:
            paid = m["accepted"] and m["reward_msat"] != 0
            if paid and not (m["sealed"] and m["key_received"] and m["readable"]):
                problems.append(f"round {r['round']}: {m['provider']}'s paid model was not received sealed and opened")
            if not paid and (m["key_received"] or m["readable"]):
                problems.append(f"round {r['round']}: the customer got {m['provider']}'s unpaid model")
    refund = summary.get("refund_round")
    if refund is not None:
        if not str(refund["outcome"]).startswith("refunded"):
            problems.append(f"the last round was not refunded: {refund['outcome']}")
        if not refund["models"]:
            problems.append("the refunded round had no candidate")
        for m in refund["models"]:
            if m["key_received"] or m["readable"]:
                problems.append(f"refunded round: the customer got {m['provider']}'s model")
    return problems


def fit_config(config: RoundConfig, terms: EscrowTerms | None) -> RoundConfig:
    """Adjust the round to the escrow's announced terms (results window, bid bounds)."""
    if terms is None:
        return config
    results_in = max(config.results_in, terms.min_results_window_s + 30)
    validation_in = max(config.validation_in, results_in + 150)
    bid = min(max(config.bid_msat, terms.min_bid_msat), terms.max_bid_msat)
    return replace(config, results_in=results_in, validation_in=validation_in, bid_msat=bid)


def format_summary(summary: dict) -> str:
    """A human-readable table of :func:`run_demo`'s result."""
    lines = [f"escrow {summary['escrow'][:16]}…  ({summary['seconds']} s)"]
    if "discovered" in summary:
        found = summary["discovered"]
        lines.append(f"discovered {len(found)} providers from their capability events (kind 31990): {', '.join(found)}")
    refund = summary.get("refund_round")
    for r in [*summary["rounds"], *([refund] if refund else [])]:
        lines.append(
            f"round {r['round']}: job {r['job_id'][:16]}… {r['state'] or '?'} ({r['outcome']}, {r['mode']}), "
            + (
                f"accuracy of the average: {r['accuracy']}"
                if r.get("metric", "accuracy") == "accuracy"
                else f"global model's {r['metric']} after the outer step: {r['test_value']}"
            )
        )
        for m in r["models"]:
            if m.get("sealed"):
                access = "key received, opened" if m["readable"] else "key received" if m["key_received"] else "no key"
            else:
                access = "plain"
            lines.append(
                f"  model of {m['provider']:<8} shard {m['shard']}: "
                f"{'accepted' if m['accepted'] else 'rejected'} median {m['median']}, {access}, "
                f"customer-measured {r.get('metric', 'accuracy')} "
                f"{m.get('customer_test_value') or 'n/a (not readable)'}"
            )
        c = r["customer"]
        lines.append(
            f"  {c['name']} paid {c['paid_msat']} msat (bid {c['bid_msat']} + routing {c['routing_fee_msat']})"
        )
        for name, p in r["payees"].items():
            lines.append(
                f"  {name:<8} {p['role']:<22} received {p['received_msat']:>9} msat"
                + (f"  ({p['note']})" if p["note"] else "")
            )
        e = r["escrow"]
        lines.append(
            f"  escrow kept {e['kept_msat']} msat (announced fee {e['fee_msat_announced']}), "
            f"paid {e['routing_fees_paid_msat']} msat routing"
        )
        lines.append("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in r["timings"].items()))
    if summary.get("task") == "diloco":
        lines.append(loss_table(summary))
    lines.append(_sealing_line(summary))
    lines.append(_audit_line(summary))
    return "\n".join(lines)


def _sealing_line(summary: dict) -> str:
    """One sentence: whose models the customer could read, and whose it could not."""
    got = sorted({m["provider"] for r in summary["rounds"] for m in r["models"] if m.get("readable")})
    not_got = sorted({m["provider"] for r in summary["rounds"] for m in r["models"] if not m.get("readable")})
    text = f"sealing: the customer received keys for the paid models only ({', '.join(got) or 'none'})"
    if not_got:
        text += f"; it could not read {', '.join(not_got)}'s (rejected)"
    refund = summary.get("refund_round")
    if refund is not None:
        read = [m["provider"] for m in refund["models"] if m.get("key_received") or m.get("readable")]
        text += (
            f"; refunded round {refund['round']}: no key, no model readable"
            if not read
            else f"; refunded round {refund['round']}: the customer got {', '.join(read)}'s model"
        )
    problems = sealing_problems(summary)
    return text + ("" if not problems else "\n  PROBLEMS: " + "; ".join(problems))


def _audit_line(summary: dict) -> str:
    audits = summary.get("audits", [])
    clean = sum(1 for a in audits if a["ok"])
    text = f"audit (fedstr-escrow audit, from the relays alone): {clean} of {len(audits)} jobs without discrepancy"
    problems = audit_problems(summary)
    return text + ("" if not problems else "\n  PROBLEMS: " + "; ".join(problems))


def loss_table(summary: dict) -> str:
    """The DiLoCo global model's held-out loss round by round, as a table with a bar each."""
    losses = [("start", summary.get("initial_val_loss"))] + [
        (f"round {r['round']}", r["test_value"]) for r in summary["rounds"]
    ]
    known = [v for _, v in losses if v is not None]
    top = max(known) if known else 1.0
    rows = ["DiLoCo: the global model's test loss (nats per byte; lower is better)"]
    for label, value in losses:
        bar = "#" * round(40 * value / top) if value is not None else ""
        rows.append(f"  {label:<8} {value if value is not None else 'n/a':>8}  {bar}")
    return "\n".join(rows)
