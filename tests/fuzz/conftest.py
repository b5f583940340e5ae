"""Split the fuzz budget over the targets selected, and print every target's report
(inputs run, outcomes, seed) at the end of the session.

These tests use no fixture of tests/conftest.py that starts the regtest stack: they are
pure functions (the invoice target fakes LND's DecodePayReq and uses its own SQLite file).
"""

from __future__ import annotations

import pytest


def pytest_collection_finish(session: pytest.Session) -> None:
    from tests.fuzz.harness import SELECTED, WEIGHTS

    for item in session.items:
        name = getattr(item, "originalname", item.name).removeprefix("test_fuzz_")
        if name in WEIGHTS:
            SELECTED.add(name)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.fuzz.harness import BUDGET_SECONDS, REPORTS, SEED

    if not REPORTS:
        return
    terminalreporter.section(f"fuzz (budget {BUDGET_SECONDS:g} s, FEDSTR_FUZZ_SEED={SEED})")
    for report in REPORTS:
        terminalreporter.write_line(report.line())
