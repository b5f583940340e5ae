"""Nostr intake: verify -> inbox -> parse, against the raw verification ceiling (same run).

20,000 mixed protocol events (job requests, results, evaluation results, payee
invoices, deletions; several hundred authors) arrive as relay JSON text. Two rates:

- **ceiling**: raw coincurve BIP-340 verification of the same events (keys parsed
  beforehand, ids given): the cost no verifier can avoid;
- **intake**: what the service does per event: ``json.loads`` -> strict NIP-01
  verification (shape, limits, id, signature) -> inbox insert in batches of 500
  (SQLite file, one transaction per batch, ON CONFLICT DO NOTHING) -> typed parse
  by kind with the escrow's codec.

    python -m bench.intake [--events 20000]

Target: intake >= 25% of the ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from decimal import Decimal

import coincurve

from bench.common import write
from service.db import create_engine, session_factory
from service.migrate import upgrade_async
from service.nostr.inbox import Inbox
from service.nostr.nip01 import Event, SecretKey, sign_event, verify_event
from service.nostr.protocol import (
    CodecError,
    Direction,
    EscrowTerms,
    JobSpec,
    Mode,
    ModelRef,
    Network,
    PayoutPolicy,
    Score,
    Shard,
    Validation,
    build_deletion,
    build_evaluation_result,
    build_job_request,
    build_payee_invoice,
    build_result,
    parse_deletion,
    parse_evaluation_result,
    parse_feedback,
    parse_job_request,
    parse_result,
)

TERMS = EscrowTerms(
    fee_base_msat=1_000,
    fee_ppm=10_000,
    min_bid_msat=1_000_000,
    max_bid_msat=10_000_000_000,
    max_validators=9,
    max_shards=32,
    min_results_window_s=600,
    max_job_duration_s=30 * 86_400,
    modes=frozenset({Mode.HOLD, Mode.CUSTODIAL}),
    network=Network.REGTEST,
    max_hold_seconds=3 * 86_400,
)
BOLT11 = (
    "lnbcrt500u1pn9u3z8pp5qqqsyqcyq5rqwzqfqqqsyqcyq5rqwzqfqqqsyqcyq5rqwzqfqypqdq5xysxxatsyp3k7enxv4jsxqzpu"
    "sp5zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zygs9qyysgqcqpcxqyz5vq"
)


def make_events(n: int, seed: int = 7) -> tuple[list[str], SecretKey, dict[str, object]]:
    """Wire-format events in a realistic mix, plus the escrow key."""
    rnd = random.Random(seed)
    now = int(time.time())
    escrow = SecretKey.generate()
    E = escrow.public_key_hex
    customers = [SecretKey.generate() for _ in range(60)]
    providers = [SecretKey.generate() for _ in range(300)]
    validators = [SecretKey.generate() for _ in range(40)]
    wire: list[str] = []
    jobs: list[tuple[Event, JobSpec]] = []
    while len(wire) < n:
        roll = rnd.random()
        if roll < 0.15 or not jobs:
            c = rnd.choice(customers)
            vs = tuple(v.public_key_hex for v in rnd.sample(validators, 2))
            spec = JobSpec(
                escrow=E,
                bid_msat=rnd.randrange(2_000_000, 90_000_000),
                shards=tuple(Shard(index=k, url=f"https://data.example.org/set/{len(wire)}/{k}.npz") for k in range(3)),
                validation=Validation("accuracy", Direction.MAX, Decimal("0.8"), 2),
                payout=PayoutPolicy.SPLIT,
                results_deadline=now + 3600,
                validation_deadline=now + 7200,
                validators=vs,
                validator_fee_msat=10_000,
                mode=Mode.AUTO,
            )
            ev = sign_event(c, *build_job_request(spec, customer=c.public_key_hex))
            jobs.append((ev, spec))
        else:
            job_ev, spec = rnd.choice(jobs)
            job = parse_job_request(job_ev, escrow_pubkey=E, terms=TERMS, now=now)
            if roll < 0.65:
                p = rnd.choice(providers)
                sha = rnd.randbytes(32).hex()
                ev = sign_event(
                    p,
                    *build_result(
                        job,
                        shard_index=rnd.randrange(3),
                        model=ModelRef(f"https://models.example.org/{sha}", sha, 80_000),
                    ),
                )
            elif roll < 0.85:
                v = next(k for k in validators if k.public_key_hex == spec.validators[0])
                ev = sign_event(
                    v,
                    *build_evaluation_result(
                        request_id=rnd.randbytes(32).hex(),
                        job_id=job.id,
                        escrow=E,
                        scores=tuple(
                            Score(
                                rnd.randbytes(32).hex(), Decimal(f"0.{rnd.randrange(10, 99)}"), rnd.randbytes(32).hex()
                            )
                            for _ in range(3)
                        ),
                    ),
                )
            elif roll < 0.95:
                p = rnd.choice(providers)
                ev = sign_event(p, *build_payee_invoice(job_id=job.id, escrow=E, amount_msat=50_000_000, bolt11=BOLT11))
            else:
                c = next(k for k in customers if k.public_key_hex == job.customer)
                ev = sign_event(c, *build_deletion((job.id,), escrow=E))
        wire.append(json.dumps(ev.to_dict()))
    return wire[:n], escrow, {"jobs": len(jobs)}


def ceiling_rate(wire: list[str]) -> float:
    prepared = []
    for text in wire:
        obj = json.loads(text)
        prepared.append(
            (
                coincurve.PublicKeyXOnly(bytes.fromhex(obj["pubkey"])),
                bytes.fromhex(obj["sig"]),
                bytes.fromhex(obj["id"]),
            )
        )
    t0 = time.perf_counter()
    for key, sig, msg in prepared:
        if not key.verify(sig, msg):
            raise AssertionError("a generated event did not verify")
    return len(prepared) / (time.perf_counter() - t0)


async def intake_rate(wire: list[str], escrow: SecretKey, batch: int = 500) -> tuple[float, dict]:
    tmp = tempfile.mkdtemp(prefix="fedstr-bench-intake-")
    url = f"sqlite+aiosqlite:///{tmp}/intake.sqlite3"
    await upgrade_async(url)
    engine = create_engine(url)
    inbox = Inbox(session_factory(engine))
    E = escrow.public_key_hex
    now = int(time.time())
    jobs: dict[str, object] = {}
    counts = {"stored": 0, "parsed": 0, "codec_refused": 0}
    t0 = time.perf_counter()
    pending: list[tuple[Event, str]] = []
    for text in wire:
        event = verify_event(json.loads(text), now=now)
        pending.append((event, "ws://bench"))
        if len(pending) >= batch:
            counts["stored"] += await inbox.store_many(pending)
            pending.clear()
        try:
            if event.kind == 5701:
                jobs[event.id] = parse_job_request(event, escrow_pubkey=E, terms=TERMS, now=now)
            elif event.kind == 6701:
                job_id = next(t[1] for t in event.tags if t[0] == "e")
                parse_result(event, jobs[job_id])
            elif event.kind == 6702:
                parse_evaluation_result(event, escrow_pubkey=E)
            elif event.kind == 7000:
                parse_feedback(event, escrow_pubkey=E)
            elif event.kind == 5:
                parse_deletion(event)
            counts["parsed"] += 1
        except CodecError:
            counts["codec_refused"] += 1
    counts["stored"] += await inbox.store_many(pending)
    rate = len(wire) / (time.perf_counter() - t0)
    await engine.dispose()
    return rate, counts


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=20_000)
    args = ap.parse_args()
    print(f"generating {args.events} signed events ...", flush=True)
    wire, escrow, info = make_events(args.events)
    kinds: dict[int, int] = {}
    for text in wire:
        k = json.loads(text)["kind"]
        kinds[k] = kinds.get(k, 0) + 1
    ceilings, intakes = [], []
    for _ in range(2):  # interleaved, to spread the machine's noise over both
        ceilings.append(ceiling_rate(wire))
        rate, counts = await intake_rate(wire, escrow)
        intakes.append(rate)
    ceiling, intake = max(ceilings), max(intakes)
    ratio = intake / ceiling
    print(f"raw coincurve verification ceiling: {ceiling:,.0f} events/s")
    print(
        f"intake (verify -> inbox -> parse, SQLite): {intake:,.0f} events/s -> {ratio:.1%} of the ceiling "
        f"(target >= 25%)"
    )
    unique = len({json.loads(t)["id"] for t in wire})  # identical events signed in the same second share an id
    assert counts["stored"] == unique, (counts, unique)
    path = write(
        "intake",
        {
            "events": len(wire),
            "kinds": {str(k): v for k, v in sorted(kinds.items())},
            "ceiling_events_per_s": round(ceiling),
            "intake_events_per_s": round(intake),
            "ratio": round(ratio, 3),
            "target_ratio": 0.25,
            "runs": {"ceiling": [round(x) for x in ceilings], "intake": [round(x) for x in intakes]},
            "counts": counts,
            "jobs": info["jobs"],
            "database": "sqlite",
        },
    )
    print(f"results: {path}")


if __name__ == "__main__":
    asyncio.run(main())
