"""Blob file I/O one chunk behind the network, shared by the blob store and its client.

Hashing and writing a 1 MiB chunk takes a few milliseconds; done in line, the socket is not
read meanwhile and a transfer alternates between the two. :class:`ChunkWriter` hands each
chunk to a worker thread and returns at once, so the next chunk is received while the previous
one is hashed and written: at most two chunks are held, and they are processed in order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Callable

_executor: concurrent.futures.ThreadPoolExecutor | None = None
_lock = threading.Lock()


def executor() -> concurrent.futures.ThreadPoolExecutor:
    """The worker threads for blob file I/O (their own pool: a slow disk does not hold up
    anyio's threads, which the database and the rest of the app use)."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=min(32, (os.cpu_count() or 1) + 4), thread_name_prefix="blob-io"
            )
        return _executor


class ChunkWriter:
    """Feeds chunks to ``sink`` (which hashes and writes them) in a worker thread, in order,
    one at a time, while the caller receives the next.

    ``put`` waits for the previous chunk, then starts this one; ``drain`` waits for the last.
    Call :meth:`settle` in a ``finally`` before the file is closed: after an error or a
    cancellation it blocks until no chunk is in flight, so no thread writes to a closed file.
    """

    def __init__(self, sink: Callable[[bytes | bytearray], None]) -> None:
        self._sink = sink
        self._inflight: concurrent.futures.Future[None] | None = None

    async def put(self, data: bytes | bytearray) -> None:
        await self.drain()
        self._inflight = executor().submit(self._sink, data)

    async def drain(self) -> None:
        """Wait for the chunk in flight; raises what the sink raised."""
        if self._inflight is not None:
            await asyncio.wrap_future(self._inflight)
            self._inflight = None  # only once it is done: settle() must see one still running

    def settle(self) -> None:
        if self._inflight is not None:
            concurrent.futures.wait([self._inflight])
            self._inflight = None
