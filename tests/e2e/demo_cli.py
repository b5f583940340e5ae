"""`fedstr-escrow demo --once` as a user runs it, in a subprocess against the test session's stack."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import ROOT, Regtest, free_port


@dataclass(frozen=True)
class DemoRun:
    process: subprocess.CompletedProcess[str]
    summary: dict  # the --json summary (empty when the demo wrote none)
    database: Path  # the demo escrow's SQLite file

    @property
    def output(self) -> str:
        return self.process.stdout + self.process.stderr


async def run_demo_cli(regtest: Regtest, tmp_path: Path, *args: str, timeout: float = 600) -> DemoRun:
    """The demo with ``args`` (after ``--once``) on a fresh escrow database; its log is kept in
    ``tmp_path/demo.log``."""
    stack_dir = Path(regtest.desc["dir"])
    out = tmp_path / "summary.json"
    db = stack_dir / "demo.sqlite3"
    db.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "service.cli",
        "demo",
        "--once",
        *args,
        "--stack-dir",
        str(stack_dir),
        "--port-base",
        str(regtest.desc["port_base"]),
        "--http-port",
        str(free_port()),
        "--json",
        str(out),
    ]
    r = await asyncio.to_thread(subprocess.run, command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    (tmp_path / "demo.log").write_text(r.stdout + r.stderr)
    return DemoRun(r, json.loads(out.read_text()) if out.exists() else {}, db)
