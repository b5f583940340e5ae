"""NIP-44 v2: official test vectors, error mapping, and round-trip properties."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from hypothesis import given, settings
from hypothesis import strategies as st

from service.nostr import nip44
from service.nostr.nip01 import SecretKey
from service.nostr.nip44 import Nip44Error, Nip44ErrorReason

R = Nip44ErrorReason

# ---------------------------------------------------------------------------------------
# Official vectors, transcribed from nip44.vectors.json in github.com/paulmillr/nip44
# (commit 671a1f04, sha256 269ed0f6...5040 as published in NIP-44), section "v2".
# A representative subset only; the file itself is not vendored.
# ---------------------------------------------------------------------------------------

# valid.get_conversation_key: (sec1, pub2, conversation_key)
VALID_CONVERSATION_KEYS = [
    (
        "315e59ff51cb9209768cf7da80791ddcaae56ac9775eb25b6dee1234bc5d2268",
        "c2f9d9948dc8c7c38321e4b85c8558872eafa0641cd269db76848a6073e69133",
        "3dfef0ce2a4d80a25e7a328accf73448ef67096f65f79588e358d9a0eb9013f1",
    ),
    (
        "a1e37752c9fdc1273be53f68c5f74be7c8905728e8de75800b94262f9497c86e",
        "03bb7947065dde12ba991ea045132581d0954f042c84e06d8c00066e23c1a800",
        "4d14f36e81b8452128da64fe6f1eae873baae2f444b02c950b90e43553f2178b",
    ),
    (
        "98a5902fd67518a0c900f0fb62158f278f94a21d6f9d33d30cd3091195500311",
        "aae65c15f98e5e677b5050de82e3aba47a6fe49b3dab7863cf35d9478ba9f7d1",
        "9c00b769d5f54d02bf175b7284a1cbd28b6911b06cda6666b2243561ac96bad7",
    ),
    (
        "86ae5ac8034eb2542ce23ec2f84375655dab7f836836bbd3c54cefe9fdc9c19f",
        "59f90272378089d73f1339710c02e2be6db584e9cdbe86eed3578f0c67c23585",
        "19f934aafd3324e8415299b64df42049afaa051c71c98d0aa10e1081f2e3e2ba",
    ),
]

# valid.get_message_keys: conversation_key, then (nonce, chacha_key, chacha_nonce, hmac_key)
MESSAGE_KEYS_CONVERSATION_KEY = "a1a3d60f3470a8612633924e91febf96dc5366ce130f658b1f0fc652c20b3b54"
MESSAGE_KEYS = [
    (
        "e1e6f880560d6d149ed83dcc7e5861ee62a5ee051f7fde9975fe5d25d2a02d72",
        "f145f3bed47cb70dbeaac07f3a3fe683e822b3715edb7c4fe310829014ce7d76",
        "c4ad129bb01180c0933a160c",
        "027c1db445f05e2eee864a0975b0ddef5b7110583c8c192de3732571ca5838c4",
    ),
    (
        "e1d6d28c46de60168b43d79dacc519698512ec35e8ccb12640fc8e9f26121101",
        "e35b88f8d4a8f1606c5082f7a64b100e5d85fcdb2e62aeafbec03fb9e860ad92",
        "22925e920cee4a50a478be90",
        "46a7c55d4283cb0df1d5e29540be67abfe709e3b2e14b7bf9976e6df994ded30",
    ),
]

# valid.calc_padded_len: (unpadded length, padded length)
PADDED_LENGTHS = [
    (16, 32),
    (32, 32),
    (33, 64),
    (64, 64),
    (65, 96),
    (100, 128),
    (200, 224),
    (250, 256),
    (320, 320),
    (383, 384),
    (384, 384),
    (400, 448),
    (515, 640),
    (900, 1024),
    (1020, 1024),
    (65536, 65536),
]

# valid.encrypt_decrypt: (sec1, sec2, conversation_key, nonce, plaintext, payload)
ENCRYPT_DECRYPT = [
    (
        "0000000000000000000000000000000000000000000000000000000000000001",
        "0000000000000000000000000000000000000000000000000000000000000002",
        "c41c775356fd92eadc63ff5a0dc1da211b268cbea22316767095b2871ea1412d",
        "0000000000000000000000000000000000000000000000000000000000000001",
        "a",
        "AgAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABee0G5VSK0/9YypIObAtDKfYEAjD35uVkHyB0F4DwrcNaCXlCWZKaA"
        "rsGrY6M9wnuTMxWfp1RTN9Xga8no+kF5Vsb",
    ),
    (
        "0000000000000000000000000000000000000000000000000000000000000002",
        "0000000000000000000000000000000000000000000000000000000000000001",
        "c41c775356fd92eadc63ff5a0dc1da211b268cbea22316767095b2871ea1412d",
        "f00000000000000000000000000000f00000000000000000000000000000000f",
        "🍕🫃",
        "AvAAAAAAAAAAAAAAAAAAAPAAAAAAAAAAAAAAAAAAAAAPSKSK6is9ngkX2+cSq85Th16oRTISAOfhStnixqZziKMDvB0QQzgFZ"
        "djLTPicCJaV8nDITO+QfaQ61+KbWQIOO2Yj",
    ),
    (
        "5c0c523f52a5b6fad39ed2403092df8cebc36318b39383bca6c00808626fab3a",
        "4b22aa260e4acb7021e32f38a6cdf4b673c6a277755bfce287e370c924dc936d",
        "3e2b52a63be47d34fe0a80e34e73d436d6963bc8f39827f327057a9986c20a45",
        "b635236c42db20f021bb8d1cdff5ca75dd1a0cc72ea742ad750f33010b24f73b",
        "表ポあA鷗ŒéＢ逍Üßªąñ丂㐀𠀀",
        "ArY1I2xC2yDwIbuNHN/1ynXdGgzHLqdCrXUPMwELJPc7s7JqlCMJBAIIjfkpHReBPXeoMCyuClwgbT419jUWU1PwaNl4FEQYK"
        "CDKVJz+97Mp3K+Q2YGa77B6gpxB/lr1QgoqpDf7wDVrDmOqGoiPjWDqy8KzLueKDcm9BVP8xeTJIxs=",
    ),
    (
        "8f40e50a84a7462e2b8d24c28898ef1f23359fff50d8c509e6fb7ce06e142f9c",
        "b9b0a1e9cc20100c5faa3bbe2777303d25950616c4c6a3fa2e3e046f936ec2ba",
        "d5a2f879123145a4b291d767428870f5a8d9e5007193321795b40183d4ab8c2b",
        "b20989adc3ddc41cd2c435952c0d59a91315d8c5218d5040573fc3749543acaf",
        "ability🤝的 ȺȾ",
        "ArIJia3D3cQc0sQ1lSwNWakTFdjFIY1QQFc/w3SVQ6yvbG2S0x4Yu86QGwPTy7mP3961I1XqB6SFFTzqDZZavhxoWMj7mEVGM"
        "QIsh2RLWI5EYQaQDIePSnXPlzf7CIt+voTD",
    ),
]

# valid.encrypt_decrypt_long_msg[0]: the largest allowed plaintext, 65535 bytes.
LONG_CONVERSATION_KEY = "8fc262099ce0d0bb9b89bac05bb9e04f9bc0090acc181fef6840ccee470371ed"
LONG_NONCE = "326bcb2c943cd6bb717588c9e5a7e738edf6ed14ec5f5344caa6ef56f0b9cff7"
LONG_PLAINTEXT = "x" * 65535
LONG_PLAINTEXT_SHA256 = "09ab7495d3e61a76f0deb12cb0306f0696cbb17ffc12131368c7a939f12f56d3"
LONG_PAYLOAD_SHA256 = "90714492225faba06310bff2f249ebdc2a5e609d65a629f1c87f2d4ffc55330a"

# invalid.encrypt_msg_lengths
INVALID_MESSAGE_LENGTHS = [0, 65536, 100000]

# invalid.get_conversation_key: (sec1, pub2, note) -> our reason
INVALID_CONVERSATION_KEYS = [
    (
        "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
        "1234567890abcdef1234567890abcdef1234567890abcdef1234567890abcdef",
        R.INVALID_SECRET_KEY,
    ),  # sec1 > n
    (
        "0000000000000000000000000000000000000000000000000000000000000000",
        "1234567890abcdef1234567890abcdef1234567890abcdef1234567890abcdef",
        R.INVALID_SECRET_KEY,
    ),  # sec1 is 0
    (
        "fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141",
        "1234567890abcdef1234567890abcdef1234567890abcdef1234567890abcdef",
        R.INVALID_SECRET_KEY,
    ),  # sec1 == n
    (
        "fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364139",
        "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
        R.INVALID_PUBLIC_KEY,
    ),  # no sqrt
    (
        "0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20",
        "0000000000000000000000000000000000000000000000000000000000000000",
        R.INVALID_PUBLIC_KEY,
    ),  # on twist
    (
        "0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20",
        "709858a4c121e4a84eb59c0ded0261093c71e8ca29efeef21a6161c447bcaf9f",
        R.INVALID_PUBLIC_KEY,
    ),  # on twist
]

# invalid.decrypt: (conversation_key, payload, note) -> our reason
INVALID_DECRYPT = [
    (
        "ca2527a037347b91bea0c8a30fc8d9600ffd81ec00038671e3a0f0cb0fc9f642",
        "#Atqupco0WyaOW2IGDKcshwxI9xO8HgD/P8Ddt46CbxDbrhdG8VmJdU0MIDf06CUvEvdnr1cp1fiMtlM/GrE92xAc1K5odTpCz"
        "UB+mjXgbaqtntBUbTToSUoT0ovrlPwzGjyp",
        R.UNKNOWN_VERSION,
    ),  # "unknown encryption version"
    (
        "36f04e558af246352dcf73b692fbd3646a2207bd8abd4b1cd26b234db84d9481",
        "AK1AjUvoYW3IS7C/BGRUoqEC7ayTfDUgnEPNeWTF/reBZFaha6EAIRueE9D1B1RuoiuFScC0Q94yjIuxZD3JStQtE8JMNacWF"
        "s9rlYP+ZydtHhRucp+lxfdvFlaGV/sQlqZz",
        R.UNKNOWN_VERSION,
    ),  # "unknown encryption version 0"
    (
        "ca2527a037347b91bea0c8a30fc8d9600ffd81ec00038671e3a0f0cb0fc9f642",
        "At\u0444upco0WyaOW2IGDKcshwxI9xO8HgD/P8Ddt46CbxDbrhdG8VmJZE0UICD06CUvEvdnr1cp1fiMtlM/GrE92xAc1Ews"
        "VCQEgWEu2gsHUVf4JAa3TpgkmFc3TWsax0v6n/Wq",
        R.INVALID_BASE64,
    ),  # "invalid base64"
    (
        "cff7bd6a3e29a450fd27f6c125d5edeb0987c475fd1e8d97591e0d4d8a89763c",
        "Agn/l3ULCEAS4V7LhGFM6IGA17jsDUaFCKhrbXDANholyySBfeh+EN8wNB9gaLlg4j6wdBYh+3oK+mnxWu3NKRbSvQAAAAAAAA"
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        R.INVALID_MAC,
    ),  # "invalid MAC"
    (
        "cfcc9cf682dfb00b11357f65bdc45e29156b69db424d20b3596919074f5bf957",
        "AmWxSwuUmqp9UsQX63U7OQ6K1thLI69L7G2b+j4DoIr0oRWQ8avl4OLqWZiTJ10vIgKrNqjoaX+fNhE9RqmR5g0f6BtUg1ijF"
        "Mz71MO1D4lQLQfW7+UHva8PGYgQ1QpHlKgR",
        R.INVALID_MAC,
    ),  # "invalid MAC"
    (
        "5254827d29177622d40a7b67cad014fe7137700c3c523903ebbe3e1b74d40214",
        "Anq2XbuLvCuONcr7V0UxTh8FAyWoZNEdBHXvdbNmDZHB573MI7R7rrTYftpqmvUpahmBC2sngmI14/L0HjOZ7lWGJlzdh6luiO"
        "nGPc46cGxf08MRC4CIuxx3i2Lm0KqgJ7vA",
        R.INVALID_PADDING,
    ),  # "invalid padding"
    (
        "fea39aca9aa8340c3a78ae1f0902aa7e726946e4efcd7783379df8096029c496",
        "An1Cg+O1TIhdav7ogfSOYvCj9dep4ctxzKtZSniCw5MwRrrPJFyAQYZh5VpjC2QYzny5LIQ9v9lhqmZR4WBYRNJ0ognHVNMwi"
        "FV1SHpvUFT8HHZN/m/QarflbvDHAtO6pY16",
        R.INVALID_PADDING,
    ),  # "invalid padding"
    (
        "5cd2d13b9e355aeb2452afbd3786870dbeecb9d355b12cb0a3b6e9da5744cd35",
        "",
        R.INVALID_PAYLOAD_LENGTH,
    ),  # "invalid payload length: 0"
    (
        "d61d3f09c7dfe1c0be91af7109b60a7d9d498920c90cbba1e137320fdd938853",
        "Ag==",
        R.INVALID_PAYLOAD_LENGTH,
    ),  # "invalid payload length: 4"
    (
        "873bb0fc665eb950a8e7d5971965539f6ebd645c83c08cd6a85aafbad0f0bc47",
        "AqxgToSh3H7iLYRJjoWAM+vSv/Y1mgNlm6OWWjOYUClrFF8=",
        R.INVALID_PAYLOAD_LENGTH,
    ),  # "invalid payload length: 48"
]


def _reason(call, *args) -> Nip44ErrorReason:  # type: ignore[no-untyped-def]
    with pytest.raises(Nip44Error) as caught:
        call(*args)
    return caught.value.reason


# ------------------------------------------------------------------- vectors


@pytest.mark.parametrize(("sec1", "pub2", "expected"), VALID_CONVERSATION_KEYS)
def test_vector_conversation_key(sec1: str, pub2: str, expected: str) -> None:
    assert nip44.conversation_key(bytes.fromhex(sec1), pub2).hex() == expected


@pytest.mark.parametrize(("nonce", "chacha_key", "chacha_nonce", "hmac_key"), MESSAGE_KEYS)
def test_vector_message_keys(nonce: str, chacha_key: str, chacha_nonce: str, hmac_key: str) -> None:
    keys = nip44.message_keys(bytes.fromhex(MESSAGE_KEYS_CONVERSATION_KEY), bytes.fromhex(nonce))
    assert tuple(key.hex() for key in keys) == (chacha_key, chacha_nonce, hmac_key)


@pytest.mark.parametrize(("unpadded", "padded"), PADDED_LENGTHS)
def test_vector_calc_padded_len(unpadded: int, padded: int) -> None:
    assert nip44.calc_padded_len(unpadded) == padded


@pytest.mark.parametrize(("sec1", "sec2", "conv_key", "nonce", "plaintext", "payload"), ENCRYPT_DECRYPT)
def test_vector_encrypt_decrypt(sec1: str, sec2: str, conv_key: str, nonce: str, plaintext: str, payload: str) -> None:
    alice, bob = SecretKey.from_hex(sec1), SecretKey.from_hex(sec2)
    key = nip44.conversation_key(alice.secret_bytes, bob.public_key_hex)
    assert key.hex() == conv_key
    assert nip44.encrypt(plaintext, key, bytes.fromhex(nonce)) == payload
    assert nip44.conversation_key(bob.secret_bytes, alice.public_key_hex) == key
    assert nip44.decrypt(payload, key) == plaintext


def test_vector_longest_message() -> None:
    assert hashlib.sha256(LONG_PLAINTEXT.encode()).hexdigest() == LONG_PLAINTEXT_SHA256
    key = bytes.fromhex(LONG_CONVERSATION_KEY)
    payload = nip44.encrypt(LONG_PLAINTEXT, key, bytes.fromhex(LONG_NONCE))
    assert hashlib.sha256(payload.encode()).hexdigest() == LONG_PAYLOAD_SHA256
    assert nip44.decrypt(payload, key) == LONG_PLAINTEXT


@pytest.mark.parametrize("length", INVALID_MESSAGE_LENGTHS)
def test_vector_invalid_message_lengths(length: int) -> None:
    assert _reason(nip44.encrypt, "a" * length, bytes(32)) is R.INVALID_PLAINTEXT_LENGTH


@pytest.mark.parametrize(("sec1", "pub2", "reason"), INVALID_CONVERSATION_KEYS)
def test_vector_invalid_conversation_key(sec1: str, pub2: str, reason: Nip44ErrorReason) -> None:
    assert _reason(nip44.conversation_key, bytes.fromhex(sec1), pub2) is reason


@pytest.mark.parametrize(("conv_key", "payload", "reason"), INVALID_DECRYPT)
def test_vector_invalid_decrypt(conv_key: str, payload: str, reason: Nip44ErrorReason) -> None:
    assert _reason(nip44.decrypt, payload, bytes.fromhex(conv_key)) is reason


# ------------------------------------------------------------------ our errors

KEY = bytes.fromhex(ENCRYPT_DECRYPT[0][2])
NONCE = bytes(31) + b"\x01"


def _forge(padded: bytes, key: bytes = KEY, nonce: bytes = NONCE) -> str:
    """A correctly MACed payload around arbitrary padded bytes, built without nip44.encrypt."""
    chacha_key, chacha_nonce, hmac_key = nip44.message_keys(key, nonce)
    encryptor = Cipher(algorithms.ChaCha20(chacha_key, bytes(4) + chacha_nonce), mode=None).encryptor()
    ciphertext = encryptor.update(padded)
    mac = hmac.new(hmac_key, nonce + ciphertext, hashlib.sha256).digest()
    return base64.b64encode(b"\x02" + nonce + ciphertext + mac).decode()


def test_forge_helper_matches_encrypt() -> None:
    assert _forge(b"\x00\x01a" + bytes(31)) == nip44.encrypt("a", KEY, NONCE) == ENCRYPT_DECRYPT[0][5]


def test_wrong_conversation_key_fails_mac() -> None:
    payload = nip44.encrypt("secret", KEY)
    assert _reason(nip44.decrypt, payload, bytes(32)) is R.INVALID_MAC


def test_unknown_version_byte() -> None:
    raw = bytearray(base64.b64decode(nip44.encrypt("hi", KEY)))
    for version in (0, 1, 3, 255):
        raw[0] = version
        assert _reason(nip44.decrypt, base64.b64encode(bytes(raw)).decode(), KEY) is R.UNKNOWN_VERSION


def test_payload_length_bounds() -> None:
    short = "A" * 128 + "AA=="  # 132 characters, but only 98 bytes once decoded
    assert _reason(nip44.decrypt, short, KEY) is R.INVALID_PAYLOAD_LENGTH
    assert _reason(nip44.decrypt, "A" * (nip44.MAX_PAYLOAD + 4), KEY) is R.INVALID_PAYLOAD_LENGTH


def test_base64_must_be_strict() -> None:
    payload = nip44.encrypt("hi", KEY)
    assert _reason(nip44.decrypt, payload[:-4] + "!!!!", KEY) is R.INVALID_BASE64
    assert _reason(nip44.decrypt, payload[:50] + "\n" + payload[51:], KEY) is R.INVALID_BASE64
    unpadded = nip44.encrypt("x" * 40, KEY)  # 1 + 32 + (2 + 64) + 32 = 131 bytes: one "=" of padding
    assert unpadded.endswith("=")
    assert _reason(nip44.decrypt, unpadded.rstrip("="), KEY) is R.INVALID_BASE64


@pytest.mark.parametrize(
    "padded",
    [
        b"\x00\x00" + bytes(32),  # zero length prefix (an extended-length header we do not accept)
        b"\x00\x21" + b"a" * 32,  # says 33 bytes, only 32 present
        b"\x00\x01a" + bytes(63),  # 1 byte of plaintext needs 32 bytes of padding, not 64
    ],
    ids=["zero-length", "overlong-length", "too-much-padding"],
)
def test_invalid_padding(padded: bytes) -> None:
    assert _reason(nip44.decrypt, _forge(padded), KEY) is R.INVALID_PADDING


def test_decrypted_bytes_must_be_utf8() -> None:
    assert _reason(nip44.decrypt, _forge(b"\x00\x02\xc3\x28" + bytes(30)), KEY) is R.INVALID_UTF8


def test_plaintext_must_be_encodable() -> None:
    assert _reason(nip44.encrypt, "a\ud800", KEY) is R.INVALID_UTF8


def test_plaintext_length_counts_utf8_bytes() -> None:
    assert nip44.decrypt(nip44.encrypt("é" * 32767, KEY), KEY) == "é" * 32767  # 65534 bytes
    assert _reason(nip44.encrypt, "é" * 32768, KEY) is R.INVALID_PLAINTEXT_LENGTH  # 65536 bytes


def test_calc_padded_len_rejects_zero() -> None:
    assert _reason(nip44.calc_padded_len, 0) is R.INVALID_PLAINTEXT_LENGTH


@pytest.mark.parametrize("key", [bytes(31), bytes(33), "00" * 32])
def test_conversation_key_must_be_32_bytes(key: object) -> None:
    assert _reason(nip44.encrypt, "hi", key) is R.INVALID_CONVERSATION_KEY
    assert _reason(nip44.decrypt, nip44.encrypt("hi", KEY), key) is R.INVALID_CONVERSATION_KEY


@pytest.mark.parametrize("nonce", [bytes(31), bytes(33)])
def test_nonce_must_be_32_bytes(nonce: bytes) -> None:
    assert _reason(nip44.encrypt, "hi", KEY, nonce) is R.INVALID_NONCE


@pytest.mark.parametrize("pub", ["ab" * 31, "zz" * 32, 7])
def test_conversation_key_rejects_malformed_public_key(pub: object) -> None:
    assert _reason(nip44.conversation_key, bytes(31) + b"\x01", pub) is R.INVALID_PUBLIC_KEY


def test_conversation_key_rejects_short_secret() -> None:
    assert _reason(nip44.conversation_key, b"\x01" * 31, ENCRYPT_DECRYPT[0][0]) is R.INVALID_SECRET_KEY


def test_random_nonce_makes_payloads_differ() -> None:
    first, second = nip44.encrypt("same", KEY), nip44.encrypt("same", KEY)
    assert first != second
    assert base64.b64decode(first)[1:33] != base64.b64decode(second)[1:33]


# ------------------------------------------------------------------ properties

plaintexts = st.text(st.characters(codec="utf-8"), min_size=1, max_size=300)


@settings(max_examples=100, deadline=None)
@given(plaintext=plaintexts)
def test_property_round_trip_between_two_parties(plaintext: str) -> None:
    alice, bob = SecretKey.generate(), SecretKey.generate()
    sending = nip44.conversation_key(alice.secret_bytes, bob.public_key_hex)
    receiving = nip44.conversation_key(bob.secret_bytes, alice.public_key_hex)
    assert sending == receiving
    payload = nip44.encrypt(plaintext, sending)
    assert nip44.decrypt(payload, receiving) == plaintext
    decoded_len = len(base64.b64decode(payload))
    assert decoded_len == 1 + 32 + 2 + nip44.calc_padded_len(len(plaintext.encode())) + 32


@settings(max_examples=200, deadline=None)
@given(plaintext=plaintexts, index=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_property_any_bit_flip_is_detected(plaintext: str, index: int, bit: int) -> None:
    raw = bytearray(base64.b64decode(nip44.encrypt(plaintext, KEY)))
    index %= len(raw)
    raw[index] ^= 1 << bit
    expected = R.UNKNOWN_VERSION if index == 0 else R.INVALID_MAC
    assert _reason(nip44.decrypt, base64.b64encode(bytes(raw)).decode(), KEY) is expected


@given(length=st.integers(1, 65535))
def test_property_padding_is_bounded_and_chunked(length: int) -> None:
    padded = nip44.calc_padded_len(length)
    assert padded >= max(length, 32)
    assert padded <= max(32, 2 * length)
    assert padded % 32 == 0
