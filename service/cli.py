"""The ``fedstr-escrow`` command line.

    fedstr-escrow serve            run migrations, then the HTTP service
    fedstr-escrow migrate          upgrade the database to the newest schema
    fedstr-escrow openapi [--check] write (or verify) openapi.yaml from the app
    fedstr-escrow version
    fedstr-escrow demo [--rounds N] [--once]    a whole market round on a local regtest network
    fedstr-escrow agent customer|provider|validator …   the reference agents (docs/agents.md)
    fedstr-escrow audit <job id> --relay wss://… [--escrow PK] [--json]   check a job's public record (docs/audit.md)

``demo`` and ``agent`` need the ``agents`` extra (``pip install 'fedstr-escrow[agents]'``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from service import __version__

if TYPE_CHECKING:
    from service.config import Settings

log = logging.getLogger("fedstr_escrow")


def _settings() -> Settings:
    from service.config import Settings

    try:
        return Settings()
    except ValidationError as e:
        lines = [f"  FEDSTR_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in e.errors()]
        print("fedstr-escrow: invalid configuration:\n" + "\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None


def openapi_yaml() -> str:
    import yaml

    from service.app import create_app
    from service.config import Settings

    spec = create_app(Settings(_env_file=None)).openapi()
    return yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("demo", "agent"):
        from service.agents import missing_extra

        problem = missing_extra()
        if problem is not None:  # the service alone was installed: one line, not a traceback
            print(f"fedstr-escrow {argv[0]}: {problem}", file=sys.stderr)
            return 2
    if argv and argv[0] == "demo":
        from service.demo import main as demo_main

        return demo_main(argv[1:])
    if argv and argv[0] == "agent":
        from service.agents.cli import main as agent_main

        return agent_main(argv[1:])
    if argv and argv[0] == "audit":  # needs no database, no configuration, no agents extra
        from service.agents.relay import Relays  # websockets only: no numpy, no scikit-learn
        from service.audit.cli import main as audit_main

        return audit_main(argv[1:], open_relays=lambda urls, timeout: Relays(urls, timeout=timeout))
    ap = argparse.ArgumentParser(prog="fedstr-escrow", description="Lightning escrow for FEDSTR on Nostr")
    ap.add_argument("--log-level", default="INFO")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve", help="run migrations, then serve HTTP")
    sub.add_parser("migrate", help="upgrade the database schema")
    op = sub.add_parser("openapi", help="write openapi.yaml from the app")
    op.add_argument("--out", type=Path, default=Path("openapi.yaml"))
    op.add_argument("--check", action="store_true", help="exit 1 if the file differs from the app")
    sub.add_parser("version")
    sub.add_parser("demo", help="a whole market round on a local regtest network (see: demo --help)")
    sub.add_parser("agent", help="the reference agents (see: agent --help)")
    sub.add_parser("audit", help="check a job's public record from relays (see: audit --help)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.cmd == "version":
        print(__version__)
    elif args.cmd == "openapi":
        text = openapi_yaml()
        if args.check:
            current = args.out.read_text() if args.out.exists() else ""
            if current != text:
                print(f"{args.out} is out of date: run `fedstr-escrow openapi`", file=sys.stderr)
                return 1
            print(f"{args.out} is up to date")
        else:
            args.out.write_text(text)
            print(f"wrote {args.out}")
    elif args.cmd == "migrate":
        from service.migrate import upgrade

        upgrade(_settings().database_url)
    elif args.cmd == "serve":
        import uvicorn

        from service.app import create_app, uvicorn_config
        from service.migrate import upgrade

        settings = _settings()
        upgrade(settings.database_url)
        log.info(
            "serving on http://%s:%d (network %s, LND %s, %d relay(s), trusted proxies: %s)",
            settings.http_host,
            settings.http_port,
            settings.network,
            settings.lnd_grpc_host,
            len(settings.relays),
            ", ".join(settings.trusted_proxies) or "none",
        )
        uvicorn.Server(uvicorn_config(create_app(settings), settings, log_level=args.log_level.lower())).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
