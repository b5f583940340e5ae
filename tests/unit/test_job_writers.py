"""``escrow_jobs`` has one writer: ``Engine.apply`` (its ``_apply`` and ``_insert_job``).

Every statement that could write the jobs table (an insert, update or delete of ``Job`` or its
table, ``session.add`` of a new job, or an assignment to a job object's columns) is looked for
in the source of ``service/``, with the function it is in; each must be in the engine's apply.
"""

from __future__ import annotations

import ast
from pathlib import Path

import service

ROOT = Path(service.__file__).parent
WRITES = {"insert", "update", "delete", "insert_ignore"}
JOB_COLUMNS = {
    "state",
    "version",
    "mode",
    "funds",
    "offer_expires_at",
    "refund_reason",
    "decision",
    "eval_request_id",
    "reject_reason",
    "updated_at",
}
APPLY = {("escrow/engine.py", "_apply"), ("escrow/engine.py", "_insert_job")}


def _mentions_job(node: ast.AST) -> bool:
    return any(
        isinstance(n, ast.Name) and n.id == "Job" or isinstance(n, ast.Attribute) and n.attr == "Job"
        for n in ast.walk(node)
    )


def writes_in(path: Path, root: Path = ROOT) -> list[tuple[str, str, int, str]]:
    """Each write of the jobs table in a file: (path, enclosing function, line, what)."""
    rel = str(path.relative_to(root))
    found: list[tuple[str, str, int, str]] = []

    def visit(node: ast.AST, func: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            if isinstance(child, ast.Call):
                f = child.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                if name in WRITES and any(_mentions_job(a) for a in child.args):
                    found.append((rel, func, child.lineno, f"{name}(Job)"))
                if name in ("add", "add_all", "merge") and any(
                    isinstance(a, ast.Call) and _mentions_job(a.func) for a in child.args
                ):
                    found.append((rel, func, child.lineno, f"session.{name}(Job(...))"))
            if isinstance(child, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = child.targets if isinstance(child, ast.Assign) else [child.target]
                for t in targets:
                    if (
                        isinstance(t, ast.Attribute)
                        and t.attr in JOB_COLUMNS
                        and isinstance(t.value, ast.Name)
                        and "job" in t.value.id.lower()
                    ):
                        found.append((rel, func, child.lineno, f"{t.value.id}.{t.attr} = ..."))
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), "<module>")
    return found


def test_the_finder_sees_each_kind_of_write(tmp_path: Path) -> None:
    src = tmp_path / "x.py"
    src.write_text(
        "def f(s, job):\n    update(Job).values(state='x')\n    insert(table_of(Job))\n"
        "    s.add(Job(id='a'))\n    job.state = 'closed'\n    select(Job)\n    update(Payout)\n"
    )
    assert [(fn, what) for _, fn, _, what in writes_in(src, tmp_path)] == [
        ("f", "update(Job)"),
        ("f", "insert(Job)"),
        ("f", "session.add(Job(...))"),
        ("f", "job.state = ..."),
    ]


def test_only_the_engines_apply_writes_jobs() -> None:
    writes = [w for path in sorted(ROOT.rglob("*.py")) for w in writes_in(path)]
    outside = [w for w in writes if (w[0], w[1]) not in APPLY]
    assert outside == [], f"escrow_jobs written outside Engine.apply: {outside}"
    assert {(w[0], w[1]) for w in writes} == APPLY, "the finder no longer sees the engine's own writes"
