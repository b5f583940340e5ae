"""The blinded payment paths of a BOLT 11 invoice, read from the invoice itself.

LND (v0.18 and later) writes each blinded path of an invoice in its own tagged field of type 20
(bLIP 39, "BOLT 11 Invoice Blinded Path Tagged Field"). The ``bolt11`` library (2.2.0, the latest
on PyPI) skips that field as unknown, and no maintained Python library reads it; this is the
second reading of the paths that :func:`service.payouts.check.check_invoice` compares with our
node's ``DecodePayReq``, written from bLIP 39 alone. :func:`decode_invoice` is the library's
decoding with the paths beside it, for every place that reads a payee's invoice.

A field's data (bytes; the fewer than 5 bits left over from the 5-bit words are zero padding)::

    u32 fee_base_msat, u32 fee_proportional_millionths, u16 cltv_expiry_delta,
    u64 htlc_minimum_msat, u64 htlc_maximum_msat, u16 flen, flen bytes features,
    33 bytes first blinding point, u8 num_hops,
    num_hops × (33 bytes blinded node key, bigsize length, that many bytes of cipher text)

The first hop's key is the introduction node's real key.
"""

from __future__ import annotations

import bolt11
from bech32 import bech32_decode
from bolt11.exceptions import Bolt11DescriptionException, Bolt11NoPaymentSecretException

from service.lightning.client import BlindedPath

BLINDED_PATH_FIELD = 20  # bLIP 39's tagged field type
_TIMESTAMP_WORDS = 7  # 35 bits
_SIGNATURE_WORDS = 104  # 65 bytes


class UnreadablePath(ValueError):
    """A blinded-path field that does not hold one whole path."""


def decode_invoice(payment_request: str) -> tuple[bolt11.Bolt11, tuple[BlindedPath, ...]]:
    """The ``bolt11`` library's decoding of an invoice and its blinded paths; raises what the
    library raises, or :class:`UnreadablePath`.

    A blinded invoice has no payment secret (bLIP 39: the recipient's path id, inside the path's
    encrypted data, does its work; LND v0.20 writes none), and the library refuses an invoice
    without one: for an invoice with blinded paths that one rule of the library's is lifted."""
    ours = bolt11.decode(payment_request, ignore_exceptions=True)
    paths = read_blinded_paths(payment_request)
    try:
        ours.validate()
    except Bolt11NoPaymentSecretException:
        if not paths:
            raise
        # validate() stopped there; its one later rule (decode always sets the signature):
        if bool(ours.description) == bool(ours.description_hash):
            raise Bolt11DescriptionException() from None
    return ours, paths


def read_blinded_paths(payment_request: str) -> tuple[BlindedPath, ...]:
    """Every blinded-path field of an invoice, in order; () when it has none. Raises
    :class:`UnreadablePath` for one that is not a whole path (or an invoice that is not bech32)."""
    hrp, words = bech32_decode(payment_request.lower())
    if hrp is None or words is None or len(words) < _TIMESTAMP_WORDS + _SIGNATURE_WORDS:
        raise UnreadablePath("not a bech32 invoice")
    body = words[:-_SIGNATURE_WORDS]
    paths = []
    i = _TIMESTAMP_WORDS
    while i + 3 <= len(body):
        kind, length = body[i], body[i + 1] * 32 + body[i + 2]
        data = body[i + 3 : i + 3 + length]
        i += 3 + length
        if kind == BLINDED_PATH_FIELD:
            paths.append(_path(_to_bytes(data)))
    return tuple(paths)


def _to_bytes(words: list[int]) -> bytes:
    """5-bit words to bytes; what is left over must be fewer than 5 bits, all zero (padding, as
    LND's bech32 conversion requires)."""
    acc, bits, out = 0, 0, bytearray()
    for w in words:
        acc, bits = acc << 5 | w, bits + 5
        if bits >= 8:
            bits -= 8
            out.append(acc >> bits & 0xFF)
    if bits >= 5 or acc & ((1 << bits) - 1):
        raise UnreadablePath("blinded path field has bad padding")
    return bytes(out)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise UnreadablePath("blinded path field ends too early")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def bigsize(self) -> int:
        first = self.uint(1)
        width = {0xFD: 2, 0xFE: 4, 0xFF: 8}.get(first)  # BOLT 1's BigSize: a marker byte, then u16/u32/u64
        return first if width is None else self.uint(width)


def _path(data: bytes) -> BlindedPath:
    r = _Reader(data)
    base_fee, ppm, cltv = r.uint(4), r.uint(4), r.uint(2)
    htlc_min, htlc_max = r.uint(8), r.uint(8)
    r.take(r.uint(2))  # features
    r.take(33)  # the first blinding point
    num_hops = r.uint(1)
    if num_hops == 0:
        raise UnreadablePath("blinded path without hops")
    keys = []
    for _ in range(num_hops):
        keys.append(r.take(33))
        r.take(r.bigsize())  # the hop's encrypted data
    if r.pos != len(data):
        raise UnreadablePath("bytes after the blinded path")
    return BlindedPath(
        introduction_node=keys[0].hex(),
        num_hops=num_hops,
        base_fee_msat=base_fee,
        fee_ppm=ppm,
        total_cltv_delta=cltv,
        htlc_min_msat=htlc_min,
        htlc_max_msat=htlc_max,
    )
