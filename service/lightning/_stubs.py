"""The one place that imports LND's generated gRPC stubs.

They are generated from LND's own protos in ``proto/`` (the LND version devstack builds) into
``service/lightning/lnrpc/`` by ``python -m service.lightning.protos --update``; see proto/README.md.
"""

from __future__ import annotations

from service.lightning.lnrpc import lightning_pb2 as ln
from service.lightning.lnrpc import lightning_pb2_grpc as ln_grpc
from service.lightning.lnrpc.invoicesrpc import invoices_pb2 as inv
from service.lightning.lnrpc.invoicesrpc import invoices_pb2_grpc as inv_grpc
from service.lightning.lnrpc.routerrpc import router_pb2 as rt
from service.lightning.lnrpc.routerrpc import router_pb2_grpc as rt_grpc

__all__ = ["inv", "inv_grpc", "ln", "ln_grpc", "rt", "rt_grpc"]
