"""The one place that imports LND's generated gRPC stubs.

We use only the compiled ``*_pb2``/``*_pb2_grpc`` modules shipped in the
``lnd-grpc-client`` package (``lndgrpc.compiled``), never its wrapper methods,
which swallow errors and lack hold invoices. Importing the ``lndgrpc`` package
sets ``GRPC_SSL_CIPHER_SUITES`` for the whole process as a side effect; we
restore the environment to what it was, so that import has no effect beyond
this module.
"""

from __future__ import annotations

import os

_saved = os.environ.get("GRPC_SSL_CIPHER_SUITES")
try:
    from lndgrpc.compiled import invoices_pb2 as inv
    from lndgrpc.compiled import invoices_pb2_grpc as inv_grpc
    from lndgrpc.compiled import lightning_pb2 as ln
    from lndgrpc.compiled import lightning_pb2_grpc as ln_grpc
    from lndgrpc.compiled import router_pb2 as rt
    from lndgrpc.compiled import router_pb2_grpc as rt_grpc
finally:
    if _saved is None:
        os.environ.pop("GRPC_SSL_CIPHER_SUITES", None)
    else:
        os.environ["GRPC_SSL_CIPHER_SUITES"] = _saved

__all__ = ["inv", "inv_grpc", "ln", "ln_grpc", "rt", "rt_grpc"]
