"""``fedstr-escrow audit`` against real relays: a job's events, spread over two relay
implementations, audit clean (exit 0); one receipt more, for a rejected result, exits 1."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.agents.relay import Relays
from service.cli import main
from service.nostr.nip01 import Event
from service.nostr.protocol import build_reward_paid
from tests.support.audit_world import consistent_job

pytestmark = pytest.mark.relay
ROOT = Path(__file__).resolve().parents[2]


def publish(url: str, events: list[Event]) -> None:
    async def run() -> None:
        relays = Relays([url])
        for event in events:
            await relays.publish(event)

    asyncio.run(run())


def test_the_audit_command_reads_a_job_from_two_relays(relay_factory, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = relay_factory(impl="nostr-relay"), relay_factory(impl="nostr-sdk")
    world = consistent_job()
    events = world.all()
    half = len(events) // 2
    publish(a.url, events[: half + 2])  # neither relay has the whole job: the audit needs both
    publish(b.url, events[half:])
    job = world.job.id

    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "audit", job, "--relay", a.url, "--relay", b.url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"fetching from 2 relays… {len(events)} events" in proc.stderr
    assert "no discrepancy" in proc.stdout and "DISCREPANCY" not in proc.stdout
    assert "recomputed from 6 score(s)" in proc.stdout

    carol = world.receipt("carol", world.events["result carol"].id, 24_249_000)
    publish(b.url, [world.sign("escrow", build_reward_paid(carol))])
    capsys.readouterr()
    assert main(["audit", job, "--relay", a.url, "--relay", b.url, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["events"] == len(events) + 1
    assert [(f["check"], f["code"]) for f in report["findings"] if f["status"] == "discrepancy"] == [
        ("receipt", "receipt_for_rejected")
    ]
