"""Timing script (not a test): NIP-01 ``verify_event`` throughput on one core.

    .venv/bin/python tests/unit/nostr/bench_verify.py [N]

Events look like wire traffic (two tags, ~250 bytes of content) and are verified
from decoded JSON objects, once with every event by a different author (no hits in
the parsed-public-key cache) and once with 20 repeat authors.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from service.nostr.nip01 import SecretKey, _xonly_public_key, sign_event, verify_event

NOW = 1_700_000_000


def _wire_events(count: int, authors: int) -> list[str]:
    keys = [SecretKey.generate() for _ in range(authors)]
    tags = [["e", "ab" * 32, "wss://relay.example"], ["p", "cd" * 32]]
    return [
        sign_event(
            keys[i % authors], 1, tags, f"message {i} " + "lorem ipsum dolor sit amet " * 9, created_at=NOW
        ).to_json()
        for i in range(count)
    ]


def _rate(label: str, wire: list[str]) -> None:
    objects = [json.loads(text) for text in wire]
    _xonly_public_key.cache_clear()
    start = time.perf_counter()
    for obj in objects:
        verify_event(obj, now=NOW)
    elapsed = time.perf_counter() - start
    print(
        f"{label:<40} verify_event: {len(objects) / elapsed:>8,.0f} events/s "
        f"({elapsed / len(objects) * 1e6:.1f} us/event)"
    )
    _xonly_public_key.cache_clear()
    start = time.perf_counter()
    for text in wire:
        verify_event(json.loads(text), now=NOW)
    elapsed = time.perf_counter() - start
    print(f"{label:<40} json.loads + verify_event: {len(wire) / elapsed:>8,.0f} events/s")


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    _rate("every event a new author", _wire_events(count, count))
    _rate("20 repeat authors", _wire_events(count, 20))


if __name__ == "__main__":
    main()
