"""The import structure of ``service``: which package may depend on which.

The graph is read from the source (every ``import`` statement, also those inside functions:
a lazy import is still a dependency), with modules grouped by their top-level package
(``service.ledger.service`` -> ``ledger``, ``service.db`` -> ``db``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "service"

# No cycle remains (the quarantine's replay is told how to reset an item by its caller,
# service/api/actions.py, instead of importing the owners' tables).
KNOWN_CYCLE: frozenset[str] = frozenset()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(path: Path) -> set[str]:
    """Every ``service.*`` module (or name in one) ``path`` imports, absolute or relative."""
    name, out = module_name(path), set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m == "service" or m.startswith("service.")}


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in SERVICE.rglob("*.py"):
        src = package_of(module_name(path))
        for target in imported(path):
            dst = package_of(target)
            if src and dst and dst != src and (SERVICE / dst).exists() | (SERVICE / f"{dst}.py").exists():
                graph[src].add(dst)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_reader_sees_relative_lazy_and_from_imports() -> None:
    agents_cli = imported(SERVICE / "agents" / "cli.py")
    assert "service.agents.ml" in agents_cli, "relative `from . import ml`"
    assert "service.nostr.nip19" in agents_cli
    assert "service.demo" in imported(SERVICE / "cli.py"), "the lazy import inside main()"


def test_the_ledger_does_not_import_lightning() -> None:
    graph = package_graph()
    assert "lightning" not in graph["ledger"], "the ledger is the books; LND and reconciliation depend on it"
    assert not any({"ledger", "lightning"} <= c for c in cycles(graph))


def test_db_imports_no_model_module() -> None:
    graph = package_graph()
    with_tables = {package_of(module_name(p)) for p in SERVICE.rglob("*.py") if "service.db.Base" in imported(p)}
    assert {"escrow", "ledger", "lightning", "nostr", "quarantine", "cursors"} <= with_tables
    assert not graph["db"] & with_tables, f"service.db imports {sorted(graph['db'])}: the registry is service/tables.py"
    assert not any("db" in c for c in cycles(graph))
    assert "tables" not in {dst for dsts in graph.values() for dst in dsts}, "only Alembic and tests use it"


def test_no_new_cycle_among_the_top_level_packages() -> None:
    remaining = cycles(package_graph())
    assert all(c <= KNOWN_CYCLE for c in remaining), f"import cycles among service's packages: {remaining}"


BLOCK_ML = textwrap.dedent("""
    import importlib.abc, sys

    class NoMl(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("numpy", "sklearn", "scipy"):
                raise ImportError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, NoMl())
""")


def run_without_ml(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_ML + textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_the_service_imports_without_numpy_and_scikit_learn() -> None:
    """``pip install fedstr-escrow`` (no ``agents`` extra): every module of the service imports."""
    modules = sorted(
        module_name(p)
        for p in SERVICE.rglob("*.py")
        if not module_name(p).startswith(("service.agents.", "service.demo"))
    )
    assert {"service.app", "service.cli", "service.escrow.engine", "service.payouts.worker"} <= set(modules)
    r = run_without_ml(f"""
        import importlib
        for name in {modules!r}:
            importlib.import_module(name)
        from service.app import create_app
        from service.config import Settings
        create_app(Settings(_env_file=None))
        assert not any(m.split(".")[0] in ("numpy", "sklearn") for m in sys.modules)
        print("imported", len({modules!r}))
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"imported {len(modules)}"


def test_demo_and_agent_without_the_extra_say_what_to_install_in_one_line() -> None:
    for command in (["demo", "--once"], ["agent", "whoami", "--role", "provider", "--name", "x"]):
        r = run_without_ml(f"""
            from service.cli import main
            raise SystemExit(main({command!r}))
        """)
        assert r.returncode == 2, (command, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert lines[0].startswith(f"fedstr-escrow {command[0]}: ")
        assert "pip install 'fedstr-escrow[agents]'" in lines[0]
