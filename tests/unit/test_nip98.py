"""NIP-98 HTTP auth: each failure has its reason; a used authorization cannot be replayed."""

from __future__ import annotations

import base64
import hashlib
import time

import pytest

from service.db import create_engine, session_factory
from service.nostr import nip98
from service.nostr.nip01 import SecretKey, sign_event

URL = "https://escrow.example/v1/jobs/abc/invoice?x=1"


def auth(
    key: SecretKey,
    *,
    url: str = URL,
    method: str = "POST",
    body: bytes | None = b'{"a":1}',
    kind: int = nip98.KIND_HTTP_AUTH,
    created_at: int | None = None,
    extra: list | None = None,
) -> str:
    tags = [["u", url], ["method", method]]
    if body is not None:
        tags.append(["payload", hashlib.sha256(body).hexdigest()])
    tags += extra or []
    return nip98.build_header(sign_event(key, kind, tags, "", created_at=created_at))


@pytest.fixture
async def sessions(database_url: str):
    engine = create_engine(database_url)
    yield session_factory(engine)
    await engine.dispose()


async def verify(sessions, header, *, method="POST", url=URL, body=b'{"a":1}', now=None):
    return await nip98.verify_request(sessions, header, method=method, url=url, body=body, now=now or int(time.time()))


async def test_valid_request_returns_the_callers_key(sessions) -> None:
    key = SecretKey.generate()
    ev = await verify(sessions, auth(key))
    assert ev.pubkey == key.public_key_hex


async def test_replay_is_refused(sessions) -> None:
    header = auth(SecretKey.generate())
    await verify(sessions, header)
    with pytest.raises(nip98.AuthError) as exc:
        await verify(sessions, header)
    assert exc.value.reason == nip98.AuthReason.REPLAY


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


@pytest.mark.parametrize(
    "make,kwargs,reason",
    [
        (lambda k: None, {}, nip98.AuthReason.MISSING),
        (lambda k: "Bearer abc", {}, nip98.AuthReason.SCHEME),
        (lambda k: "Nostr !!!notbase64", {}, nip98.AuthReason.ENCODING),
        (lambda k: "Nostr " + _b64("[1,2]"), {}, nip98.AuthReason.EVENT),
        (lambda k: auth(k)[:-8] + _b64("xx")[:8], {}, nip98.AuthReason.ENCODING),
        (lambda k: auth(k, kind=1), {}, nip98.AuthReason.KIND),
        (lambda k: auth(k, created_at=int(time.time()) - 120), {}, nip98.AuthReason.EXPIRED),
        (lambda k: auth(k, created_at=int(time.time()) + 120), {}, nip98.AuthReason.EXPIRED),
        (lambda k: auth(k, url="https://escrow.example/v1/jobs/other"), {}, nip98.AuthReason.URL),
        (lambda k: auth(k), {"url": URL.replace("x=1", "x=2")}, nip98.AuthReason.URL),
        (lambda k: auth(k, method="GET"), {}, nip98.AuthReason.METHOD),
        (lambda k: auth(k, body=b'{"a":2}'), {}, nip98.AuthReason.PAYLOAD),
        (lambda k: auth(k, body=None), {}, nip98.AuthReason.PAYLOAD),
        (lambda k: auth(k, extra=[["u", "https://evil.example/"]]), {}, nip98.AuthReason.EVENT),
    ],
)
async def test_each_failure_has_its_reason(sessions, make, kwargs, reason) -> None:
    with pytest.raises(nip98.AuthError) as exc:
        await verify(sessions, make(SecretKey.generate()), **kwargs)
    assert exc.value.reason == reason


async def test_forged_signature_is_an_invalid_event(sessions) -> None:
    key = SecretKey.generate()
    ev = sign_event(key, nip98.KIND_HTTP_AUTH, [["u", URL], ["method", "GET"]], "")
    forged = {**ev.to_dict(), "pubkey": SecretKey.generate().public_key_hex}
    import json

    header = "Nostr " + base64.b64encode(json.dumps(forged).encode()).decode()
    with pytest.raises(nip98.AuthError) as exc:
        await verify(sessions, header, method="GET", body=None)
    assert exc.value.reason == nip98.AuthReason.EVENT
