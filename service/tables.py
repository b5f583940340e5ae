"""The registry of the modules that define tables. ``service.db`` defines the base and imports
none of them, so the model modules depend on ``db`` and never the other way round; nothing
in ``service`` imports this module (Alembic's env.py and the schema test do)."""

from __future__ import annotations


def import_models() -> None:
    """Import every module that defines tables, so ``Base.metadata`` is complete."""
    from service import cursors, liveness, quarantine  # noqa: F401
    from service import timeline as _timeline  # noqa: F401
    from service.api import models as _api  # noqa: F401
    from service.escrow import models as _escrow  # noqa: F401
    from service.ledger import models as _ledger  # noqa: F401
    from service.lightning import models as _lightning  # noqa: F401
    from service.nostr import models as _nostr  # noqa: F401
    from service.payouts import models as _payouts  # noqa: F401
