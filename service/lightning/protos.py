"""LND's API as Python: how ``service/lightning/lnrpc/`` is made from ``proto/``.

``proto/`` holds LND's own ``.proto`` files for the LND version devstack builds, and
``proto/lnd-version.json`` names that version and each file's sha256. The stubs are generated from
them with grpcio-tools (the version pinned in pyproject's ``dev`` extra) and committed, so a fresh
clone imports them with nothing to build. grpcio-tools writes top-level imports
(``import lightning_pb2``); they are rewritten as relative ones, so the stubs are a plain package.

    python -m service.lightning.protos --check               # exit 1 if the stubs are not what the protos give
    python -m service.lightning.protos --update              # regenerate service/lightning/lnrpc/
    python -m service.lightning.protos --import-lnd v0.21.0-beta   # copy a new LND version's protos (Go module)

``tests/unit/test_lnd_protos.py`` runs the check, the sha256s and devstack's LND version.
Only a source checkout has ``proto/``; nothing here runs in the service.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
VERSION_FILE = PROTO_DIR / "lnd-version.json"
PACKAGE_DIR = Path(__file__).resolve().parent / "lnrpc"
LND_MODULE = "github.com/lightningnetwork/lnd"
# Each file's path under proto/ is its path under the LND module's lnrpc/ (the imports need it).
PROTOS = ("lightning.proto", "invoicesrpc/invoices.proto", "routerrpc/router.proto")
_HEADER = '"""Generated from proto/ by `python -m service.lightning.protos --update`; do not edit."""\n'

# grpcio-tools' absolute imports of the stubs: ``import lightning_pb2 as ...``, ``from routerrpc import ...``.
_IMPORT = re.compile(r"^(?:from ([A-Za-z_][\w.]*) )?import (\w+_pb2) as (\w+)$", re.M)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recorded(proto_dir: Path = PROTO_DIR) -> dict[str, Any]:
    """proto/lnd-version.json: ``{"lnd_version": ..., "files": {path: {"sha256": ...}}, ...}``."""
    data: dict[str, Any] = json.loads((proto_dir / VERSION_FILE.name).read_text())
    return data


def source_drift(proto_dir: Path = PROTO_DIR) -> list[str]:
    """What is wrong between proto/ and its version file (empty: nothing)."""
    files = recorded(proto_dir)["files"]
    problems = [f"{p}: not in {VERSION_FILE.name}" for p in PROTOS if p not in files]
    for p, meta in files.items():
        f = proto_dir / p
        if not f.is_file():
            problems.append(f"{p}: missing from proto/")
        elif sha256(f) != meta["sha256"]:
            problems.append(f"{p}: sha256 {sha256(f)}, {VERSION_FILE.name} says {meta['sha256']}")
    return problems


def _fix_imports(text: str, depth: int) -> str:
    """The stubs' imports of each other made relative, for a file ``depth`` folders below lnrpc/."""
    up = "." * (depth + 1)
    return _IMPORT.sub(lambda m: f"from {up}{m[1] or ''} import {m[2]} as {m[3]}", text)


def generate(out: Path, proto_dir: Path = PROTO_DIR) -> None:
    """Write the stubs for proto/ into ``out`` (a package: ``__init__.py`` in every folder)."""
    from grpc_tools import protoc  # dev extra: only regeneration needs it

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{proto_dir}", f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}"]
        if protoc.main([*args, *PROTOS]) != 0:
            raise RuntimeError("grpc_tools.protoc failed")
        for f in sorted(Path(tmp).rglob("*")):
            if not f.is_file():
                continue
            rel = f.relative_to(tmp)
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(_fix_imports(f.read_text(), len(rel.parts) - 1))
    for d in [out, *(p for p in out.rglob("*") if p.is_dir() and p.name != "__pycache__")]:
        (d / "__init__.py").write_text(_HEADER)


def _files(d: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(d)): p.read_bytes()
        for p in sorted(d.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".pyi")
    }


def stub_drift(package_dir: Path = PACKAGE_DIR, proto_dir: Path = PROTO_DIR) -> list[str]:
    """Files of service/lightning/lnrpc/ that differ from a fresh generation (empty: none)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), proto_dir)
        want, have = _files(Path(tmp)), _files(package_dir)
    return sorted(
        f"{name}: {'missing' if name not in have else 'not generated' if name not in want else 'differs'}"
        for name in want.keys() | have.keys()
        if want.get(name) != have.get(name)
    )


def update() -> None:
    shutil.rmtree(PACKAGE_DIR, ignore_errors=True)
    generate(PACKAGE_DIR)


def import_lnd(version: str) -> None:
    """Copy LND ``version``'s protos from its Go module (``go mod download``) into proto/ and record
    them in the version file. devstack's LND_VERSION must then be this version too."""
    r = subprocess.run(
        ["go", "mod", "download", "-json", f"{LND_MODULE}@{version}"], capture_output=True, text=True, check=True
    )
    info = json.loads(r.stdout)
    lnrpc = Path(info["Dir"]) / "lnrpc"
    files = {}
    for p in PROTOS:
        dest = PROTO_DIR / p
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((lnrpc / p).read_bytes())
        files[p] = {"from": f"lnrpc/{p}", "sha256": sha256(dest)}
    doc = {"lnd_version": version, "module": LND_MODULE, "module_sum": info.get("Sum", ""), "files": files}
    VERSION_FILE.write_text(json.dumps(doc, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m service.lightning.protos", description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--check", action="store_true", help="exit 1 if proto/ or the stubs drifted")
    g.add_argument("--update", action="store_true", help="regenerate service/lightning/lnrpc/ from proto/")
    g.add_argument("--import-lnd", metavar="VERSION", help="copy this LND version's protos into proto/")
    a = ap.parse_args(argv)
    if a.import_lnd:
        import_lnd(a.import_lnd)
        print(f"proto/: LND {a.import_lnd}; now set devstack's LND_VERSION and run --update")
        return 0
    problems = source_drift()
    if problems:
        print("proto/ does not match lnd-version.json:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    if a.update:
        update()
        print(f"regenerated {PACKAGE_DIR.relative_to(ROOT)}")
        return 0
    problems = stub_drift()
    if problems:
        print("stubs differ from proto/ (run --update):\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print("proto/ and the stubs agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
