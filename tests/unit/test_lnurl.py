"""LNURL-pay client: destination parsing, SSRF refusals, and validation of every remote answer.

HTTP-shaped tests run against a real loopback server (``allow_private=True``); address-policy
tests use a substituted resolver and an ``httpx.MockTransport`` that records every request,
so "no connection was made" is checked, not assumed.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import bech32
import bolt11
import httpx
import pytest
from bolt11 import Bolt11, MilliSatoshi, TagChar, Tags
from bolt11.models.tags import Tag

from service.lightning import lnurl
from service.lightning.lnurl import LnurlError, LnurlReason, fetch_invoice, is_blocked_address, parse_destination

R = LnurlReason
AMOUNT = 123_000
NODE_KEY = "11" * 32
META = json.dumps([["text/plain", 'Reward für "job" Ø'], ["text/identifier", "alice@example.com"]], ensure_ascii=False)


def encode_lnurl(url: str, upper: bool = False) -> str:
    s = bech32.bech32_encode("lnurl", bech32.convertbits(url.encode(), 8, 5))
    return s.upper() if upper else s


def make_invoice(
    amount_msat: int | None = AMOUNT,
    *,
    metadata: str | None = META,
    description_hash: bytes | None = None,
    description: str | None = None,
    currency: str = "bcrt",
    date: int | None = None,
    expiry: int = 600,
    hrp: str | None = None,
) -> tuple[str, bytes]:
    """A signed BOLT11 invoice; ``hrp`` forces the human-readable part (for malformed amounts)."""
    payment_hash = os.urandom(32)
    tags = [
        Tag(TagChar.payment_hash, payment_hash.hex()),
        Tag(TagChar.payment_secret, os.urandom(32).hex()),
        Tag(TagChar.expire_time, expiry),
        Tag(TagChar.min_final_cltv_expiry, 40),
    ]
    if description is not None:
        tags.append(Tag(TagChar.description, description))
    else:
        h = description_hash if description_hash is not None else hashlib.sha256(metadata.encode()).digest()
        tags.append(Tag(TagChar.description_hash, h.hex()))
    inv = Bolt11(
        currency=currency,
        date=date if date is not None else int(time.time()),
        amount_msat=MilliSatoshi(amount_msat) if amount_msat else None,
        tags=Tags(tags),
    )
    enc = sys.modules["bolt11.encode"]
    original = enc._create_hrp
    if hrp is not None:
        enc._create_hrp = lambda currency, amount: hrp
    try:
        return bolt11.encode(inv, private_key=NODE_KEY), payment_hash
    finally:
        enc._create_hrp = original


# ---- a real loopback LNURL server ---------------------------------------------


@dataclass
class Reply:
    status: int = 200
    body: bytes | Iterator[bytes] = b""
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    length: bool = True  # send Content-Length (else the body ends when the connection closes)
    delay: float = 0.0


def js(obj: Any, status: int = 200, **kw: Any) -> Reply:
    return Reply(status=status, body=json.dumps(obj).encode(), **kw)


@dataclass
class Seen:
    path: str
    query: str
    headers: dict[str, str]


class LnurlServer:
    """Serves ``/.well-known/lnurlp/alice`` and ``/cb``; tests replace either route."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[Seen] = []
        self.routes: dict[str, Callable[[dict[str, str]], Reply]] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # http.server's name
                path, _, query = self.path.partition("?")
                server.requests.append(Seen(path, query, {k.lower(): v for k, v in self.headers.items()}))
                route = server.routes.get(path)
                reply = route({k: v[0] for k, v in parse_qs(query).items()}) if route else js({}, 404)
                time.sleep(reply.delay)
                body = reply.body if isinstance(reply.body, bytes) else None
                try:
                    self.send_response(reply.status)
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    if reply.length and body is not None and "Content-Length" not in reply.headers:
                        self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    for chunk in [body] if body is not None else reply.body:
                        self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.scheme = "https" if tls else "http"
        self.address = f"alice@127.0.0.1:{self.port}"
        self.pay_request: dict[str, Any] = {
            "tag": "payRequest",
            "callback": self.url("/cb?id=abc"),
            "minSendable": 1_000,
            "maxSendable": 1_000_000_000,
            "metadata": META,
        }
        self.invoices: list[bytes] = []
        self.routes["/.well-known/lnurlp/alice"] = lambda q: js(self.pay_request)
        self.routes["/cb"] = self.good_invoice
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def good_invoice(self, q: dict[str, str]) -> Reply:
        pr, h = make_invoice(int(q["amount"]))
        self.invoices.append(h)
        return js({"pr": pr, "routes": []})

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def srv() -> Iterator[LnurlServer]:
    s = LnurlServer()
    yield s
    s.close()


async def fetch(dest: Any, amount: int = AMOUNT, **kw: Any) -> lnurl.FetchedInvoice:
    kw.setdefault("allow_private", True)
    return await fetch_invoice(dest, amount, **kw)


async def refused(reason: LnurlReason, dest: Any, amount: int = AMOUNT, **kw: Any) -> LnurlError:
    with pytest.raises(LnurlError) as ei:
        await fetch(dest, amount, **kw)
    assert ei.value.reason == reason, ei.value
    return ei.value


# ---- parsing ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, url, address",
    [
        ("alice@example.com", "https://example.com/.well-known/lnurlp/alice", "alice@example.com"),
        ("Alice@Example.COM", "https://example.com/.well-known/lnurlp/alice", "alice@example.com"),
        (
            "  lightning:bob+tips@pay.example.org  ",
            "https://pay.example.org/.well-known/lnurlp/bob+tips",
            "bob+tips@pay.example.org",
        ),
        (
            "LIGHTNING:a.b_c-d@example.com:8443",
            "https://example.com:8443/.well-known/lnurlp/a.b_c-d",
            "a.b_c-d@example.com:8443",
        ),
        ("alice@127.0.0.1:9000", "http://127.0.0.1:9000/.well-known/lnurlp/alice", "alice@127.0.0.1:9000"),
        ("alice@localhost", "http://localhost/.well-known/lnurlp/alice", "alice@localhost"),
        ("alice@[::1]:9000", "http://[::1]:9000/.well-known/lnurlp/alice", "alice@[::1]:9000"),
        ("alice@10.0.0.7", "https://10.0.0.7/.well-known/lnurlp/alice", "alice@10.0.0.7"),
    ],
)
def test_lightning_address_maps_to_well_known_url(text: str, url: str, address: str) -> None:
    t = parse_destination(text)
    assert t.url == url
    assert t.lightning_address == address


SPEC_LNURL = (
    "LNURL1DP68GURN8GHJ7UM9WFMXJCM99E3K7MF0V9CXJ0M385EKVCENXC6R2C35XVUKXEFCV5MKVV34X5EKZD3EV56NYD3HXQURZEPEXEJ"
    "XXEPNXSCRVWFNV9NXZCN9XQ6XYEFHVGCXXCMYXYMNSERXFQ5FNS"
)
SPEC_URL = "https://service.com/api?q=3fc3645b439ce8e7f2553a69e5267081d96dcd340693afabe04be7b0ccd178df"


def test_lud01_example_decodes_in_either_case_and_with_prefix() -> None:
    for text in (SPEC_LNURL, SPEC_LNURL.lower(), "lightning:" + SPEC_LNURL, "LIGHTNING:" + SPEC_LNURL):
        t = parse_destination(text)
        assert t.url == SPEC_URL and t.lightning_address is None


def test_lnurl_round_trip_longer_than_90_chars() -> None:
    url = "https://pay.example.com/lnurlp/" + "x" * 300 + "?k=v&other=1"
    encoded = encode_lnurl(url)
    assert len(encoded) > 90
    assert parse_destination(encoded).url == url
    assert parse_destination(encoded.upper()).url == url


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("lightning:", "empty"),
        ("alice", "expected a lightning address"),
        ("https://example.com/lnurlp/alice", "expected a lightning address"),
        ("lnbcrt1230n1pj", "BOLT11 invoice"),
        ("@example.com", "no username"),
        ("alice@", "no domain"),
        ("a@b@example.com", "more than one @"),
        ("al ice@example.com", "whitespace"),
        ("al/ice@example.com", "username may only contain"),
        ("ali%41@example.com", "username may only contain"),
        ("ALICE?x@example.com", "username may only contain"),
        ("..@example.com", "only dots"),
        ("alice@example", "fully qualified"),
        ("alice@exa_mple..com", "empty label"),
        ("alice@-example.com", "characters outside"),
        ("alice@exämple.com", "punycode"),
        ("alice@abcdef.onion", "Tor"),
        ("alice@example.com:0", "port"),
        ("alice@example.com:65536", "port"),
        ("alice@example.com:http", "port"),
        ("alice@[example.com]", "IPv6"),
        ("alice@[::1", "unclosed"),
        ("alice@127.1", "malformed IP"),
        ("alice@0x7f.0x1", "malformed IP"),
        ("alice@999.1.1.1", "malformed IP"),
        ("alice@" + "a" * 250 + ".com", "too long"),
        ("a" * 65 + "@example.com", "username may only contain"),
        ("x" * 3000 + "@example.com", "too long"),
        (SPEC_LNURL[:20] + SPEC_LNURL[20:].lower(), "mixes upper and lower"),
        (SPEC_LNURL[:-1] + ("Q" if SPEC_LNURL[-1] != "Q" else "P"), "checksum"),
        ("lnurl1" + "b" * 20, "checksum"),
    ],
)
def test_malformed_destination_has_a_specific_error(text: str, fragment: str) -> None:
    with pytest.raises(LnurlError) as ei:
        parse_destination(text)
    assert ei.value.reason == R.INVALID_DESTINATION
    assert fragment in ei.value.message


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("ftp://example.com/x", "scheme"),
        ("javascript:alert(1)", "scheme"),
        ("https://user:pw@example.com/x", "credentials"),
        ("https:///path", "no host"),
        ("https://exa mple.com/x", "spaces"),
        ("https://example.com/\x00", "control"),
        ("https://example.com\\@evil.com/", "backslash"),
        ("https://example.com:99999/", "port"),
        ("https://example.onion/x", "Tor"),
    ],
)
def test_lnurl_encoding_a_bad_url_is_refused(url: str, fragment: str) -> None:
    with pytest.raises(LnurlError) as ei:
        parse_destination(encode_lnurl(url))
    assert ei.value.reason == R.INVALID_DESTINATION
    assert "valid URL" in ei.value.message and fragment in ei.value.message


def test_lnurl_with_non_utf8_payload_is_refused() -> None:
    bad = bech32.bech32_encode("lnurl", bech32.convertbits(b"https://\xff\xfe/", 8, 5))
    with pytest.raises(LnurlError, match="UTF-8"):
        parse_destination(bad)


def test_lnurl_with_wrong_prefix_is_refused() -> None:
    with pytest.raises(LnurlError, match="prefix"):
        parse_destination(bech32.bech32_encode("lnurl1x", bech32.convertbits(b"https://a.com/", 8, 5)))


# ---- address policy -------------------------------------------------------------

BLOCKED = [
    "127.0.0.1",
    "127.8.9.10",
    "10.0.0.1",
    "10.255.1.2",
    "172.16.0.1",
    "172.31.255.254",
    "192.168.1.1",
    "169.254.169.254",
    "::1",
    "fe80::1",
    "::ffff:10.0.0.1",
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "100.64.0.1",
    "100.127.255.254",
    "0.0.0.0",
    "::",
    "224.0.0.1",
    "239.255.255.250",
    "ff02::1",
    "255.255.255.255",
    "240.0.0.1",
    "198.18.0.1",
    "192.0.2.1",
    "fc00::1",
    "fd12:3456::1",
    "fec0::1",
    "64:ff9b::a00:1",
    "2002:a00:1::1",
    "2001::1",
    "2001:db8::1",
    "::a00:1",
]
PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.215.14",
    "2606:4700:4700::1111",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
    "2002:808:808::1",
]


@pytest.mark.parametrize("addr", BLOCKED)
def test_non_public_addresses_are_blocked(addr: str) -> None:
    assert is_blocked_address(ipaddress.ip_address(addr))


@pytest.mark.parametrize("addr", PUBLIC)
def test_public_addresses_are_not_blocked(addr: str) -> None:
    assert not is_blocked_address(ipaddress.ip_address(addr))


class Net:
    """A fake resolver plus a recording mock transport: nothing leaves the process."""

    def __init__(
        self,
        dns: dict[str, list[str] | Callable[[], list[str]]],
        handler: Callable[[httpx.Request], httpx.Response] | None = None,
    ) -> None:
        self.dns = dns
        self.lookups: list[tuple[str, int]] = []
        self.sent: list[httpx.Request] = []
        self.handler = handler

    async def resolve(self, host: str, port: int) -> list[str]:
        self.lookups.append((host, port))
        answer = self.dns[host]
        return answer() if callable(answer) else answer

    def _transport(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        if self.handler is None:
            raise AssertionError(f"unexpected connection to {request.url}")
        return self.handler(request)

    def client(self, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self._transport), **kw)

    async def fetch(self, dest: str, **kw: Any) -> lnurl.FetchedInvoice:
        async with self.client() as c:
            return await fetch_invoice(dest, AMOUNT, client=c, resolver=self.resolve, **kw)

    async def refused(self, reason: LnurlReason, dest: str, **kw: Any) -> LnurlError:
        with pytest.raises(LnurlError) as ei:
            await self.fetch(dest, **kw)
        assert ei.value.reason == reason, ei.value
        return ei.value


@pytest.mark.parametrize(
    "addr",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "::1",
        "fe80::1",
        "::ffff:10.0.0.1",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
    ],
)
async def test_host_resolving_to_non_public_address_is_refused_without_connecting(addr: str) -> None:
    net = Net({"pay.example.com": [addr]})
    err = await net.refused(R.BLOCKED_ADDRESS, "alice@pay.example.com")
    assert net.lookups == [("pay.example.com", 443)]
    assert net.sent == []
    assert str(ipaddress.ip_address(addr)) in err.message


async def test_one_non_public_address_among_public_ones_is_enough_to_refuse() -> None:
    net = Net({"pay.example.com": ["8.8.8.8", "2606:4700:4700::1111", "10.0.0.1"]})
    await net.refused(R.BLOCKED_ADDRESS, "alice@pay.example.com")
    assert net.sent == []


@pytest.mark.parametrize(
    "dest",
    ["alice@10.0.0.1", "alice@169.254.169.254", "alice@[fe80::1]", "alice@127.0.0.1", "alice@[::ffff:192.168.0.1]"],
)
async def test_literal_non_public_host_is_refused_without_lookup_or_connection(dest: str) -> None:
    net = Net({})
    await net.refused(R.BLOCKED_ADDRESS, dest)
    assert net.lookups == [] and net.sent == []


async def test_default_resolver_is_the_patchable_module_function(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    async def fake(host: str, port: int) -> list[str]:
        calls.append(host)
        return ["192.168.7.7"]

    monkeypatch.setattr(lnurl, "resolve_host", fake)
    net = Net({})
    async with net.client() as c:
        with pytest.raises(LnurlError) as ei:
            await fetch_invoice("alice@pay.example.com", AMOUNT, client=c)
    assert ei.value.reason == R.BLOCKED_ADDRESS
    assert calls == ["pay.example.com"] and net.sent == []


async def test_real_resolver_answers_localhost_with_loopback() -> None:
    assert "127.0.0.1" in await lnurl.resolve_host("localhost", 80)


@pytest.mark.parametrize("answer", [socket.gaierror(socket.EAI_NONAME, "Name or service not known"), []])
async def test_unresolvable_host_is_dns_failure(answer: Any) -> None:
    def lookup() -> list[str]:
        if isinstance(answer, Exception):
            raise answer
        return answer

    net = Net({"nx.example.com": lookup})
    await net.refused(R.DNS_FAILURE, "alice@nx.example.com")
    assert net.sent == []


def pay_request_handler(
    callback: str, invoice: Callable[[httpx.Request], httpx.Response] | None = None, set_cookie: bool = False
) -> Callable[[httpx.Request], httpx.Response]:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/.well-known/lnurlp/"):
            headers = {"Set-Cookie": "session=s3cret; Path=/"} if set_cookie else {}
            return httpx.Response(
                200,
                json={
                    "tag": "payRequest",
                    "callback": callback,
                    "minSendable": 1000,
                    "maxSendable": 10**9,
                    "metadata": META,
                },
                headers=headers,
            )
        if invoice is not None:
            return invoice(request)
        pr, _ = make_invoice(int(request.url.params["amount"]))
        return httpx.Response(200, json={"pr": pr, "routes": []})

    return handle


async def test_requests_go_to_the_validated_ip_with_host_header_and_sni() -> None:
    net = Net(
        {"pay.example.com": ["93.184.215.14"], "cb.example.net": ["2606:4700:4700::1111"]},
        pay_request_handler("https://cb.example.net/cb?id=7", set_cookie=True),
    )
    got = await net.fetch("alice@pay.example.com")
    assert got.amount_msat == AMOUNT
    first, second = net.sent
    assert first.url.scheme == "https" and first.url.host == "93.184.215.14" and first.url.port in (None, 443)
    assert first.url.path == "/.well-known/lnurlp/alice"
    assert first.headers["host"] == "pay.example.com"
    assert first.extensions["sni_hostname"] == "pay.example.com"
    assert second.url.host == "2606:4700:4700::1111"
    assert second.headers["host"] == "cb.example.net"
    assert second.extensions["sni_hostname"] == "cb.example.net"
    for r in (first, second):
        assert r.headers["user-agent"] == lnurl.USER_AGENT
        assert r.headers["accept-encoding"] == "identity"
        assert "cookie" not in r.headers and "authorization" not in r.headers
        assert r.extensions["timeout"]["connect"] == 2.0


async def test_dns_rebinding_between_requests_is_caught_and_never_connected() -> None:
    answers = iter([["8.8.8.8"], ["127.0.0.1"]])
    net = Net({"pay.example.com": lambda: next(answers)}, pay_request_handler("https://pay.example.com/cb"))
    await net.refused(R.BLOCKED_ADDRESS, "alice@pay.example.com")
    assert [r.url.host for r in net.sent] == ["8.8.8.8"]
    assert len(net.lookups) == 2


@pytest.mark.parametrize(
    "callback",
    [
        "https://169.254.169.254/latest/meta-data/",
        "https://[::1]/cb",
        "https://127.0.0.1:8080/cb",
        "https://[::ffff:10.0.0.1]/cb",
        "https://internal.example.com/cb",
    ],
)
async def test_callback_to_non_public_address_is_refused_without_connecting(callback: str) -> None:
    net = Net({"pay.example.com": ["8.8.8.8"], "internal.example.com": ["10.0.0.5"]}, pay_request_handler(callback))
    await net.refused(R.BLOCKED_ADDRESS, "alice@pay.example.com")
    assert len(net.sent) == 1


async def test_plain_http_is_refused_unless_private_allowed() -> None:
    net = Net({"pay.example.com": ["8.8.8.8"]}, pay_request_handler("http://pay.example.com/cb"))
    await net.refused(R.INSECURE_SCHEME, encode_lnurl("http://pay.example.com/lnurlp/alice"))
    assert net.sent == []
    await net.refused(R.INSECURE_SCHEME, "alice@pay.example.com")  # https endpoint, http callback
    assert len(net.sent) == 1


async def test_redirect_is_refused_even_with_a_redirect_following_client() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})

    net = Net({"pay.example.com": ["8.8.8.8"]}, handle)
    async with net.client(follow_redirects=True) as c:
        with pytest.raises(LnurlError) as ei:
            await fetch_invoice("alice@pay.example.com", AMOUNT, client=c, resolver=net.resolve)
    assert ei.value.reason == R.REDIRECT_REFUSED
    assert [r.url.host for r in net.sent] == ["8.8.8.8"]


async def test_lnurl_tagged_for_another_protocol_is_refused_before_any_request() -> None:
    net = Net({})
    await net.refused(R.NOT_PAY_REQUEST, encode_lnurl("https://pay.example.com/auth?tag=login&k1=" + "ab" * 32))
    assert net.lookups == [] and net.sent == []


# ---- HTTP behaviour against a real loopback server -------------------------------


async def test_happy_path_returns_the_checked_invoice(srv: LnurlServer) -> None:
    got = await fetch(srv.address)
    assert got.amount_msat == AMOUNT
    assert got.payment_hash == srv.invoices[0]
    assert bolt11.decode(got.bolt11).payment_hash == got.payment_hash.hex()
    assert got.description_hash == hashlib.sha256(META.encode("utf-8")).digest()
    assert got.metadata == META
    assert got.description == 'Reward für "job" Ø'
    assert got.callback == srv.url("/cb?id=abc")
    assert got.success_action is None
    assert got.expires_at > time.time() + 500
    first, second = srv.requests
    assert first.path == "/.well-known/lnurlp/alice"
    assert first.headers["host"] == f"127.0.0.1:{srv.port}"
    assert first.headers["user-agent"] == lnurl.USER_AGENT
    assert second.path == "/cb" and second.query == f"id=abc&amount={AMOUNT}"


async def test_lnurl_bech32_destination_works(srv: LnurlServer) -> None:
    srv.routes["/lnurlp/xyz"] = lambda q: js(srv.pay_request)
    got = await fetch(encode_lnurl(srv.url("/lnurlp/xyz?k=1"), upper=True))
    assert got.amount_msat == AMOUNT
    assert srv.requests[0].path == "/lnurlp/xyz" and srv.requests[0].query == "k=1"


async def test_loopback_server_is_blocked_when_private_not_allowed(srv: LnurlServer) -> None:
    await refused(R.BLOCKED_ADDRESS, srv.address, allow_private=False)
    assert srv.requests == []


async def test_callback_query_is_kept_and_amount_comment_replaced(srv: LnurlServer) -> None:
    srv.pay_request["callback"] = srv.url("/cb?id=abc&amount=1&x=1%2B2&flag&comment=old&z=%20")
    srv.pay_request["commentAllowed"] = 20
    await fetch(srv.address, comment="thanks & bye!")
    assert srv.requests[1].query == "id=abc&x=1%2B2&flag&z=%20&amount=123000&comment=thanks%20%26%20bye%21"


async def test_comment_is_sent_only_within_comment_allowed(srv: LnurlServer) -> None:
    srv.pay_request["commentAllowed"] = 10
    await fetch(srv.address, comment="0123456789")
    assert parse_qs(srv.requests[1].query)["comment"] == ["0123456789"]
    srv.requests.clear()
    err = await refused(R.COMMENT_TOO_LONG, srv.address, comment="01234567890")
    assert "10" in err.message
    assert srv.paths() == ["/.well-known/lnurlp/alice"]  # callback never called


@pytest.mark.parametrize("allowed", [None, 0, -5, "100", True])
async def test_comment_refused_when_service_does_not_accept_comments(srv: LnurlServer, allowed: Any) -> None:
    if allowed is not None:
        srv.pay_request["commentAllowed"] = allowed
    await refused(R.COMMENT_TOO_LONG, srv.address, comment="hi")
    assert srv.paths() == ["/.well-known/lnurlp/alice"]
    await fetch(srv.address, comment="")  # an empty comment is no comment
    assert "comment" not in srv.requests[-1].query


async def test_redirect_from_real_server_is_not_followed(srv: LnurlServer) -> None:
    srv.routes["/.well-known/lnurlp/alice"] = lambda q: Reply(302, headers={"Location": srv.url("/elsewhere")})
    srv.routes["/elsewhere"] = lambda q: js(srv.pay_request)
    async with httpx.AsyncClient(follow_redirects=True, trust_env=False) as c:
        await refused(R.REDIRECT_REFUSED, srv.address, client=c)
    assert srv.paths() == ["/.well-known/lnurlp/alice"]


async def test_redirect_from_callback_is_not_followed(srv: LnurlServer) -> None:
    srv.routes["/cb"] = lambda q: Reply(307, headers={"Location": "http://169.254.169.254/"})
    await refused(R.REDIRECT_REFUSED, srv.address)


def padded(obj: Any, size: int) -> bytes:
    body = json.dumps(obj).encode()
    return body + b" " * (size - len(body))


@pytest.mark.parametrize("length", [True, False])
async def test_body_at_the_limit_is_accepted_and_one_byte_more_refused(srv: LnurlServer, length: bool) -> None:
    limit = 4096
    srv.routes["/.well-known/lnurlp/alice"] = lambda q: Reply(body=padded(srv.pay_request, limit), length=length)
    await fetch(srv.address, max_response_bytes=limit)
    srv.routes["/.well-known/lnurlp/alice"] = lambda q: Reply(body=padded(srv.pay_request, limit + 1), length=length)
    await refused(R.TOO_LARGE, srv.address, max_response_bytes=limit)


async def test_huge_streamed_body_is_abandoned(srv: LnurlServer) -> None:
    sent = [0]

    def forever() -> Iterator[bytes]:
        yield b'{"tag": "payRequest", "pad": "'
        while sent[0] < 50_000_000:
            sent[0] += 65536
            yield b"x" * 65536

    srv.routes["/.well-known/lnurlp/alice"] = lambda q: Reply(body=forever(), length=False)
    t0 = time.monotonic()
    await refused(R.TOO_LARGE, srv.address, total_timeout=10)
    assert time.monotonic() - t0 < 5
    assert sent[0] < 50_000_000


async def test_announced_oversize_is_refused_before_reading(srv: LnurlServer) -> None:
    srv.routes["/.well-known/lnurlp/alice"] = lambda q: Reply(
        body=b"{}", headers={"Content-Type": "application/json", "Content-Length": str(10**9)}
    )
    err = await refused(R.TOO_LARGE, srv.address)
    assert "announced" in err.message


async def test_slow_server_times_out_within_the_total_deadline(srv: LnurlServer) -> None:
    srv.routes["/cb"] = lambda q: Reply(body=b"{}", delay=1.5)
    t0 = time.monotonic()
    await refused(R.TIMEOUT, srv.address, total_timeout=0.5)
    assert time.monotonic() - t0 < 1.2


async def test_total_timeout_bounds_the_whole_call_not_each_request(srv: LnurlServer) -> None:
    srv.routes["/.well-known/lnurlp/alice"] = lambda q: Reply(body=json.dumps(srv.pay_request).encode(), delay=0.4)
    srv.routes["/cb"] = lambda q: Reply(body=b"{}", delay=0.4)
    # Each request alone (0.4 s) is within 0.6 s: only a bound on the whole call refuses it, once
    # the callback is under way (so the first request was answered and the second one cut off).
    await refused(R.TIMEOUT, srv.address, total_timeout=0.6)
    assert [r.path for r in srv.requests] == ["/.well-known/lnurlp/alice", "/cb"]


async def test_closed_port_is_connection_failure() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    await refused(R.CONNECTION_FAILED, f"alice@127.0.0.1:{port}")


async def test_compressed_body_is_refused(srv: LnurlServer) -> None:
    srv.routes["/.well-known/lnurlp/alice"] = lambda q: Reply(
        body=b"\x1f\x8b", headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
    )
    await refused(R.HTTP_ERROR, srv.address)


@pytest.mark.parametrize("ctype", [None, "application/json; charset=utf-8", "text/plain", "application/lnurl+json"])
async def test_json_ish_or_missing_content_type_is_accepted(srv: LnurlServer, ctype: str | None) -> None:
    headers = {"Content-Type": ctype} if ctype else {}
    srv.routes["/.well-known/lnurlp/alice"] = lambda q: Reply(
        body=json.dumps(srv.pay_request).encode(), headers=headers
    )
    assert (await fetch(srv.address)).amount_msat == AMOUNT


@pytest.mark.parametrize("ctype", ["image/png", "application/octet-stream", "application/xml"])
async def test_non_json_content_type_is_refused(srv: LnurlServer, ctype: str) -> None:
    srv.routes["/.well-known/lnurlp/alice"] = lambda q: Reply(
        body=json.dumps(srv.pay_request).encode(), headers={"Content-Type": ctype}
    )
    await refused(R.BAD_JSON, srv.address)


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'"payRequest"', b'{"tag": "payRequest", "x": NaN}', b"\xff\xfe{}", b"[" * 100_000, b""],
)
async def test_unparseable_or_non_object_json_is_bad_json(srv: LnurlServer, body: bytes) -> None:
    srv.routes["/.well-known/lnurlp/alice"] = lambda q: Reply(body=body)
    await refused(R.BAD_JSON, srv.address, max_response_bytes=200_000)


async def test_remote_error_status_is_reported_at_either_step(srv: LnurlServer) -> None:
    srv.routes["/.well-known/lnurlp/alice"] = lambda q: js({"status": "ERROR", "reason": "no such user"})
    err = await refused(R.REMOTE_ERROR, srv.address)
    assert "no such user" in err.message
    srv.routes["/.well-known/lnurlp/alice"] = lambda q: js({"status": "ERROR", "reason": "gone"}, 404)
    assert "gone" in (await refused(R.REMOTE_ERROR, srv.address)).message
    srv.routes["/.well-known/lnurlp/alice"] = lambda q: js(srv.pay_request)
    srv.routes["/cb"] = lambda q: js({"status": "error", "reason": "amount too small for today"})
    assert "too small" in (await refused(R.REMOTE_ERROR, srv.address)).message


async def test_remote_reason_is_sanitized_and_truncated(srv: LnurlServer) -> None:
    srv.routes["/.well-known/lnurlp/alice"] = lambda q: js(
        {"status": "ERROR", "reason": "\x1b[31mred\r\nInjected: header\x00" + "A" * 100_000}
    )
    err = await refused(R.REMOTE_ERROR, srv.address, max_response_bytes=200_000)
    assert len(str(err)) < 300
    assert not any(ch in str(err) for ch in "\x1b\r\n\x00")
    assert "red" in err.message


async def test_http_error_status_does_not_echo_the_body_or_query_secrets(srv: LnurlServer) -> None:
    srv.routes["/lnurlp"] = lambda q: Reply(
        500, body=b"<html>stack trace DBPASSWORD</html>", headers={"Content-Type": "text/html"}
    )
    err = await refused(R.HTTP_ERROR, encode_lnurl(srv.url("/lnurlp?k1=SECRETTOKEN123")))
    assert "500" in err.message
    assert "DBPASSWORD" not in str(err) and "SECRETTOKEN123" not in str(err)


async def test_callback_secret_is_not_in_invoice_errors(srv: LnurlServer) -> None:
    srv.pay_request["callback"] = srv.url("/cb?token=SECRETTOKEN123")
    srv.routes["/cb"] = lambda q: js({"pr": make_invoice(AMOUNT + 1)[0]})
    err = await refused(R.AMOUNT_MISMATCH, srv.address)
    assert "SECRETTOKEN123" not in str(err)


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"tag": "withdrawRequest"}, R.NOT_PAY_REQUEST),
        ({"tag": None}, R.NOT_PAY_REQUEST),
        ({"callback": None}, R.BAD_PAY_REQUEST),
        ({"callback": 42}, R.BAD_PAY_REQUEST),
        ({"callback": "ftp://127.0.0.1/cb"}, R.BAD_PAY_REQUEST),
        ({"callback": "/relative/cb"}, R.BAD_PAY_REQUEST),
        ({"callback": "http://user:pass@127.0.0.1/cb"}, R.BAD_PAY_REQUEST),
        ({"callback": "https://evil.onion/cb"}, R.BAD_PAY_REQUEST),
        ({"minSendable": None}, R.BAD_PAY_REQUEST),
        ({"minSendable": "1000"}, R.BAD_PAY_REQUEST),
        ({"minSendable": 1000.5}, R.BAD_PAY_REQUEST),
        ({"minSendable": True}, R.BAD_PAY_REQUEST),
        ({"minSendable": 0}, R.BAD_PAY_REQUEST),
        ({"maxSendable": -1}, R.BAD_PAY_REQUEST),
        ({"maxSendable": 10**30}, R.BAD_PAY_REQUEST),
        ({"minSendable": 2000, "maxSendable": 1000}, R.BAD_PAY_REQUEST),
        ({"metadata": None}, R.BAD_METADATA),
        ({"metadata": [["text/plain", "x"]]}, R.BAD_METADATA),
        ({"metadata": "not json"}, R.BAD_METADATA),
        ({"metadata": '{"text/plain": "x"}'}, R.BAD_METADATA),
        ({"metadata": "[]"}, R.BAD_METADATA),
        ({"metadata": '["text/plain", "x"]'}, R.BAD_METADATA),
        ({"metadata": '[[1, "x"]]'}, R.BAD_METADATA),
        ({"metadata": '[["text/identifier", "a@b.c"]]'}, R.BAD_METADATA),
        ({"metadata": '[["text/plain"]]'}, R.BAD_METADATA),
        ({"metadata": '[["text/plain", 5]]'}, R.BAD_METADATA),
        ({"metadata": "\ud800"}, R.BAD_METADATA),
    ],
)
async def test_invalid_pay_request_is_refused_before_the_callback(
    srv: LnurlServer, change: dict, reason: LnurlReason
) -> None:
    srv.pay_request.update(change)
    await refused(reason, srv.address)
    assert srv.paths() == ["/.well-known/lnurlp/alice"]


@pytest.mark.parametrize("amount", [999, 1_000_000_001])
async def test_amount_outside_sendable_range_is_refused_before_the_callback(srv: LnurlServer, amount: int) -> None:
    await refused(R.AMOUNT_OUT_OF_RANGE, srv.address, amount)
    assert srv.paths() == ["/.well-known/lnurlp/alice"]


@pytest.mark.parametrize("amount", [1_000, 1_000_000_000])
async def test_amount_at_range_bounds_is_accepted(srv: LnurlServer, amount: int) -> None:
    assert (await fetch(srv.address, amount)).amount_msat == amount


def serve_invoice(srv: LnurlServer, answer: dict[str, Any] | Callable[[int], dict[str, Any]]) -> None:
    srv.routes["/cb"] = lambda q: js(answer(int(q["amount"])) if callable(answer) else answer)


@pytest.mark.parametrize(
    "answer, reason",
    [
        ({"routes": []}, R.BAD_INVOICE),
        ({"pr": 12345}, R.BAD_INVOICE),
        ({"pr": ""}, R.BAD_INVOICE),
        ({"pr": "lnbcrt1230n1garbage"}, R.BAD_INVOICE),
        ({"pr": "lnxy1230n1" + "q" * 200}, R.BAD_INVOICE),
        ({"pr": "lnbcrt1230n1pjqqqqq"}, R.BAD_INVOICE),
        ({"pr": "ｌｎbcrt"}, R.BAD_INVOICE),
        ({"pr": "lnbcrt1230n1" + "q" * 9000}, R.BAD_INVOICE),
    ],
)
async def test_missing_or_undecodable_invoice_is_bad_invoice(
    srv: LnurlServer, answer: dict, reason: LnurlReason
) -> None:
    serve_invoice(srv, answer)
    await refused(reason, srv.address)


async def test_tampered_invoice_signature_is_bad_invoice(srv: LnurlServer) -> None:
    pr, _ = make_invoice(AMOUNT)
    # Change one data character, recompute nothing: the checksum fails.
    i = pr.rfind("1") + 20
    serve_invoice(srv, {"pr": pr[:i] + ("q" if pr[i] != "q" else "p") + pr[i + 1 :]})
    await refused(R.BAD_INVOICE, srv.address)


@pytest.mark.parametrize("amount", [AMOUNT + 1, AMOUNT - 1, AMOUNT * 1000, None])
async def test_invoice_for_another_amount_is_refused(srv: LnurlServer, amount: int | None) -> None:
    serve_invoice(srv, lambda a: {"pr": make_invoice(amount)[0]})
    await refused(R.AMOUNT_MISMATCH, srv.address)


async def test_sub_millisatoshi_amount_that_the_decoder_rounds_is_refused(srv: LnurlServer) -> None:
    pr, _ = make_invoice(AMOUNT, hrp="lnbcrt1230001p")  # 123000.1 msat
    assert bolt11.decode(pr).amount_msat == AMOUNT  # the library alone would let it through
    serve_invoice(srv, {"pr": pr})
    await refused(R.BAD_INVOICE, srv.address)


@pytest.mark.parametrize(
    "hrp, ok",
    [
        ("lnbcrt1230n", True),
        ("lnbcrt1230000p", True),
        ("lnbcrt123n", False),
        ("lnbcrt12300n", False),
        ("lnbcrt123000p", False),
        ("lnbcrt123u", False),
    ],
)
async def test_amount_notations_are_compared_exactly(srv: LnurlServer, hrp: str, ok: bool) -> None:
    serve_invoice(srv, lambda a: {"pr": make_invoice(a, hrp=hrp)[0]})
    if ok:
        assert (await fetch(srv.address)).amount_msat == AMOUNT
    else:
        await refused(R.AMOUNT_MISMATCH, srv.address)


@pytest.mark.parametrize(
    "pr_kw",
    [
        {"description_hash": hashlib.sha256(b"something else").digest()},
        {"description_hash": hashlib.sha256(json.dumps(json.loads(META), separators=(",", ":")).encode()).digest()},
        {"description_hash": hashlib.sha256(META.encode("latin-1")).digest()},
        {"description": META},
    ],
)
async def test_invoice_not_committing_to_the_metadata_string_is_refused(srv: LnurlServer, pr_kw: dict) -> None:
    serve_invoice(srv, lambda a: {"pr": make_invoice(a, **pr_kw)[0]})
    await refused(R.DESCRIPTION_HASH_MISMATCH, srv.address)


@pytest.mark.parametrize("age, expiry", [(7200, 3600), (0, 5), (600, 605)])
async def test_expired_or_about_to_expire_invoice_is_refused(srv: LnurlServer, age: int, expiry: int) -> None:
    serve_invoice(srv, lambda a: {"pr": make_invoice(a, date=int(time.time()) - age, expiry=expiry)[0]})
    await refused(R.INVOICE_EXPIRED, srv.address)


async def test_old_invoice_still_well_within_expiry_is_accepted(srv: LnurlServer) -> None:
    serve_invoice(srv, lambda a: {"pr": make_invoice(a, date=int(time.time()) - 600, expiry=660)[0]})
    assert (await fetch(srv.address)).expires_at > time.time() + 50


async def test_invoice_for_another_network_is_refused_when_network_given(srv: LnurlServer) -> None:
    serve_invoice(srv, lambda a: {"pr": make_invoice(a, currency="bc")[0]})
    await refused(R.WRONG_NETWORK, srv.address, network="regtest")
    assert (await fetch(srv.address, network="mainnet")).bolt11.startswith("lnbc1230n")


async def test_success_action_message_is_exposed_sanitized(srv: LnurlServer) -> None:
    serve_invoice(
        srv,
        lambda a: {"pr": make_invoice(a)[0], "successAction": {"tag": "message", "message": "thanks\n" + "x" * 500}},
    )
    sa = (await fetch(srv.address)).success_action
    assert sa is not None and sa.tag == "message"
    assert sa.message.startswith("thanks?x") and len(sa.message) <= 145


async def test_success_action_url_is_exposed_but_never_fetched(srv: LnurlServer) -> None:
    srv.routes["/order"] = lambda q: js({})
    serve_invoice(
        srv,
        lambda a: {
            "pr": make_invoice(a)[0],
            "successAction": {"tag": "url", "description": "your order", "url": srv.url("/order?id=1")},
        },
    )
    sa = (await fetch(srv.address)).success_action
    assert sa is not None and sa.url == srv.url("/order?id=1") and sa.description == "your order"
    assert "/order" not in srv.paths()


async def test_success_action_aes_is_exposed(srv: LnurlServer) -> None:
    serve_invoice(
        srv,
        lambda a: {
            "pr": make_invoice(a)[0],
            "successAction": {"tag": "aes", "description": "code", "ciphertext": "c2VjcmV0", "iv": "A" * 24},
        },
    )
    sa = (await fetch(srv.address)).success_action
    assert sa is not None and sa.tag == "aes" and sa.ciphertext == "c2VjcmV0" and sa.iv == "A" * 24


@pytest.mark.parametrize(
    "action",
    [
        {"tag": "launch-missiles"},
        {"message": "no tag"},
        "a string",
        {"tag": "message"},
        {"tag": "url", "description": "x", "url": "javascript:alert(1)"},
        {"tag": "url", "description": "x"},
        {"tag": "aes", "description": "x", "ciphertext": "abc", "iv": "short"},
    ],
)
async def test_unsupported_or_malformed_success_action_refuses_the_payment(srv: LnurlServer, action: Any) -> None:
    serve_invoice(srv, lambda a: {"pr": make_invoice(a)[0], "successAction": action})
    await refused(R.BAD_SUCCESS_ACTION, srv.address)


@pytest.mark.parametrize(
    "kw",
    [
        {"amount": 0},
        {"amount": -5},
        {"amount": True},
        {"amount": 1.5},
        {"comment": 5},
        {"total_timeout": 0},
        {"max_response_bytes": 0},
        {"network": "moon"},
    ],
)
async def test_caller_mistakes_raise_value_error_without_network(kw: dict) -> None:
    net = Net({})
    amount = kw.pop("amount", AMOUNT)
    async with net.client() as c:
        with pytest.raises(ValueError):
            await fetch_invoice("alice@pay.example.com", amount, client=c, resolver=net.resolve, **kw)
    assert net.lookups == [] and net.sent == []


# ---- TLS with a pinned address ------------------------------------------------------


def _tls_material(tmp: Path, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext, list[str]]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp / "cert.pem").write_bytes(cert_pem)
    (tmp / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    sni_seen: list[str] = []
    server_ctx.sni_callback = lambda sock, server_name, ctx: sni_seen.append(server_name)
    client_ctx = ssl.create_default_context(cadata=cert_pem.decode())
    return server_ctx, client_ctx, sni_seen


@pytest.mark.parametrize("cert_name, ok", [("lnurl.test", True), ("other.test", False)])
async def test_tls_to_pinned_ip_verifies_the_host_name(tmp_path: Path, cert_name: str, ok: bool) -> None:
    server_ctx, client_ctx, sni_seen = _tls_material(tmp_path, cert_name)
    srv = LnurlServer(tls=server_ctx)
    srv.pay_request["callback"] = srv.url("/cb", host="lnurl.test")
    lookups: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        lookups.append(host)
        return ["127.0.0.1"]

    try:
        async with httpx.AsyncClient(verify=client_ctx, trust_env=False) as c:
            dest = f"alice@lnurl.test:{srv.port}"
            assert parse_destination(dest).url.startswith("https://lnurl.test:")
            if ok:
                got = await fetch(dest, client=c, resolver=resolver)
                assert got.amount_msat == AMOUNT
                assert [r.headers["host"] for r in srv.requests] == [f"lnurl.test:{srv.port}"] * 2
            else:
                err = await refused(R.CONNECTION_FAILED, dest, client=c, resolver=resolver)
                assert "lnurl.test" in err.message and srv.requests == []
        assert sni_seen and set(sni_seen) == {"lnurl.test"}
        assert lookups and set(lookups) == {"lnurl.test"}
    finally:
        srv.close()
