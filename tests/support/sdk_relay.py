"""Run nostr-sdk's (rust-nostr) local relay on 127.0.0.1:PORT with an LMDB store at DIR.

A second, independent relay implementation for the tests. Runs until SIGTERM.
Usage: python -m tests.support.sdk_relay PORT DIR
"""

from __future__ import annotations

import asyncio
import signal
import sys

import nostr_sdk as n


async def main(port: int, directory: str) -> None:
    # The LMDB store calls back into Python from Rust threads: give those calls our loop.
    n.uniffi_set_event_loop(asyncio.get_running_loop())
    db = await n.NostrLmdb.open(directory)
    builder = n.LocalRelayBuilder().addr("127.0.0.1").port(port).database(db)
    relay = builder.build()
    await relay.run()
    print(f"ready {await relay.url()}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    relay.shutdown()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
