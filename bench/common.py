"""Shared benchmark plumbing: the regtest stack, percentiles, result files."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def stack(port_base: int = 29900) -> dict:
    """Bring up (or reuse) the bench stack; FEDSTR_BENCH_STACK_DIR reuses a running one."""
    reuse = os.environ.get("FEDSTR_BENCH_STACK_DIR")
    d = Path(reuse) if reuse else ROOT / ".devstack" / "bench"
    if not reuse:
        subprocess.run([sys.executable, str(ROOT / "devstack" / "stack"), "--dir", str(d), "--port-base",
                        str(port_base), "up"], check=True)
    return json.loads((d / "stack.json").read_text())


def stack_down(desc: dict) -> None:
    if os.environ.get("FEDSTR_BENCH_STACK_DIR"):
        return
    subprocess.run([sys.executable, str(ROOT / "devstack" / "stack"), "--dir", desc["dir"], "--port-base",
                    str(desc["port_base"]), "down"], check=False)


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def write(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, **result}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
