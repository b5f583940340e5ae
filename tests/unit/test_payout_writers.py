"""``ln_payouts`` and ``ln_payout_attempts`` have one writer: the ``service/payouts/`` package.

Every statement that could write either table (an insert, update or delete of ``Payout`` or
``PayoutAttempt``, or of their ``__table__``, or ``session.add`` of a new row) is looked for in
the source of ``service/``; each must be inside ``service/payouts/``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import service

ROOT = Path(service.__file__).parent
MODELS = {"Payout", "PayoutAttempt"}
WRITES = {"insert", "update", "delete", "insert_ignore"}


def _names(node: ast.AST) -> set[str]:
    """The payout models a node mentions (``Payout``, ``Payout.__table__``, ``models.Payout``)."""
    return {
        n.id if isinstance(n, ast.Name) else n.attr
        for n in ast.walk(node)
        if isinstance(n, (ast.Name, ast.Attribute)) and (n.id if isinstance(n, ast.Name) else n.attr) in MODELS
    }


def writes_in(path: Path, root: Path = ROOT.parent) -> list[str]:
    """Each write of a payout table in a file, as ``<path>:<line> <call>``, in line order."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        if name in WRITES and any(_names(a) for a in node.args):
            models = ", ".join(sorted(set().union(*map(_names, node.args))))
            found.append((node.lineno, f"{path.relative_to(root)}:{node.lineno} {name}({models})"))
        if name in ("add", "add_all", "merge") and any(isinstance(a, ast.Call) and _names(a.func) for a in node.args):
            found.append((node.lineno, f"{path.relative_to(root)}:{node.lineno} session.{name}(payout row)"))
    return [w for _, w in sorted(found)]


def test_the_finder_sees_each_kind_of_write(tmp_path: Path) -> None:
    src = tmp_path / "service" / "x.py"
    src.parent.mkdir()
    src.write_text(
        "update(Payout).values(state='x')\ninsert(PayoutAttempt.__table__)\n"
        "insert_ignore(s, Payout.__table__)\ndelete(models.Payout)\ns.add(Payout(id='a'))\n"
        "select(Payout)\nupdate(Job)\n"
    )
    assert [w.split(" ", 1)[1] for w in writes_in(src, tmp_path)] == [
        "update(Payout)",
        "insert(PayoutAttempt)",
        "insert_ignore(Payout)",
        "delete(Payout)",
        "session.add(payout row)",
    ]


def test_only_the_payouts_package_writes_payouts() -> None:
    outside = [
        w
        for path in sorted(ROOT.rglob("*.py"))
        if "payouts" not in path.relative_to(ROOT).parts[:1]
        for w in writes_in(path)
    ]
    assert outside == [], "ln_payouts / ln_payout_attempts written outside service/payouts/"
    inside = [w for path in sorted((ROOT / "payouts").rglob("*.py")) for w in writes_in(path)]
    assert any("store.py" in w and "insert_ignore(Payout)" in w for w in inside), "the finder found create()"
    assert any("worker.py" in w and "update(PayoutAttempt)" in w for w in inside), "the finder found the worker"
