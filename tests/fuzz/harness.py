"""The fuzz driver: a time budget, a seed, a regression corpus, and a report per target.

Each target is a hypothesis strategy plus a ``check(value) -> outcome`` function that
asserts the target's property and returns a short label (``"accepted"`` or a reason
code). :func:`run` first replays the target's regression corpus
(``tests/fuzz/corpus/<target>/*.json``), then feeds the strategy with random buffers
from a seeded RNG (``given(...).hypothesis.fuzz_one_input``) until the target's share of
the budget is spent, and asserts that a meaningful number of inputs reached ``check``.

Environment (read once, at import):

* ``FEDSTR_FUZZ_SECONDS`` - the budget for all targets together (default 55: the whole
  directory takes about a minute on 2 cores); each target gets its ``WEIGHTS`` share of
  it, among the targets the session runs.
  A target that has not reached ``required_inputs`` when its share is spent (a very busy
  machine) goes on up to twice its share, then must have reached it.
* ``FEDSTR_FUZZ_SEED`` - an integer; default: random. Printed in every report and in
  every failure; the same seed replays the same inputs in the same order.
* ``FEDSTR_FUZZ_CRASH_DIR`` - where a failing input is written as a corpus file
  (default ``test-artifacts/fuzz/``); move it into ``tests/fuzz/corpus/<target>/`` to
  keep it as a regression case.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis.strategies import SearchStrategy

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "corpus"
CRASH_DIR = Path(os.environ.get("FEDSTR_FUZZ_CRASH_DIR") or ROOT / "test-artifacts" / "fuzz")

DEFAULT_SECONDS = 55.0
BUDGET_SECONDS = float(os.environ.get("FEDSTR_FUZZ_SECONDS") or DEFAULT_SECONDS)
_seed_text = os.environ.get("FEDSTR_FUZZ_SEED")
SEED = int(_seed_text) if _seed_text else random.SystemRandom().randrange(2**32)

# Relative shares of the budget (slower targets get more time, not fewer inputs).
WEIGHTS = {
    "nip01_json": 5,
    "nip01_events": 11,
    "codec_job": 9,
    "codec_events": 10,
    "invoice_generated": 10,
    "invoice_mutated": 10,
}
# Buffer sizes fed to hypothesis: short ones give small inputs, long ones deep and big ones.
_BUFFER_SIZES = (512, 2048, 8192, 32768)
# Per target at the default budget: a broken generator cannot pass silently. Low enough that the
# slowest target (invoice_generated signs every invoice: ~250 in 10 s on a loaded 2-core machine)
# passes whatever else runs; a broken generator gives none, or only invalid buffers.
MIN_INPUTS = 100
# pytest-timeout for a fuzz test: a target runs at most twice its share (<= the budget), plus set-up.
TIMEOUT = int(2 * BUDGET_SECONDS) + 300


# The targets this session runs (set by conftest.py after collection): the budget is split
# over them only, so ``-k invoice`` gives the invoice targets the whole budget.
SELECTED: set[str] = set()


def share(target: str) -> float:
    running = SELECTED or WEIGHTS.keys()
    return BUDGET_SECONDS * WEIGHTS[target] / sum(WEIGHTS[t] for t in running)


def required_inputs(target: str) -> int:
    """At least MIN_INPUTS, scaled down only for a budget far below the default."""
    return max(10, min(MIN_INPUTS, int(MIN_INPUTS * share(target) / 3.0)))


@dataclass
class Report:
    target: str
    budget: float
    seconds: float = 0.0
    replayed: int = 0
    inputs: int = 0
    invalid: int = 0
    outcomes: Counter = field(default_factory=Counter)

    def line(self) -> str:
        top = ", ".join(f"{k}={v}" for k, v in self.outcomes.most_common(8))
        more = len(self.outcomes) - 8
        return (
            f"fuzz[{self.target}]: {self.inputs} inputs in {self.seconds:.1f} s "
            f"(share {self.budget:.1f} s, seed {SEED}, corpus {self.replayed}, "
            f"{len(self.outcomes)} distinct outcomes: {top}{f', +{more} more' if more > 0 else ''})"
        )


REPORTS: list[Report] = []


def _short(value: Any, limit: int = 1500) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def save_crash(target: str, document: Any) -> Path:
    """Write a failing input as a corpus file (or, if it is not JSON-able, its repr as .txt)."""
    try:
        text, suffix = json.dumps(document, ensure_ascii=True, indent=1, sort_keys=True), "json"
    except (TypeError, ValueError, RecursionError):
        text, suffix = ascii(document), "txt"
    name = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = CRASH_DIR / target / f"crash-{name}.{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def corpus_files(target: str) -> list[Path]:
    return sorted((CORPUS / target).glob("*.json"))


def sample(strategy: SearchStrategy, count: int, label: str) -> list[Any]:
    """``count`` values of ``strategy``, the same for the same seed: a pool of seeds to mutate."""
    out: list[Any] = []

    @settings(database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(value: Any) -> None:
        out.append(value)

    rnd = random.Random(f"{SEED}/{label}")
    for _ in range(20 * count):
        if len(out) >= count:
            break
        collect.hypothesis.fuzz_one_input(rnd.randbytes(rnd.choice(_BUFFER_SIZES)))
    assert len(out) >= count, f"{label}: the strategy produced only {len(out)} values from {20 * count} buffers"
    return out


def run(
    target: str,
    strategy: SearchStrategy,
    check: Callable[[Any], str],
    *,
    to_json: Callable[[Any], Any] = lambda v: v,
    from_json: Callable[[Any], Any] = lambda d: d,
    started: float | None = None,
) -> Report:
    """Replay the corpus, then fuzz ``check`` with ``strategy`` for the target's share of the budget.

    ``started`` (a ``time.monotonic()``): when the target began preparing (e.g. a pool of
    seeds), so the preparation counts against its share.
    """
    report = Report(target, share(target))
    start = time.monotonic() if started is None else started
    for path in corpus_files(target):
        value = from_json(json.loads(path.read_text(encoding="utf-8")))
        try:
            check(value)
        except Exception as exc:
            raise AssertionError(
                f"fuzz[{target}]: regression case {path.relative_to(ROOT)} fails: {type(exc).__name__}: {exc}"
            ) from exc
        report.replayed += 1

    current: list[Any] = [None]

    @settings(database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def one(value: Any) -> None:
        current[0] = value
        report.inputs += 1
        report.outcomes[check(value)] += 1

    fuzz = one.hypothesis.fuzz_one_input
    rnd = random.Random(f"{SEED}/{target}")
    deadline, hard_stop = start + report.budget, start + 2 * report.budget
    need = required_inputs(target)
    number = 0
    while time.monotonic() < deadline or (report.inputs < need and time.monotonic() < hard_stop):
        buffer = rnd.randbytes(rnd.choice(_BUFFER_SIZES))
        number += 1
        current[0] = None
        try:
            if fuzz(buffer) is None:
                report.invalid += 1
        except Exception as exc:
            saved = save_crash(target, to_json(current[0])) if current[0] is not None else None
            where = (
                f"saved as {saved}; move it into tests/fuzz/corpus/{target}/ to keep it as a regression case"
                if saved
                else "raised while generating the input"
            )
            raise AssertionError(
                f"fuzz[{target}] failed on buffer #{number} with FEDSTR_FUZZ_SEED={SEED} "
                f"(replay: FEDSTR_FUZZ_SEED={SEED} FEDSTR_FUZZ_SECONDS={BUDGET_SECONDS:g} "
                f".venv/bin/pytest tests/fuzz -k {target}); input {where}:\n{_short(current[0])}\n"
                f"{type(exc).__name__}: {exc}"
            ) from exc
    report.seconds = time.monotonic() - start
    REPORTS.append(report)
    print(report.line())
    assert report.inputs >= need, (
        f"fuzz[{target}] ran only {report.inputs} inputs in {report.seconds:.1f} s "
        f"({report.invalid} buffers invalid); at least {need} expected: "
        f"is the generator broken? {report.line()}"
    )
    return report
