"""An independent BOLT 11 reader: the model of LND's ``DecodePayReq`` in the invoice fuzz target.

Written from BIP-173 (bech32) and BOLT 11, sharing no code with the ``bolt11`` package
the service uses: bech32 without the 90-character limit, one case only; the
human-readable part ``ln`` + the node network's prefix (LND's test: the prefix, then the
amount must parse) + an amount in BTC with an optional m/u/n/p multiplier (exact
integer arithmetic; pico amounts must be whole millisatoshis; at most 2^64-1 msat);
a 35-bit timestamp; tagged fields where the first ``p``/``h``/``s``/``n``/``d``/``x``/
``c`` of the right length counts and unknown or mis-sized fields are skipped; the
signature checked against ``n`` or, without ``n``, the payee recovered from it; exactly
one of ``d`` and ``h``; defaults expiry 3600 s, final CLTV delta 18. Every field of type 20
(``5``) is a blinded payment path (bLIP 39), as LND reads it: strict padding, a whole
``blinded_payinfo`` or the invoice is refused.

It also writes bech32 (:func:`encode`) so the fuzzer can mutate an invoice's words and
keep a valid checksum.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass

import coincurve

CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_GEN = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
PREFIX = {"mainnet": "bc", "testnet": "tb", "signet": "tbs", "regtest": "bcrt"}
NETWORK_OF_CURRENCY = {v: k for k, v in PREFIX.items()}
_AMOUNT = re.compile(r"([0-9]+)([munp]?)")
# msat per unit of the amount: 1 BTC = 10^11 msat; m = 10^-3 BTC ... p = 10^-12 BTC (a tenth of a msat)
_MSAT_PER = {"": (10**11, 1), "m": (10**8, 1), "u": (10**5, 1), "n": (10**2, 1), "p": (1, 10)}
_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


class RefError(ValueError):
    pass


def _polymod(values: list[int]) -> int:
    chk = 1
    for value in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ value
        for i, gen in enumerate(_GEN):
            if (top >> i) & 1:
                chk ^= gen
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def encode(hrp: str, words: list[int]) -> str:
    """Bech32 of ``hrp`` and 5-bit ``words`` (checksum appended), lowercase."""
    mod = _polymod(_hrp_expand(hrp) + list(words) + [0] * 6) ^ 1
    checksum = [(mod >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(CHARSET[w] for w in list(words) + checksum)


def split(text: str, *, strict_case: bool = True) -> tuple[str, list[int]]:
    """(hrp, data words without the checksum) of a bech32 string; no length limit."""
    if any(not 33 <= ord(c) <= 126 for c in text):
        raise RefError("character outside US-ASCII 33..126")
    if text != text.lower() and text != text.upper():
        if strict_case:
            raise RefError("mixed case")
    text = text.lower()
    pos = text.rfind("1")
    if pos < 1 or len(text) - pos - 1 < 6:
        raise RefError("no separator, empty hrp, or no checksum")
    hrp, data = text[:pos], text[pos + 1 :]
    if any(c not in CHARSET for c in data):
        raise RefError("character outside the bech32 charset")
    words = [CHARSET.index(c) for c in data]
    if _polymod(_hrp_expand(hrp) + words) != 1:
        raise RefError("bad checksum")
    return hrp, words[:-6]


def words_to_int(words: list[int]) -> int:
    value = 0
    for w in words:
        value = value << 5 | w
    return value


def words_to_bytes(words: list[int], *, strict_padding: bool) -> bytes:
    """5-bit groups to bytes, dropping the < 8 leftover bits (which must be zero when strict)."""
    acc, bits, out = 0, 0, bytearray()
    for w in words:
        acc = acc << 5 | w
        bits += 5
        while bits >= 8:
            bits -= 8
            out.append(acc >> bits & 0xFF)
    if strict_padding and acc & ((1 << bits) - 1):
        raise RefError("non-zero padding bits")
    return bytes(out)


def signing_bytes(hrp: str, words: list[int]) -> bytes:
    """The signed message: hrp (ASCII) + the data words (without signature) as bytes, zero-padded."""
    acc, bits, out = 0, 0, bytearray()
    for w in words:
        acc = acc << 5 | w
        bits += 5
        while bits >= 8:
            bits -= 8
            out.append(acc >> bits & 0xFF)
    if bits:
        out.append(acc << (8 - bits) & 0xFF)
    return hrp.encode("ascii") + bytes(out)


def parse_amount(text: str) -> int | None:
    """Millisatoshis of an hrp amount, or None for no amount; RefError if it is not exact."""
    if text == "":
        return None
    match = _AMOUNT.fullmatch(text)
    if match is None:
        raise RefError("amount is not digits with an optional m/u/n/p multiplier")
    digits, multiplier = match.groups()
    numerator, denominator = _MSAT_PER[multiplier]
    value = int(digits) * numerator
    if value % denominator:
        raise RefError("amount is not a whole number of millisatoshis")
    value //= denominator
    if value > 2**64 - 1:
        raise RefError("amount overflows 64 bits")
    return value


@dataclass(frozen=True)
class RefInvoice:
    hrp: str
    currency: str
    amount_msat: int | None
    timestamp: int
    payment_hash: bytes
    payment_secret: bytes | None
    description: str | None
    description_hash: bytes | None
    expiry: int
    min_final_cltv: int
    destination: str  # 33-byte compressed key, hex
    # (introduction node hex, hops, base fee, ppm, total CLTV delta, htlc min, htlc max) per path
    blinded_paths: tuple[tuple[str, int, int, int, int, int, int], ...] = ()

    @property
    def expires_at(self) -> int:
        return self.timestamp + self.expiry


def blinded_path(data: bytes) -> tuple[str, int, int, int, int, int, int]:
    """bLIP 39's ``blinded_payinfo``: the fixed head, features, blinding point, then the hops."""
    head = struct.Struct(">IIHQQH")
    if len(data) < head.size:
        raise RefError("blinded path shorter than its head")
    base, ppm, cltv, lo, hi, flen = head.unpack_from(data)
    at = head.size + flen + 33  # features, then the first blinding point
    if at + 1 > len(data) or data[at] == 0:
        raise RefError("blinded path without hops")
    hops, at = data[at], at + 1
    intro = data[at : at + 33].hex()
    for _ in range(hops):
        at += 33
        if at >= len(data):
            raise RefError("blinded hop cut short")
        size, width = data[at], 1
        if size >= 0xFD:
            width = {0xFD: 3, 0xFE: 5, 0xFF: 9}[size]
            size = int.from_bytes(data[at + 1 : at + width], "big")
        at += width + size
        if at > len(data):
            raise RefError("blinded hop data cut short")
    if at != len(data):
        raise RefError("bytes after the blinded path")
    return intro, hops, base, ppm, cltv, lo, hi


def blinded_field(words: list[int]) -> tuple[str, int, int, int, int, int, int]:
    if len(words) * 5 % 8 >= 5:
        raise RefError("blinded path field: too many padding bits")
    return blinded_path(words_to_bytes(words, strict_padding=True))


def blinded_paths_of(text: str) -> list[tuple[str, int, int, int, int, int, int]]:
    """The blinded paths of any bech32 invoice (whatever its network), or RefError."""
    _, words = split(text, strict_case=False)
    body, out, i = words[:-104], [], 7
    while i + 3 <= len(body):
        kind, length = CHARSET[body[i]], body[i + 1] * 32 + body[i + 2]
        if kind == "5":
            out.append(blinded_field(body[i + 3 : i + 3 + length]))
        i += 3 + length
    return out


def decode(text: str, network: str, *, strict_case: bool = True) -> RefInvoice:
    """Decode as a node on ``network`` would, or raise RefError."""
    hrp, words = split(text, strict_case=strict_case)
    prefix = PREFIX[network]
    if not hrp.startswith("ln" + prefix):
        raise RefError("invoice not for the node's network")
    amount = parse_amount(hrp[2 + len(prefix) :])
    if len(words) < 7 + 104:
        raise RefError("too short for a timestamp and a signature")
    body, sig_words = words[:-104], words[-104:]
    timestamp = words_to_int(body[:7])
    fields: dict[str, object] = {}
    paths = []
    i = 7
    while i < len(body):
        if len(body) - i < 3:
            raise RefError("truncated tagged field")
        kind, length = CHARSET[body[i]], body[i + 1] * 32 + body[i + 2]
        data = body[i + 3 : i + 3 + length]
        if len(data) < length:
            raise RefError("tagged field runs past the signature")
        i += 3 + length
        if kind == "5":
            paths.append(blinded_field(data))
            continue
        if kind in fields:
            continue  # the first known field of a type counts
        if kind in ("p", "h", "s") and length == 52:
            fields[kind] = words_to_bytes(data, strict_padding=True)[:32]
        elif kind == "n" and length == 53:
            fields[kind] = words_to_bytes(data, strict_padding=True)[:33]
        elif kind == "d":
            try:
                fields[kind] = words_to_bytes(data, strict_padding=True).decode("utf-8")
            except UnicodeDecodeError:
                raise RefError("description is not UTF-8") from None
        elif kind in ("x", "c"):
            if length > 13:
                raise RefError(f"{kind} field longer than 64 bits")
            value = words_to_int(data)
            if value > 2**64 - 1:
                raise RefError(f"{kind} field overflows 64 bits")
            fields[kind] = value
    signature = words_to_bytes(sig_words, strict_padding=True)
    if len(signature) != 65 or signature[64] > 3:
        raise RefError("bad signature encoding")
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:64], "big")
    if not (0 < r < _ORDER and 0 < s < _ORDER):
        raise RefError("signature out of range")
    digest = hashlib.sha256(signing_bytes(hrp, body)).digest()
    if "n" in fields:
        low_s = min(s, _ORDER - s)  # accept either S, as btcec does
        compact = signature[:32] + low_s.to_bytes(32, "big")
        try:
            key = coincurve.PublicKey(fields["n"])  # type: ignore[arg-type]
            der = coincurve.ecdsa.cdata_to_der(coincurve.ecdsa.deserialize_compact(compact))
            ok = key.verify(der, digest, hasher=None)
        except ValueError:
            ok = False
        if not ok:
            raise RefError("signature does not match the n field")
        destination = fields["n"].hex()  # type: ignore[union-attr]
    else:
        try:
            destination = coincurve.PublicKey.from_signature_and_message(signature, digest, hasher=None).format().hex()
        except ValueError:
            raise RefError("no key recovers from the signature") from None
    if "p" not in fields:
        raise RefError("no payment hash")
    if ("d" in fields) == ("h" in fields):
        raise RefError("exactly one of description and description hash is needed")
    return RefInvoice(
        hrp=hrp,
        currency=prefix,
        amount_msat=amount,
        timestamp=timestamp,
        payment_hash=fields["p"],
        payment_secret=fields.get("s"),  # type: ignore[arg-type]
        description=fields.get("d"),
        description_hash=fields.get("h"),  # type: ignore[arg-type]
        expiry=fields.get("x", 3600),
        min_final_cltv=fields.get("c", 18),  # type: ignore[arg-type]
        destination=destination,
        blinded_paths=tuple(paths),
    )


def currency_of(text: str) -> str | None:
    """The currency prefix of an invoice's hrp (longest of bcrt/bc/tbs/tb after ``ln``), if any."""
    hrp = text[: text.rfind("1")].lower() if "1" in text else ""
    for prefix in ("bcrt", "tbs", "bc", "tb"):
        if hrp.startswith("ln" + prefix):
            return prefix
    return None
