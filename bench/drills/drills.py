"""The five drills. Each: a fresh database and escrow key, the service as its own process(es),
a batch of jobs played by :class:`bench.drills.market.Market`, faults injected while the jobs
run, then the service stopped and everything counted by :func:`bench.drills.audit.audit`.

A drill is bounded by a hard timeout; when it expires the jobs still open are left as they
are, the service is stopped and the audit reports them as not finished (the drill fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import time
import traceback
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import httpx
from sqlalchemy import func, select

from bench.common import fresh_pg_database
from bench.drills.audit import audit
from bench.drills.faults import Service, StackParts
from bench.drills.market import JobRun, Market, lnd
from service.db import aware, create_engine, session_factory
from service.escrow.models import Job, TimelineEntry
from service.lightning import errors as lnerr
from service.migrate import upgrade_async
from service.nostr.nip01 import SecretKey
from service.payouts import PayoutKind
from service.payouts.models import Payout, PayoutAttempt
from service.payouts.stuck import REISSUE_MARGIN_BLOCKS

OPEN = ("requested", "offered", "collecting", "validating", "releasing")


@dataclass
class Options:
    jobs: int | None = None
    kills: int = 20
    seed: int = 0
    lnd_outage: float = 30.0
    relay_down: float = 8.0
    timeout: float | None = None
    work: tuple[float, float, float] | None = None  # at most this long to train, score, pay (None: the drill's)
    lnd_stop_anytime: bool = False  # lnd-outage: also while a payout is being sent
    inject_stuck_payment: bool = False  # lnd-outage: LND's stuck IN_FLIGHT record of one payout (injected)
    outage: tuple[float, float] = (8.0, 40.0)  # deadline-outage: seconds the service stays down (drawn)


class Drill:
    name = ""
    postgres = False
    default_jobs = 10
    about = ""
    verdict: dict | None = None  # a drill's own checks beyond the audit (the adversarial drill's)
    needs_verdict = False

    def __init__(self, desc: dict, opts: Options, run_dir: Path, say) -> None:
        self.desc = desc
        self.opts = opts
        self.jobs = opts.jobs or self.default_jobs
        self.seed = opts.seed
        self.rng = random.Random(f"{opts.seed}:{self.name}")
        self.dir = run_dir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self._say = say
        self.parts = StackParts(desc)
        self.faults: list[dict] = []
        self.notes: list[str] = []
        self.services: list[Service] = []
        self.states: dict[str, str] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self.launched = 0
        self.t0 = time.monotonic()

    # ---- plumbing ---------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        self._say(f"[{time.monotonic() - self.t0:6.1f}s] {self.name}: {msg}")

    def timeout(self) -> float:
        return self.opts.timeout or (180 + 6 * self.jobs)

    async def database(self) -> str:
        if not self.postgres:
            url = f"sqlite+aiosqlite:///{self.dir / 'escrow.sqlite3'}"
        else:
            url = await fresh_pg_database(self.desc, f"drill_{self.name.replace('-', '_')}_{uuid.uuid4().hex[:10]}")
        await upgrade_async(url)  # before any replica starts: two would race on the migrations
        return url

    service_settings: dict[str, object] = {}  # a drill's own service settings (beyond DRILL_SETTINGS)

    def service(self, name: str) -> Service:
        svc = Service(
            name, self.desc, self.url, self.key.to_hex(), self.dir / f"service-{name}.log", **self.service_settings
        )
        self.services.append(svc)
        return svc

    def api_urls(self) -> list[str]:
        return [s.url for s in self.services if s.alive()]

    def snapshot(self) -> str:
        counts: dict[str, int] = {}
        for j in self.market.jobs:
            st = self.states.get(j.id) or ("posting" if j.phase == "new" else "requested")
            counts[st] = counts.get(st, 0) + 1
        order = ("posting", *OPEN, "closed", "refunding", "refunded", "cancelled", "rejected")
        shown = " ".join(f"{k} {counts[k]}" for k in order if counts.get(k))
        waiting = self.jobs - self.launched
        up = ",".join(f"{s.name}:{'up' if s.alive() else 'down'}" for s in self.services)
        return (
            f"closed {counts.get('closed', 0)}/{self.jobs} | {shown}{f' | to launch {waiting}' if waiting else ''}"
            f" | faults {len(self.faults)} | service {up}"
        )

    def count(self, *states: str) -> int:
        return sum(1 for j in self.market.jobs if self.states.get(j.id) in states)

    async def _monitor(self) -> None:
        """Job states from the database every second (tolerates a database that is down)."""
        engine = create_engine(self.url)
        sessions = session_factory(engine)
        last_print = 0.0
        try:
            while True:
                ids = [j.id for j in self.market.jobs if j.id]
                if ids:
                    try:
                        async with sessions() as s:
                            rows = (await s.execute(select(Job.id, Job.state).where(Job.id.in_(ids)))).all()
                        self.states.update(dict(rows))
                    except Exception:  # noqa: BLE001 - PostgreSQL restarting: keep the last view
                        pass
                for j in self.market.jobs:
                    t = self.tasks.get(j.id)
                    if self.states.get(j.id) == "closed" and t is not None and not t.done():
                        j.times["closed"] = round(time.monotonic() - self.market.t0, 2)
                        t.cancel()
                if time.monotonic() - last_print >= 5:
                    last_print = time.monotonic()
                    self.say(self.snapshot())
                await asyncio.sleep(1)
        finally:
            await engine.dispose()

    async def _job(self, job: JobRun) -> None:
        try:
            await self.market.run_job(job)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a job's agent failing is a finding, reported
            self.notes.append(f"job {job.plan.n} ({job.id[:12]}) agent error: {type(e).__name__}: {e}")
            self.say(f"job {job.plan.n}: agent error {type(e).__name__}: {e}")

    def launch_gate(self, n: int) -> bool:
        """May job ``n`` be launched now? (The sigkill drill spreads the launches over its kills.)"""
        return True

    async def launch(self, stagger: float) -> None:
        for n in range(self.jobs):
            while not self.launch_gate(n):
                await asyncio.sleep(0.1)
            await self._launch_one(self.market.new_job(n))
            await asyncio.sleep(stagger * self.rng.uniform(0.5, 1.5))

    async def _launch_one(self, job: JobRun) -> None:
        """Start ``job``'s run and wait until it has an id (its request is signed)."""
        task = asyncio.create_task(self._job(job))
        while not job.id and not task.done():
            await asyncio.sleep(0.01)
        self.tasks[job.id] = task
        self.launched += 1

    async def until(self, predicate, what: str, timeout: float = 3600) -> None:
        end = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > end:
                raise TimeoutError(what)
            await asyncio.sleep(0.2)

    async def until_finished(self, launcher: asyncio.Task) -> None:
        await launcher
        await self.until(lambda: all(self.states.get(j.id) == "closed" for j in self.market.jobs), "jobs closed")

    def fault(self, kind: str, **detail: object) -> dict:
        f = {
            "n": len(self.faults) + 1,
            "kind": kind,
            "at_s": round(time.monotonic() - self.t0, 1),
            "jobs_open": self.count(*OPEN),
            **detail,
        }
        self.faults.append(f)
        self.say(f"FAULT {f['n']}: {kind} " + " ".join(f"{k}={v}" for k, v in detail.items()) + " | " + self.snapshot())
        return f

    def recovered(self, f: dict, **detail: object) -> None:
        f.update(detail)
        self.say(
            f"fault {f['n']} ({f['kind']}) over: "
            + " ".join(f"{k}={v}" for k, v in detail.items())
            + " | "
            + self.snapshot()
        )

    # ---- the run ------------------------------------------------------------------------------
    async def run(self) -> dict:
        self.t0 = time.monotonic()
        self.say(f"seed {self.seed}, {self.jobs} jobs; {self.about}; logs in {self.dir}")
        self.url = await self.database()
        self.key = SecretKey.generate()
        self.market = Market(
            self.desc,
            self.key.public_key_hex,
            self.api_urls,
            seed=f"{self.seed}:{self.name}",
            run_id=f"{self.name}-{uuid.uuid4().hex[:8]}",
            work=self.opts.work or self.work,
        )
        monitor = asyncio.create_task(self._monitor())
        timed_out = errored = False
        try:
            await asyncio.wait_for(self.body(), self.timeout())
        except TimeoutError:
            timed_out = True
            self.notes.append(f"HARD TIMEOUT after {self.timeout():.0f} s: {self.snapshot()}")
            self.say(f"hard timeout ({self.timeout():.0f} s)")
        except Exception as e:  # noqa: BLE001 - reported as the drill's failure
            errored = True
            self.notes.append(f"drill error: {type(e).__name__}: {e}")
            self.say("drill error:\n" + traceback.format_exc())
        finally:
            for t in self.tasks.values():
                t.cancel()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            for s in self.services:
                s.stop()
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await monitor
            await self.restore()
        seconds = time.monotonic() - self.t0
        self.say("service stopped; counting from the payee, escrow and customer nodes and the database")
        counted = await audit(self.desc, self.url, self.market, self.parts)
        audit_notes = counted.pop("audit_notes")
        await self.market.close()
        passed = (
            not timed_out
            and not errored
            and counted["jobs_finished"] == counted["jobs_total"]
            and counted["duplicate_payments"] == 0
            and counted["facts_lost"] == 0
            and counted["ledger_imbalance_msat"] == 0
            and counted["ledger_violations"] == 0
            and counted["reconciliation_discrepancy_msat"] == 0
            and counted["unpaid"] == 0
            and counted["payments_made"] == counted["payments_expected"]
            and (not self.needs_verdict or bool(self.verdict and self.verdict["ok"]))
        )
        durations = [
            j.times["closed"] - j.times["requested"]
            for j in self.market.jobs
            if "closed" in j.times and "requested" in j.times
        ]
        result = {
            "drill": self.name,
            "about": self.about,
            "seed": self.seed,
            "passed": passed,
            "faults_injected": len(self.faults),
            "seconds": round(seconds, 1),
            **counted,
            "faults": self.faults,
            "job_seconds": {
                "min": round(min(durations), 1),
                "median": round(sorted(durations)[len(durations) // 2], 1),
                "max": round(max(durations), 1),
            }
            if durations
            else None,
            "market": {
                "events_published": self.market.publish.published,
                "events_republished": self.market.publish.republished,
                "relay_resubscriptions": self.market.hub.reconnects,
                "rest_payout_invoices": self.market.rest_submissions,
                "api_event_posts": self.market.api_posts,
                "customer_payment_attempts": sum(j.pay_attempts for j in self.market.jobs),
            },
            "service_starts": sum(s.starts for s in self.services),
            "hostile": self.verdict,
            "database": "postgresql" if self.postgres else "sqlite",
            "logs": str(self.dir),
            "notes": self.notes + audit_notes,
        }
        (self.dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        return result

    async def restore(self) -> None:
        """Leave the stack as ``up`` left it, whatever happened."""
        try:
            if not self.parts.stack.alive("relay"):
                await self.parts.start_relay()
            if not self.parts.stack.alive("lnd-escrow"):
                await self.parts.start_lnd("escrow")
            if self.desc.get("postgres") and not self.parts.stack.alive("postgres") and getattr(self, "_pg_argv", None):
                await self.parts.start_postgres(self._pg_argv)
        except Exception as e:  # noqa: BLE001
            self.notes.append(f"restoring the stack failed: {e}")
        bad = await self.parts.health()
        if bad:
            self.notes.append(f"stack not healthy after the drill: {bad}")

    async def body(self) -> None:
        raise NotImplementedError

    async def start_one(self, die_at: str | None = None) -> tuple[Service, asyncio.Task]:
        svc = self.service("a")
        svc.start(die_at)
        await svc.wait_ready(90)
        self.market.hub.start()
        return svc, asyncio.create_task(self.launch(self.stagger()))

    def stagger(self) -> float:
        return 1.0

    work = (4.0, 2.0, 2.0)  # seconds a provider may train, a validator take to score, a customer to pay


# ------------------------------------------------------------------------------ sigkill
class SigkillDrill(Drill):
    name = "sigkill"
    default_jobs = 50
    about = (
        "SIGKILL of the service at random moments; some exactly between a payout's write-ahead and its send, "
        "some between its attempt's recorded success and the payout's"
    )

    def timeout(self) -> float:
        return self.opts.timeout or (240 + 5 * self.jobs + 20 * self.opts.kills)

    work = (12.0, 6.0, 2.0)  # jobs last long enough for many to be in flight at every kill

    def stagger(self) -> float:
        return 0.6

    def launch_gate(self, n: int) -> bool:
        # launches follow the kills (the last ones after 80 % of them), so jobs are in flight at every kill
        return len(self.faults) >= int(n * self.opts.kills * 0.8 / max(1, self.jobs))

    def plan(self) -> list[str]:
        """r: SIGKILL from outside at a random moment; W: the process kills itself right after a
        payout's write-ahead, before its send; S: right after LND's SUCCEEDED is recorded on the
        attempt, before the payout is marked succeeded.

        A quarter of the kills (at least one) are W, an eighth (at least one from 3 kills) S,
        never first (no payout exists yet) nor in the last fifth (the last jobs are launched by
        then, and their payouts may all be done)."""
        k = self.opts.kills
        if k <= 0:
            return []
        n_wa, n_s = max(1, k // 4), (max(1, k // 8) if k >= 3 else 0)
        first = min(2, k - 1)
        slots = list(range(first, max(first + n_wa + n_s, int(k * 0.8))))[: k - first]
        chosen = self.rng.sample(slots, min(n_wa + n_s, len(slots)))
        kinds = {i: ("write-ahead" if n < n_wa else "settled") for n, i in enumerate(chosen)}
        return [kinds.get(i, "random") for i in range(k)]

    async def body(self) -> None:
        svc = self.service("a")
        plan = self.plan()
        code = {"random": "r", "write-ahead": "W", "settled": "S"}
        self.say(
            f"kill plan: {' '.join(code[p] for p in plan)} (r = SIGKILL from outside at a random moment; "
            f"the process kills itself: W = after a payout's write-ahead, S = after its attempt succeeded)"
        )
        launcher = None
        ready_s = [3.0]  # how long a start takes here (start-up kills land inside it)
        for kind in plan:
            point = {"write-ahead": "send", "settled": "settled"}.get(kind)
            die_at = f"{point}:{self.rng.randint(1, 2)}" if point else None
            started = time.monotonic()
            svc.start(die_at=die_at)
            if launcher is None:
                await svc.wait_ready(90)
                self.market.hub.start()
                launcher = asyncio.create_task(self.launch(self.stagger()))
            if point:
                await self.self_kill(svc, die_at)
                continue
            phase = "start-up" if self.rng.random() < 0.15 else "running"
            if phase == "start-up":
                await asyncio.sleep(self.rng.uniform(0.3, 1.0) * sorted(ready_s)[len(ready_s) // 2])
            else:
                await svc.wait_ready(90)
                ready_s.append(time.monotonic() - started)
                await asyncio.sleep(self.rng.uniform(0.3, 5.0))
            if not svc.alive():
                self.notes.append(f"the service exited by itself (code {svc.proc.returncode}); see {svc.log_path}")
            svc.kill()
            self.fault("sigkill", phase=phase, up_s=round(time.monotonic() - started, 1))
        svc.start()
        await svc.wait_ready(90)
        if launcher is None:
            self.market.hub.start()
            launcher = asyncio.create_task(self.launch(self.stagger()))
        await self.until_finished(launcher)

    async def self_kill(self, svc: Service, die_at: str) -> None:
        before = len(svc.notes())
        end = time.monotonic() + 90
        idle_since = None
        while svc.alive() and time.monotonic() < end:
            await asyncio.sleep(0.05)
            idle = (
                self.launched == self.jobs
                and self.count(*OPEN) == 0
                and all(j.id in self.states for j in self.market.jobs)
            )
            idle_since = (idle_since or time.monotonic()) if idle else None
            if idle_since and time.monotonic() - idle_since > 5:
                break  # every job is closed: no payout will come
        if svc.alive():
            svc.kill()
            self.fault("sigkill", phase=f"armed ({die_at}), but the point was not reached: killed from outside")
            return
        notes = svc.notes()
        if len(notes) == before:
            self.notes.append(
                f"an armed service ({die_at}) died without reaching its point (code "
                f"{svc.proc.returncode}); see {svc.log_path}"
            )
            self.fault("crash", phase="armed process exited by itself", code=svc.proc.returncode)
            return
        note = json.loads(notes[-1])
        h = note["payment_hash"]
        engine = create_engine(self.url)
        try:
            async with session_factory(engine)() as s:
                row = await s.get(PayoutAttempt, h)
                payout = await s.get(Payout, note["payout"])
        finally:
            await engine.dispose()
        node = lnd(self.desc, "escrow")
        try:
            lnd_state = None
            async for p in node.track_payment(bytes.fromhex(h)):
                lnd_state = p.status.name
                if p.status.final:
                    break
        except lnerr.LndNotFound:
            lnd_state = None
        finally:
            await node.close()
        attempt = row.state if row else None
        if note["point"] == "send":  # written ahead, never sent
            kind, exact = "sigkill-after-write-ahead", attempt == "sending" and lnd_state is None
        else:  # paid and recorded on the attempt, not on the payout
            kind = "sigkill-after-attempt-succeeded"
            exact = (
                attempt == "succeeded"
                and lnd_state == "SUCCEEDED"
                and payout is not None
                and payout.state != "succeeded"
            )
        if not exact:
            self.notes.append(
                f"{kind} not where intended: attempt {attempt}, payout "
                f"{payout.state if payout else None}, LND {lnd_state} (payout {note['payout']})"
            )
        job, _, rest = note["payout"].partition(":")
        role, _, who = rest.partition(":")
        self.fault(
            kind,
            payout=f"{job[:12]}…:{role}:{who[:12]}…",
            call=die_at,
            attempt_row=attempt,
            payout_row=payout.state if payout else None,
            lnd=lnd_state,
            exact=exact,
        )


# ------------------------------------------------------------------------------ lnd-outage
class LndOutageDrill(Drill):
    name = "lnd-outage"
    about = (
        "the escrow's LND stopped while customers fund (and, unless --lnd-stop-anytime, no payout is "
        "being sent), started again with its own command line"
    )
    # Quiet, read from the real parts right before the stop: no job past funding and not closed
    # (a collecting job's provider needs ~1 s, its validators ~0.5 s: it can reach its payouts
    # within the stop), no payout or attempt row in a non-final state, nothing IN_FLIGHT in the
    # escrow's LND and none of the drill's hold invoices ACCEPTED (a job about to collect).
    BUSY_JOBS = ("collecting", "validating", "releasing", "refunding")
    BUSY_PAYOUTS = ("pending", "sending", "unknown", "needs_invoice")
    BUSY_ATTEMPTS = ("sending", "unknown")
    QUIET_WAIT = 60.0  # seconds from the first launch to find a quiet moment, else the drill fails
    started_wall = 0.0  # time.time() at the start of the body, less a margin (LND's creation times)
    admin_token = ""  # --lnd-stop-anytime: the operator's
    work = (4.0, 2.0, 20.0)  # customers look at their offer up to 20 s: some hold one while nothing is paid out

    def timeout(self) -> float:
        return self.opts.timeout or (240 + 6 * self.jobs + self.opts.lnd_outage)

    def funding(self) -> int:
        """Customers holding an offer they have not seen funded yet."""
        return sum(1 for j in self.market.jobs if j.phase == "offered")

    async def _escrow_payments(self) -> list[dict]:
        """The escrow LND's payments created since this drill started (its escrow key and database are new)."""
        out = await asyncio.to_thread(
            self.parts.lncli, "escrow", "listpayments", "--include_incomplete", "--max_payments", "1000000"
        )
        since = int(self.started_wall * 1e9)
        return [p for p in out.get("payments", []) if int(p.get("creation_time_ns", 0)) >= since]

    async def busy(self, sessions) -> tuple[list[str], dict]:
        """What is under way at this moment, from LND and then the database (the last thing read
        before the stop). LND v0.20.2 stopped while it dispatches a payment can keep that payment
        IN_FLIGHT for good (no HTLC on the channel; like lnd#5152): the escrow then rightly never
        pays it again and the job stays releasing until an operator reissues the payout (with
        --lnd-stop-anytime the drill does, :meth:`operate`). This drill is about funding, so by
        default it stops LND only when nothing here is busy."""
        pays = await self._escrow_payments()
        out = await asyncio.to_thread(
            self.parts.lncli, "escrow", "listinvoices", "--pending_only", "--max_invoices", "1000000"
        )
        inflight = [p["payment_hash"][:12] for p in pays if p.get("status") == "IN_FLIGHT"]
        accepted = [
            i["r_hash"][:12]
            for i in out.get("invoices", [])
            if i.get("state") == "ACCEPTED" and i.get("r_hash") in self.market.offers
        ]
        async with sessions() as s:
            jobs = {str(k): n for k, n in (await s.execute(select(Job.state, func.count()).group_by(Job.state))).all()}
            payouts = {
                str(k): n for k, n in (await s.execute(select(Payout.state, func.count()).group_by(Payout.state))).all()
            }
            attempts = {
                str(k): n
                for k, n in (
                    await s.execute(select(PayoutAttempt.state, func.count()).group_by(PayoutAttempt.state))
                ).all()
            }
        view = {
            "jobs": jobs,
            "payouts": payouts,
            "attempts": attempts,
            "lnd_in_flight": inflight,
            "lnd_accepted": accepted,
        }
        busy = [f"jobs {k} {jobs[k]}" for k in self.BUSY_JOBS if jobs.get(k)]
        busy += [f"payouts {k} {payouts[k]}" for k in self.BUSY_PAYOUTS if payouts.get(k)]
        busy += [f"attempts {k} {attempts[k]}" for k in self.BUSY_ATTEMPTS if attempts.get(k)]
        busy += [f"LND IN_FLIGHT {h}" for h in inflight] + [f"LND invoice ACCEPTED {h}" for h in accepted]
        return busy, view

    async def sending(self, sessions) -> int:
        """Attempts written ahead and not finished (a payout being dispatched to LND right now)."""
        async with sessions() as s:
            return int(
                await s.scalar(select(func.count()).select_from(PayoutAttempt).where(PayoutAttempt.state == "sending"))
                or 0
            )

    def wanted(self, t0: float) -> bool:
        """Customers funding (from the market's live view): two holding an offer, one after 10 s, any after 40 s."""
        waited = time.monotonic() - t0
        return self.funding() >= 2 or (self.funding() >= 1 and waited > 10) or waited > 40

    async def body(self) -> None:
        operated = self.opts.lnd_stop_anytime or self.opts.inject_stuck_payment
        if operated:  # the operator's admin API, and sends LND resolves sooner
            self.admin_token = secrets.token_hex(24)
            self.service_settings = {"admin_token": self.admin_token, "payout_timeout_seconds": 20}
        self.started_wall = time.time() - 5  # LND's clock, not ours: a margin
        # INJECTED (--inject-stuck-payment): the second payout sent gets LND's stuck record instead
        _, launcher = await self.start_one("stuck:2" if self.opts.inject_stuck_payment else None)
        engine = create_engine(self.url)
        sessions = session_factory(engine)
        t0 = time.monotonic()
        checks = 0
        try:
            while self.opts.lnd_stop_anytime:
                # LND stopped while it dispatches a payment (what can leave one IN_FLIGHT for good):
                # at the first attempt seen written ahead, else whatever is going on after QUIET_WAIT
                checks += 1
                if await self.sending(sessions) or time.monotonic() - t0 > self.QUIET_WAIT:
                    busy, view = await self.busy(sessions)
                    break
                await asyncio.sleep(0.02)
            while not self.opts.lnd_stop_anytime:
                await self.until(lambda: self.wanted(t0), "customers funding")
                checks += 1
                busy, view = await self.busy(sessions)
                if not busy:
                    break
                if time.monotonic() - t0 > self.QUIET_WAIT:
                    raise RuntimeError(
                        f"drill setup: no quiet moment to stop the escrow's LND in {self.QUIET_WAIT:.0f} s "
                        f"({checks} checks; last busy: {', '.join(busy)}; {view}); the drill does not stop LND "
                        "mid-payout (that is --lnd-stop-anytime): its timings leave no gap, or something is stuck"
                    )
                await asyncio.sleep(0.05)
            funding = self.funding()
            checked = datetime.now(UTC)
            t = time.monotonic()
            await self.parts.stop_lnd("escrow")
            stopped = time.monotonic()
            f = self.fault(
                "lnd-stopped",
                node="escrow",
                stop_s=round(stopped - t, 1),
                customers_funding=funding,
                jobs_requested=self.count("requested"),
                payouts_quiet=not busy,
                busy=busy,
                quiet_checks=checks,
                at_stop=view,
            )
            await asyncio.sleep(self.opts.lnd_outage)
            f["stopped_s"] = round(time.monotonic() - stopped, 1)
            async with sessions() as s:  # sent (or written ahead) between the check and the end of the stop
                since = (await s.scalars(select(PayoutAttempt.created_at))).all()
            f["attempts_during_stop"] = sum(
                1 for c in since if checked <= aware(c) <= checked + timedelta(seconds=stopped - t + 0.5)
            )
        finally:
            await engine.dispose()
        await self.parts.start_lnd("escrow")
        self.recovered(f, down_s=round(time.monotonic() - stopped, 1))
        if not (self.opts.lnd_stop_anytime or self.opts.inject_stuck_payment):
            await self.until_finished(launcher)
            return
        operator = asyncio.create_task(self.operate())
        try:
            await self.until_finished(launcher)
        finally:
            operator.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await operator

    # ---- the operator (--lnd-stop-anytime): docs/operations.md, "A payment stuck in flight"
    STUCK_AFTER = 20.0  # seconds a payout stays unknown before the operator looks at it in LND

    async def operate(self) -> None:
        """What an operator does about a payout whose payment LND keeps IN_FLIGHT: looks at it over
        the admin API once it has been `unknown` for STUCK_AFTER s; reissues it as soon as the API
        says LND allows it (FAILED, or past the timelock); while an HTLC of it keeps it and every
        other job has finished, mines blocks past its expiry height (regtest: the timelock passing),
        provided no HTLC is on the escrow's channels (our node would go on chain for it)."""
        first_seen: dict[str, float] = {}
        async with httpx.AsyncClient(
            base_url=self.services[0].url, headers={"Authorization": f"Bearer {self.admin_token}"}, timeout=30
        ) as api:
            while True:
                await asyncio.sleep(2)
                try:
                    items = (await api.get("/v1/admin/payouts")).json()["items"]
                except (httpx.HTTPError, KeyError, ValueError):
                    continue
                unknown = {p["id"]: p for p in items if p["state"] == "unknown"}
                for pid in list(first_seen):
                    if pid not in unknown:
                        del first_seen[pid]
                now = time.monotonic()
                for pid in unknown:
                    first_seen.setdefault(pid, now)
                stuck = {pid: p for pid, p in unknown.items() if now - first_seen[pid] >= self.STUCK_AFTER}
                for pid, p in stuck.items():
                    await self._look_at(api, pid, p, stuck_jobs={q["job_id"] for q in stuck.values()})

    async def _look_at(self, api: httpx.AsyncClient, pid: str, p: dict, stuck_jobs: set[str]) -> None:
        try:
            lnd_view = (await api.get(f"/v1/admin/payouts/{quote(pid, safe='')}")).json().get("lnd") or {}
        except (httpx.HTTPError, ValueError):
            return
        verdict = lnd_view.get("reissue") or {}
        short = f"{str(p.get('job_id'))[:12]}…:{pid.rsplit(':', 1)[-1][:12]}"
        if verdict.get("allowed"):
            r = await api.post(
                f"/v1/admin/payouts/{quote(pid, safe='')}/reissue",
                json={"reason": f"drill operator: {lnd_view.get('summary')}"[:500]},
            )
            self.fault(
                "stuck-payment-reissued",
                payout=short,
                lnd=lnd_view.get("summary"),
                status=r.status_code,
                result=r.json().get("result") or r.json().get("code"),
            )
            return
        if verdict.get("code") != "payment_may_still_settle":
            return
        held = [h for h in lnd_view.get("htlcs", []) if h["status"] == "IN_FLIGHT"]
        others_open = [j.id for j in self.market.jobs if j.id not in stuck_jobs and self.states.get(j.id) != "closed"]
        if not held or others_open or await self._htlcs_on_channels():
            return
        target = max(h["expiry_height"] for h in held) + REISSUE_MARGIN_BLOCKS
        height = int(lnd_view.get("block_height") or 0)
        if height >= target:
            return
        self.fault("timelock-mined-past", payout=short, lnd=lnd_view.get("summary"), blocks=target - height)
        await asyncio.to_thread(self.parts.stack.mine, target - height)
        await self.until_synced(target)

    async def _htlcs_on_channels(self) -> int:
        out = await asyncio.to_thread(self.parts.lncli, "escrow", "listchannels")
        return sum(len(c.get("pending_htlcs", [])) for c in out.get("channels", []))

    async def until_synced(self, height: int) -> None:
        end = time.monotonic() + 120
        while time.monotonic() < end:
            info = await asyncio.to_thread(self.parts.lncli, "escrow", "getinfo")
            if int(info.get("block_height", 0)) >= height and info.get("synced_to_chain"):
                return
            await asyncio.sleep(0.5)
        raise TimeoutError(f"escrow LND synced to height {height}")

    async def restore(self) -> None:
        await super().restore()
        # evidence for a job left open: the escrow LND's unfinished payments of this drill
        if not self.started_wall or all(self.states.get(j.id) == "closed" for j in self.market.jobs):
            return
        try:
            stuck = [p for p in await self._escrow_payments() if p.get("status") == "IN_FLIGHT"]
        except Exception as e:  # noqa: BLE001
            self.notes.append(f"escrow ListPayments failed: {e}")
            return
        if stuck:
            path = self.dir / "escrow-in-flight.json"
            path.write_text(json.dumps(stuck, indent=1) + "\n")
            self.notes.append(
                f"escrow LND has {len(stuck)} payment(s) IN_FLIGHT: "
                + ", ".join(
                    f"{p['payment_hash'][:12]} created {p.get('creation_date')} htlcs "
                    f"{[h.get('status') for h in p.get('htlcs', [])]} failure {p.get('failure_reason')}"
                    for p in stuck
                )
                + f" (ListPayments in {path})"
            )


# ------------------------------------------------------------------------------ relay-restart
class RelayRestartDrill(Drill):
    name = "relay-restart"
    about = "the relay stopped and started again mid-stream"

    async def body(self) -> None:
        _, launcher = await self.start_one()
        await self.until(
            lambda: self.count("offered", "collecting", "validating", "releasing", "closed") >= max(2, self.jobs // 3),
            "a third of the jobs offered",
        )
        await self.parts.stop_relay()
        stopped = time.monotonic()
        f = self.fault("relay-restart")
        await asyncio.sleep(self.opts.relay_down)
        await self.parts.start_relay()
        self.recovered(f, down_s=round(time.monotonic() - stopped, 1))
        await self.until_finished(launcher)


# ------------------------------------------------------------------------------ postgres-restart
class PostgresRestartDrill(Drill):
    name = "postgres-restart"
    postgres = True
    about = "the service on PostgreSQL; PostgreSQL restarted mid-batch (fast, then immediate shutdown)"

    async def restart(self, mode: str) -> None:
        self._pg_argv = await self.parts.stop_postgres(mode)
        stopped = time.monotonic()
        f = self.fault("postgres-restart", shutdown=mode)
        await asyncio.sleep(2)
        await self.parts.start_postgres(self._pg_argv)
        self.recovered(f, down_s=round(time.monotonic() - stopped, 1))

    async def body(self) -> None:
        _, launcher = await self.start_one()
        await self.until(
            lambda: self.count("offered", "collecting", "validating", "releasing", "closed") >= max(2, self.jobs // 3),
            "a third of the jobs offered",
        )
        await self.restart("fast")
        await self.until(
            lambda: (
                self.launched == self.jobs
                and self.count("releasing", "closed") >= 1
                or self.count("closed") >= self.jobs // 2
            ),
            "jobs releasing",
        )
        await self.restart("immediate")
        await self.until_finished(launcher)


# ------------------------------------------------------------------------------ replicas
class ReplicasDrill(Drill):
    name = "replicas"
    postgres = True
    about = "two replicas on one PostgreSQL database; the leader SIGKILLed while jobs are releasing"

    async def body(self) -> None:
        a, b = self.service("a"), self.service("b")
        a.start()
        b.start()
        await asyncio.gather(a.wait_ready(90), b.wait_ready(90))
        leaders = [s for s in (a, b) if await s.leads()]
        if len(leaders) != 1:
            raise RuntimeError(f"expected exactly one leader, found {len(leaders)}")
        leader = leaders[0]
        survivor = b if leader is a else a
        self.market.hub.start()
        launcher = asyncio.create_task(self.launch(0.5))
        await self.until(lambda: self.count("releasing") >= 1 and self.count(*OPEN) >= 2, "a job releasing")
        leader.kill()
        killed = time.monotonic()
        f = self.fault("sigkill-leader", replica=leader.name, releasing=self.count("releasing"))
        end = time.monotonic() + 30
        while not await survivor.leads():
            if time.monotonic() > end:
                raise RuntimeError("the survivor did not take over leadership within 30 s")
            await asyncio.sleep(0.2)
        self.recovered(f, survivor=survivor.name, takeover_s=round(time.monotonic() - killed, 1))
        await self.until_finished(launcher)


# ------------------------------------------------------------------------------ adversarial
class AdversarialDrill(Drill):
    """Hostile participants (bench/drills/hostile.py) beside honest jobs on one stack.

    The honest jobs come in two waves: the first from new customers; once each is funded the
    relay flood arrives, and the second wave comes from the same customers (returning: the
    flood's budget does not apply to them). Passes only if, besides the audit's counts, every
    honest job closed in its normal time (``NORMAL_S`` from request to closed: the work's own
    bounds, one payout timeout, a margin), no copy earned anything, the shared invoice was
    paid once, the poisoned job was decided on time, the flood got no more than its budget,
    and the escrow's net (fee income less routing) is not negative for any job.
    """

    name = "adversarial"
    postgres = True  # the invoice race is PostgreSQL's
    needs_verdict = True
    default_jobs = 10
    about = (
        "hostile participants beside honest jobs: a payee holding its HTLC, two validators scoring '9'*64, "
        "sybil and backdated copies of honest results, one invoice for two rewards over REST and Nostr at once "
        "(PostgreSQL), a payee's fee-charging hop, a flood of requests from fresh keys through the relay"
    )
    work = (4.0, 2.0, 2.0)
    FLOOD = 60
    BUDGET = 20  # accepted requests a minute from new keys (FEDSTR_JOB_REQUESTS_PER_MINUTE)
    PAYOUT_TIMEOUT = 10
    NORMAL_S = 60.0

    def timeout(self) -> float:
        return self.opts.timeout or (240 + 8 * self.jobs)

    def service(self, name: str) -> Service:
        svc = Service(
            name,
            self.desc,
            self.url,
            self.key.to_hex(),
            self.dir / f"service-{name}.log",
            job_requests_per_minute=self.BUDGET,
            max_open_offers=1000,
            max_open_offers_per_key=3,
            job_requests_per_minute_per_key=10,
            payout_timeout_seconds=self.PAYOUT_TIMEOUT,
        )
        self.services.append(svc)
        return svc

    async def launch(self, stagger: float) -> None:
        first = (self.jobs + 1) // 2
        for n in range(first):
            await self._launch_one(self.market.new_job(n))
            await asyncio.sleep(stagger * self.rng.uniform(0.5, 1.5))
        await self.until(
            lambda: all(j.phase not in ("new", "requested", "offered") for j in self.market.jobs),
            "the first wave funded",
            timeout=120,
        )
        await self.attacks.flood(self.FLOOD)
        customers = [j.customer for j in self.market.jobs]
        for n in range(first, self.jobs):
            await self._launch_one(self.market.new_job(n, customer=customers[n % len(customers)]))
            await asyncio.sleep(stagger * self.rng.uniform(0.5, 1.5))

    async def body(self) -> None:
        from bench.drills.hostile import HOP_BASE_FEE_MSAT, Attacks

        svc = self.service("a")
        svc.start()
        await svc.wait_ready(90)
        self.market.hub.start()
        self.attacks = Attacks(self.market, self.desc, self.api_urls, self.fault, self.say)
        await self._hop_fee(HOP_BASE_FEE_MSAT, 0)
        launcher = asyncio.create_task(self.launch(self.stagger()))
        attacks = [
            asyncio.create_task(c)
            for c in (
                self.attacks.held_htlc(),
                self.attacks.poisoned_scores(),
                self.attacks.copies(self.market.jobs),
                self.attacks.invoice_race(),
                self.attacks.fee_hop(),
            )
        ]
        try:
            await self.until_finished(launcher)
            # the hostile jobs that can close (everyone but the held payee's) get the time they need
            await asyncio.wait_for(asyncio.gather(*attacks), 120)
            deadline = self.attacks.findings["poisoned"]["validation_deadline"]
            await self.until(lambda: time.time() > deadline + 6, "the poisoned job's validation deadline", 120)
            self.verdict = await self.judge(svc)
        finally:
            for t in attacks:
                t.cancel()
            await self.attacks.close()
            await self._hop_fee(1_000, 1)

    async def _hop_fee(self, base_fee_msat: int, fee_rate_ppm: int) -> None:
        """The payee's channel policy towards payee2: the hostile payee's own hop."""
        payee2 = self.desc["nodes"]["payee2"]["pubkey"]
        chans = (await asyncio.to_thread(self.parts.lncli, "payee", "listchannels"))["channels"]
        cp = next(c["channel_point"] for c in chans if c["remote_pubkey"] == payee2)
        await asyncio.to_thread(
            self.parts.lncli,
            "payee",
            "updatechanpolicy",
            "--base_fee_msat",
            str(base_fee_msat),
            "--fee_rate_ppm",
            str(fee_rate_ppm),
            "--time_lock_delta",
            "40",
            "--chan_point",
            cp,
        )

    async def judge(self, svc: Service) -> dict:
        """What the hostile participants got, from the database and the escrow node."""
        from service.ledger import accounts
        from service.ledger.models import LedgerLine

        a = self.attacks
        engine = create_engine(self.url)
        out: dict = {}
        try:
            async with session_factory(engine)() as s:
                per_job = (
                    await s.execute(
                        select(LedgerLine.job_id, LedgerLine.account, func.sum(LedgerLine.amount_msat))
                        .where(LedgerLine.account.in_((accounts.FEE_INCOME, accounts.ROUTING_EXPENSE)))
                        .group_by(LedgerLine.job_id, LedgerLine.account)
                    )
                ).all()
                net: dict[str, int] = {}
                for job_id, _account, amount in per_job:
                    net[job_id] = net.get(job_id, 0) - int(amount)  # income is credit (negative), routing debit
                out["negative_net_jobs"] = sorted(j for j, v in net.items() if v < 0)
                out["min_net_msat"] = min(net.values()) if net else 0
                copy_payouts = (await s.scalars(select(Payout.id).where(Payout.payee.in_(a.copy_keys)))).all()
                out["copies_paid"] = len(copy_payouts)
                race = (
                    (await s.scalars(select(Payout).where(Payout.payment_hash == a.race_hash))).all()
                    if a.race_hash
                    else []
                )
                out["race_payouts_succeeded"] = sum(p.state == "succeeded" for p in race)
                poisoned = a.findings.get("poisoned", {})
                pj = await s.get(Job, poisoned["job"]) if poisoned else None
                out["poisoned_job"] = pj.state if pj else None
                decided = (
                    (
                        await s.scalars(
                            select(TimelineEntry.at).where(
                                TimelineEntry.job_id == poisoned.get("job"),
                                TimelineEntry.kind == "transition",
                                TimelineEntry.detail.like('%"to": "refunding"%'),
                            )
                        )
                    ).first()
                    if poisoned
                    else None
                )
                out["poisoned_decided_after_deadline_s"] = (
                    round(aware(decided).timestamp() - poisoned["validation_deadline"], 1) if decided else None
                )
                flood = (await s.execute(select(Job.state, Job.reject_reason).where(Job.id.in_(a.flood_ids)))).all()
                out["flood_accepted"] = sum(st != "rejected" for st, _ in flood)
                out["flood_refused_busy"] = sum(
                    st == "rejected" and (r or "").startswith("escrow_busy") for st, r in flood
                )
                held = a.findings.get("held_htlc", {})
                hp = (
                    (
                        await s.scalars(
                            select(Payout).where(Payout.job_id == held.get("job"), Payout.kind == PayoutKind.REWARD)
                        )
                    ).first()
                    if held
                    else None
                )
                out["held_payout_state"] = hp.state if hp else None
        finally:
            await engine.dispose()
        pays = await asyncio.to_thread(
            self.parts.lncli, "escrow", "listpayments", "--include_incomplete", "--max_payments", "1000000"
        )
        out["race_paid_by_node"] = sum(
            1
            for p in pays.get("payments", [])
            if p.get("payment_hash") == a.race_hash and p.get("status") == "SUCCEEDED"
        )
        durations = [
            j.times["closed"] - j.times["requested"]
            for j in self.market.jobs
            if "closed" in j.times and "requested" in j.times
        ]
        out["honest_max_s"] = round(max(durations), 1) if durations else None
        out["ok"] = (
            not out["negative_net_jobs"]
            and out["copies_paid"] == 0
            and out["race_paid_by_node"] <= 1
            and out["race_payouts_succeeded"] <= 1
            and out["poisoned_job"] in ("refunding", "refunded")
            and out["poisoned_decided_after_deadline_s"] is not None
            and out["poisoned_decided_after_deadline_s"] <= 5
            and out["flood_accepted"] <= self.BUDGET
            and len(durations) == self.jobs
            and max(durations) <= self.NORMAL_S
        )
        self.say("verdict: " + json.dumps(out))
        return out


# ------------------------------------------------------------------------------ deadline outage
class DeadlineOutageDrill(Drill):
    """The escrow's own outages across the jobs' deadlines (docs/escrow.md, "Deadlines that survive
    the escrow's outages"). Jobs run in waves with short windows; their providers and validators
    send their work a few seconds before the deadline in force. For each wave the service is
    SIGKILLed a few seconds before one job's results deadline and again before one job's
    validation deadline, stays down for a random length (``Options.outage``), and is started
    again. Every piece of work sent before its deadline in force must be counted and paid: the
    audit's counts, and the drill's own (a result and every score counted for every job)."""

    name = "deadline-outage"
    default_jobs = 20
    about = "the service SIGKILLed across results and validation deadlines, down for a random length; on-time work kept"
    needs_verdict = True
    WAVE = 5
    # A beat every second, so that any restart is an outage on record; a short catch-up keeps waves short.
    # (and 5 s of results grace instead of 60, so that an outage across a results deadline needs the extension).
    SETTINGS = {
        "heartbeat_seconds": 1,
        "heartbeat_tolerance_seconds": 3,
        "outage_catch_up_seconds": 15,
        "results_grace_seconds": 5,
    }
    results_in, validation_window = 30, 30

    def timeout(self) -> float:
        waves = -(-self.jobs // self.WAVE)
        return self.opts.timeout or (120 + waves * (120 + 2 * self.opts.outage[1]))

    async def body(self) -> None:
        from bench.drills.deadline_market import DeadlineMarket

        old = self.market
        self.market = self.dm = DeadlineMarket(
            self.desc,
            self.key.public_key_hex,
            self.api_urls,
            seed=old.seed,
            run_id=old.run_id,
            work=old.work,
            results_in=self.results_in,
            validation_window=self.validation_window,
        )
        await old.close()
        svc = Service("a", self.desc, self.url, self.key.to_hex(), self.dir / "service-a.log", **self.SETTINGS)
        self.services.append(svc)
        self.svc = svc
        svc.start()
        await svc.wait_ready(90)
        self.market.hub.start()
        for first in range(0, self.jobs, self.WAVE):
            await self.wave(range(first, min(self.jobs, first + self.WAVE)))
        self.verdict = await self.check()

    async def wave(self, numbers: range) -> None:
        jobs = []
        for n in numbers:
            job = self.market.new_job(n)
            await self._launch_one(job)
            jobs.append(job)
            await asyncio.sleep(self.rng.uniform(0.5, 2.5))  # deadlines spread over a few seconds
        ids = [j.id for j in jobs]
        await self.until(lambda: all(i in self.dm.funded_at for i in ids), "the wave funded", 120)
        await self.outage_before(jobs, 0, "results")
        await self.until(lambda: all(self.states.get(i) not in ("collecting", None) for i in ids), "validating", 300)
        await self.outage_before([j for j in jobs if self.states.get(j.id) == "validating"], 1, "validation")
        await self.until(lambda: all(self.states.get(i) == "closed" for i in ids), "the wave closed", 600)

    async def outage_before(self, jobs: list, which: int, name: str) -> None:
        """SIGKILL a few seconds before a deadline (in force) of one of ``jobs``; start again after a random time."""
        ahead = [(self.dm.deadlines(j)[which], j) for j in jobs if self.dm.deadlines(j)[which] > time.time() + 2]
        if not ahead:
            self.notes.append(f"no {name} deadline ahead to take the service down across")
            return
        deadline, job = self.rng.choice(ahead)
        await asyncio.sleep(max(0.0, deadline - self.rng.uniform(1.0, 6.0) - time.time()))
        self.svc.kill()
        down = self.rng.uniform(*self.opts.outage)
        covered = sum(1 for d, _ in ahead if time.time() < d < time.time() + down)
        f = self.fault(
            f"sigkill-across-{name}-deadline",
            job=job.plan.n,
            before_deadline_s=round(deadline - time.time(), 1),
            down_s=round(down, 1),
            deadlines_inside=covered,
        )
        await asyncio.sleep(down)
        self.svc.start()
        await self.svc.wait_ready(90)
        self.recovered(f, up_after_deadline_s=round(time.time() - deadline, 1))

    async def check(self) -> dict:
        """On-time work lost: a job whose result or a score was sent before its deadline in force but
        not counted. Also, the drill tested what it claims: the work was sent on time, deadlines were
        extended and published."""
        from service.escrow.models import Result, ScoreRow

        engine = create_engine(self.url)
        lost: list[str] = []
        late_sent: list[int] = []
        try:
            async with session_factory(engine)() as s:
                for j in self.market.jobs:
                    result_ok, scores_ok = self.dm.on_time_sent(j)
                    if not (result_ok and scores_ok):
                        late_sent.append(j.plan.n)
                    results = (await s.scalars(select(Result.id).where(Result.job_id == j.id))).all()
                    scores = (await s.scalars(select(ScoreRow.validator).where(ScoreRow.job_id == j.id))).all()
                    if len(results) != 1 or len(scores) != len(j.validators):
                        lost.append(
                            f"job {j.plan.n}: {len(results)} result(s), {len(scores)}/{len(j.validators)} scores"
                        )
                extended = {j.plan.n: len(self.dm.extensions(j)) for j in self.market.jobs}
                stored = (
                    await s.scalars(
                        select(Job.id).where(
                            Job.id.in_([j.id for j in self.market.jobs]),
                            (Job.results_extended_to.is_not(None)) | (Job.validation_extended_to.is_not(None)),
                        )
                    )
                ).all()
        finally:
            await engine.dispose()
        out = {
            "on_time_work_lost": lost,
            "work_sent_late": late_sent,  # the drill's own participants: must be none
            "jobs_extended": len(stored),
            "extensions_published": sum(extended.values()),
        }
        out["ok"] = not lost and not late_sent and len(stored) >= 1 and out["extensions_published"] >= len(stored)
        self.say("verdict: " + json.dumps(out))
        return out


DRILLS = {
    d.name: d
    for d in (
        SigkillDrill,
        LndOutageDrill,
        RelayRestartDrill,
        PostgresRestartDrill,
        ReplicasDrill,
        AdversarialDrill,
        DeadlineOutageDrill,
    )
}
