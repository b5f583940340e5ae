"""Lightning adapter: a typed LND client over gRPC (see ``client.py``)."""
