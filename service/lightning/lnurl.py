"""LNURL-pay client: fetch a fresh BOLT11 invoice for an exact amount from a payee's
lightning address or LNURL, before the escrow pays a reward.

Specifications followed:

* LUD-01 - ``lnurl1…`` is the bech32 encoding (no 90-character limit, upper or lower
  case but never mixed) of an HTTPS URL.
* LUD-06 - ``payRequest``: GET the URL, get ``callback``/``minSendable``/``maxSendable``/
  ``metadata``; GET ``callback?amount=<msat>``; check that the invoice's amount is the
  amount asked for and that its ``h`` tag is sha256 of the metadata string (UTF-8).
* LUD-16 - ``name@domain`` means ``https://domain/.well-known/lnurlp/name``.
* LUD-12 - an optional ``comment`` is sent only if ``commentAllowed`` permits its length.
* LUD-09 - ``successAction`` is returned to the caller (``message``/``url``/``aes``;
  another tag refuses the payment, as LUD-09 requires); its URL is never fetched.

Choices:

* Lightning-address usernames and domains are lowercased (LUD-16 allows lowercase only).
* ``.onion`` domains are refused: this client does not route through Tor.
* A lightning address whose domain is loopback (``localhost``, ``127.0.0.0/8``, ``::1``)
  maps to ``http://`` instead of ``https://``, for local development servers. Loopback is
  a blocked address and plain ``http`` is refused unless ``allow_private=True``, so this
  never applies in production.

Server-side request forgery (the endpoint and callback URLs are chosen by a remote party):

* The host is resolved here (``resolver``, by default :func:`resolve_host`), and the
  request is refused with ``blocked_address`` if ANY address is not public
  (:func:`is_blocked_address`), unless ``allow_private=True``.
* The request then goes to the validated IP itself (the URL names the IP; the ``Host``
  header and the TLS SNI / certificate check use the host name), so a DNS answer that
  changes between check and connect (DNS rebinding) cannot redirect it.
* Redirects are never followed (a 3xx is ``redirect_refused``); only ``https`` unless
  ``allow_private``; the body is read raw (``Accept-Encoding: identity``) and abandoned
  beyond ``max_response_bytes``; the whole call has one deadline; no cookies, proxies or
  credentials are used; every connection is closed after its single response.

Every failure is an :class:`LnurlError` with a :class:`LnurlReason`. Messages name at most
the host, never a full URL (a query string may carry a secret), and remote text in them is
sanitized and truncated. Caller mistakes (a non-positive amount, say) raise ``ValueError``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import re
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qsl, quote, unquote_plus, urlsplit

import bech32
import httpx

from service.bitcoin import BOLT11_HRP, BOLT11_PREFIX_RE, MAX_MSAT, NETWORK_OF_HRP, looks_like_bolt11
from service.lightning.blinded import decode_invoice

USER_AGENT = "fedstr-escrow-lnurl/1"
MAX_DESTINATION_CHARS = 2048
MAX_URL_CHARS = 2048
MAX_REMOTE_TEXT_CHARS = 200
MAX_SUCCESS_TEXT_CHARS = 144  # LUD-09
MAX_INVOICE_CHARS = 8192  # real invoices are far shorter; bounds the (synchronous) decoding work
MIN_INVOICE_TTL_SECONDS = 10  # an invoice expiring sooner than this counts as expired
MAX_ADDRESSES_TRIED = 4

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


class LnurlReason(StrEnum):
    INVALID_DESTINATION = "invalid_destination"  # not a lightning address / LNURL we accept
    BLOCKED_ADDRESS = "blocked_address"  # host is (or resolves to) a non-public address
    INSECURE_SCHEME = "insecure_scheme"  # http:// without allow_private
    DNS_FAILURE = "dns_failure"
    CONNECTION_FAILED = "connection_failed"  # TCP or TLS (certificate) failure
    TIMEOUT = "timeout"
    REDIRECT_REFUSED = "redirect_refused"
    HTTP_ERROR = "http_error"  # non-2xx status, protocol error, compressed body
    TOO_LARGE = "too_large"
    BAD_JSON = "bad_json"  # not JSON content, not parseable, not an object
    REMOTE_ERROR = "remote_error"  # {"status": "ERROR", "reason": ...}
    NOT_PAY_REQUEST = "not_pay_request"
    BAD_PAY_REQUEST = "bad_pay_request"  # callback / minSendable / maxSendable invalid
    BAD_METADATA = "bad_metadata"
    AMOUNT_OUT_OF_RANGE = "amount_out_of_range"
    COMMENT_TOO_LONG = "comment_too_long"
    BAD_INVOICE = "bad_invoice"  # no or undecodable invoice, bad signature, sub-msat amount
    WRONG_NETWORK = "wrong_network"
    AMOUNT_MISMATCH = "amount_mismatch"
    DESCRIPTION_HASH_MISMATCH = "description_hash_mismatch"
    INVOICE_EXPIRED = "invoice_expired"
    BAD_SUCCESS_ACTION = "bad_success_action"


class LnurlError(Exception):
    def __init__(self, reason: LnurlReason, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(f"{reason.value}: {message}")


@dataclass(frozen=True, slots=True)
class LnurlTarget:
    """Where to GET the LNURL-pay parameters; ``lightning_address`` is set for LUD-16."""

    url: str
    lightning_address: str | None = None

    @property
    def host(self) -> str:
        return _parse_url(self.url).host


@dataclass(frozen=True, slots=True)
class SuccessAction:
    """LUD-09/LUD-10 ``successAction``, for display only: its URL is never fetched."""

    tag: str  # "message" | "url" | "aes"
    message: str | None = None
    description: str | None = None
    url: str | None = None
    ciphertext: str | None = None
    iv: str | None = None


@dataclass(frozen=True, slots=True)
class FetchedInvoice:
    bolt11: str
    payment_hash: bytes
    amount_msat: int
    description_hash: bytes
    metadata: str  # the raw metadata string the description hash commits to
    callback: str
    description: str  # the metadata's text/plain entry
    expires_at: int  # unix time
    payee_pubkey: str
    success_action: SuccessAction | None = None


def _fail(reason: LnurlReason, message: str) -> LnurlError:
    return LnurlError(reason, message)


def _clip(value: object, limit: int = MAX_REMOTE_TEXT_CHARS) -> str:
    """Remote text made safe for a message or log: printable, one line, bounded."""
    text = str(value)[: limit + 1]
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= limit else text[:limit] + "…"


# ---- destinations and URLs -------------------------------------------------

_NAME_RE = re.compile(r"[a-z0-9._+-]{1,64}")  # LUD-16 username, with an optional +tag
_LABEL_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_NUMERIC_LABEL_RE = re.compile(r"0x[0-9a-f]*|[0-9]+")
_PORT_RE = re.compile(r"[0-9]{1,5}")


def _check_host(host: str) -> str:
    """A lowercase host name or IP literal (without brackets), canonical; ValueError if bad."""
    if not host:
        raise ValueError("empty host")
    if "%" in host:
        raise ValueError("IPv6 zone identifiers are not allowed")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host.isascii():
        raise ValueError("internationalized domain names must be given in punycode (xn--…)")
    if host.endswith(".onion"):
        raise ValueError("onion services need Tor, which this client does not use")
    if len(host) > 253:
        raise ValueError("host name is too long")
    labels = host.split(".")
    if len(labels) < 2 and host != "localhost":
        raise ValueError("host name must be a fully qualified domain name")
    if not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise ValueError("host name has an empty label or characters outside a-z 0-9 - _")
    if _NUMERIC_LABEL_RE.fullmatch(labels[-1]):
        raise ValueError("host looks like a malformed IP address")
    return host


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class _Url:
    scheme: str
    host: str
    port: int
    path: str
    query: str

    @property
    def ip(self) -> IPAddress | None:
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    def netloc(self) -> str:
        h = self.host
        if ":" in h:
            h = f"[{h}]"
        default = 443 if self.scheme == "https" else 80
        return h if self.port == default else f"{h}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.netloc()}{self.path}" + (f"?{self.query}" if self.query else "")


def _parse_url(text: object) -> _Url:
    """An absolute http(s) URL without credentials; ValueError (with a safe message) if not."""
    if not isinstance(text, str):
        raise ValueError("URL is not a string")
    if len(text) > MAX_URL_CHARS:
        raise ValueError("URL is too long")
    if any(not 33 <= ord(ch) <= 126 for ch in text) or "\\" in text:
        raise ValueError("URL contains spaces, control, non-ASCII characters or backslashes")
    try:
        parts = urlsplit(text)
        hostname, port = parts.hostname, parts.port
    except ValueError:
        raise ValueError("URL has a malformed host or port") from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise ValueError("URL scheme must be https")
    if "@" in parts.netloc:
        raise ValueError("URL must not contain credentials")
    if not hostname:
        raise ValueError("URL has no host")
    host = _check_host(hostname)
    if port is None:
        port = 443 if scheme == "https" else 80
    if port == 0:
        raise ValueError("URL port 0 is invalid")
    path = parts.path or "/"
    if not path.startswith("/"):
        raise ValueError("URL path is not absolute")
    return _Url(scheme, host, port, path, parts.query)


def _invalid(message: str) -> LnurlError:
    return _fail(LnurlReason.INVALID_DESTINATION, message)


def _split_host_port(domain: str) -> tuple[str, int | None]:
    if domain.startswith("["):
        end = domain.find("]")
        if end < 0:
            raise ValueError("unclosed [ in domain")
        host, rest = domain[1:end], domain[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("brackets may only enclose an IPv6 address") from None
    else:
        host, sep, port = domain.partition(":")
        rest = sep + port
    if not rest:
        return host, None
    if not rest.startswith(":") or not _PORT_RE.fullmatch(rest[1:]) or not 0 < int(rest[1:]) < 65536:
        raise ValueError("port must be a number from 1 to 65535")
    return host, int(rest[1:])


def _parse_address(text: str) -> LnurlTarget:
    name, _, domain = text.rpartition("@")
    if not name:
        raise _invalid("lightning address has no username before @")
    if "@" in name:
        raise _invalid("lightning address has more than one @")
    if not domain:
        raise _invalid("lightning address has no domain after @")
    name, domain = name.lower(), domain.lower()
    if not _NAME_RE.fullmatch(name):
        raise _invalid("lightning address username may only contain a-z 0-9 - _ . + (at most 64)")
    if set(name) == {"."}:
        raise _invalid("lightning address username cannot be only dots")
    try:
        host, port = _split_host_port(domain)
        host = _check_host(host)
    except ValueError as e:
        raise _invalid(f"lightning address domain: {e}") from None
    scheme = "http" if _is_loopback_host(host) else "https"
    url = _Url(scheme, host, port or (443 if scheme == "https" else 80), f"/.well-known/lnurlp/{name}", "")
    return LnurlTarget(url=str(url), lightning_address=f"{name}@{domain}")


def _parse_bech32(text: str) -> LnurlTarget:
    if text != text.lower() and text != text.upper():
        raise _invalid("LNURL mixes upper and lower case, which bech32 forbids")
    hrp, data = bech32.bech32_decode(text)
    if hrp is None or data is None:
        raise _invalid("LNURL is not valid bech32 (bad characters or checksum)")
    if hrp != "lnurl":
        raise _invalid("LNURL has an unexpected bech32 prefix")
    raw = bech32.convertbits(data, 5, 8, False)
    if raw is None:
        raise _invalid("LNURL has invalid bech32 padding")
    try:
        url_text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid("LNURL does not encode UTF-8 text") from None
    try:
        url = _parse_url(url_text)
    except ValueError as e:
        raise _invalid(f"LNURL does not encode a valid URL: {e}") from None
    return LnurlTarget(url=str(url))


def parse_destination(text: str) -> LnurlTarget:
    """Parse ``name@domain`` (LUD-16) or ``lnurl1…`` (LUD-01), optionally ``lightning:``-prefixed."""
    if not isinstance(text, str):
        raise _invalid("destination must be a string")
    s = text.strip()
    if len(s) > MAX_DESTINATION_CHARS:
        raise _invalid("destination is too long")
    if s[:10].lower() == "lightning:":
        s = s[10:]
        if s.startswith("//"):
            s = s[2:]
    if not s:
        raise _invalid("destination is empty")
    if any(ch.isspace() for ch in s):
        raise _invalid("destination contains whitespace")
    if "@" in s:
        return _parse_address(s)
    low = s.lower()
    if low.startswith("lnurl1"):
        return _parse_bech32(s)
    if looks_like_bolt11(low):
        raise _invalid("this is a BOLT11 invoice, not a lightning address or LNURL")
    raise _invalid("expected a lightning address (name@domain) or an lnurl1… string")


# ---- address policy and resolution -----------------------------------------

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_blocked_address(ip: IPAddress) -> bool:
    """True unless ``ip`` is a public unicast address (IPv4 embedded in IPv6 is checked as IPv4)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_blocked_address(ip.ipv4_mapped)
        if ip in _NAT64:
            return is_blocked_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None and is_blocked_address(ip.sixtofour):
            return True
        if ip.teredo is not None or ip.is_site_local:
            return True
    return (
        not ip.is_global
        or ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


async def resolve_host(host: str, port: int) -> list[str]:
    """The host's addresses, via the system resolver (in a thread)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    out: list[str] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        addr = str(sockaddr[0])
        if family in (socket.AF_INET, socket.AF_INET6) and addr not in out:
            out.append(addr)
    return out


async def _checked_addresses(url: _Url, allow_private: bool, resolver: Resolver) -> list[IPAddress]:
    literal = url.ip
    if literal is not None:
        addrs: list[IPAddress] = [literal]
    else:
        try:
            raw = await resolver(url.host, url.port)
        except (OSError, UnicodeError) as e:
            raise _fail(LnurlReason.DNS_FAILURE, f"cannot resolve {url.host}: {_clip(e, 100)}") from None
        addrs = []
        for a in raw:
            try:
                ip = ipaddress.ip_address(str(a).split("%", 1)[0])
            except ValueError:
                raise _fail(LnurlReason.DNS_FAILURE, f"resolver returned a non-address for {url.host}") from None
            if ip not in addrs:
                addrs.append(ip)
        if not addrs:
            raise _fail(LnurlReason.DNS_FAILURE, f"{url.host} has no addresses")
    if not allow_private:
        for ip in addrs:
            if is_blocked_address(ip):
                what = url.host if literal is not None else f"{url.host} resolves to {ip}, which"
                raise _fail(LnurlReason.BLOCKED_ADDRESS, f"{what} is not a public address")
    if url.scheme != "https" and not allow_private:
        raise _fail(LnurlReason.INSECURE_SCHEME, f"plain http to {url.host} is refused; https is required")
    return addrs


# ---- HTTP -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Limits:
    allow_private: bool
    resolver: Resolver
    connect_timeout: float
    total_timeout: float
    max_bytes: int


def _pinned_request(url: _Url, ip: IPAddress, limits: _Limits) -> httpx.Request:
    target = _Url(url.scheme, str(ip), url.port, url.path, url.query)
    ext: dict[str, Any] = {
        "timeout": {
            "connect": limits.connect_timeout,
            "read": limits.total_timeout,
            "write": limits.total_timeout,
            "pool": limits.connect_timeout,
        }
    }
    if url.scheme == "https" and url.ip is None:
        ext["sni_hostname"] = url.host  # TLS SNI and certificate name check use the host name
    headers = {
        "Host": url.netloc(),
        "User-Agent": USER_AGENT,
        "Accept": "application/json",
        "Accept-Encoding": "identity",
        "Connection": "close",
    }
    return httpx.Request("GET", str(target), headers=headers, extensions=ext)


def _json_content_type(value: str | None) -> bool:
    """LUD-01 says clients should not rely on headers, so accept anything text- or JSON-like."""
    if not value:
        return True
    mime = value.split(";", 1)[0].strip().lower()
    return mime.startswith("text/") or mime.endswith("/json") or mime.endswith("+json")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _remote_error(data: object) -> str | None:
    if isinstance(data, dict) and isinstance(data.get("status"), str) and data["status"].upper() == "ERROR":
        return _clip(data.get("reason", "(no reason given)"))
    return None


async def _read_json(resp: httpx.Response, url: _Url, limits: _Limits) -> dict[str, Any]:
    status = resp.status_code
    if 300 <= status < 400:
        raise _fail(LnurlReason.REDIRECT_REFUSED, f"{url.host} answered HTTP {status}; redirects are not followed")
    declared = resp.headers.get("content-length", "")
    if declared.strip().isdigit() and int(declared) > limits.max_bytes:
        raise _fail(LnurlReason.TOO_LARGE, f"{url.host} announced {int(declared)} bytes (limit {limits.max_bytes})")
    if resp.headers.get("content-encoding", "identity").strip().lower() not in ("", "identity"):
        raise _fail(LnurlReason.HTTP_ERROR, f"{url.host} sent a compressed body, which is refused")
    body = bytearray()
    try:
        body += resp.content  # only when a (mock) transport handed over a body already read
    except httpx.ResponseNotRead:
        async for chunk in resp.aiter_raw():
            body += chunk
            if len(body) > limits.max_bytes:
                break
    if len(body) > limits.max_bytes:
        raise _fail(LnurlReason.TOO_LARGE, f"{url.host} sent more than {limits.max_bytes} bytes")
    data: object
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        data = None
        parsed = False
    else:
        parsed = True
    if not 200 <= status < 300:
        reason = _remote_error(data)
        if reason is not None:
            raise _fail(LnurlReason.REMOTE_ERROR, f"{url.host}: {reason}")
        raise _fail(LnurlReason.HTTP_ERROR, f"{url.host} answered HTTP {status}")
    if not _json_content_type(resp.headers.get("content-type")):
        raise _fail(
            LnurlReason.BAD_JSON,
            f"{url.host} answered with content type {_clip(resp.headers.get('content-type'), 60)}, not JSON",
        )
    if not parsed:
        raise _fail(LnurlReason.BAD_JSON, f"{url.host} did not answer with valid JSON")
    if not isinstance(data, dict):
        raise _fail(LnurlReason.BAD_JSON, f"{url.host} answered JSON that is not an object")
    reason = _remote_error(data)
    if reason is not None:
        raise _fail(LnurlReason.REMOTE_ERROR, f"{url.host}: {reason}")
    return data


async def _get_json(client: httpx.AsyncClient, url: _Url, limits: _Limits) -> dict[str, Any]:
    addrs = await _checked_addresses(url, limits.allow_private, limits.resolver)
    failure = "no address tried"
    for ip in addrs[:MAX_ADDRESSES_TRIED]:
        try:
            resp = await client.send(_pinned_request(url, ip, limits), stream=True, auth=None, follow_redirects=False)
        except httpx.ConnectError as e:  # includes TLS handshake and certificate failures
            failure = _clip(e, 160)
            continue
        except httpx.TimeoutException:
            raise _fail(LnurlReason.TIMEOUT, f"{url.host} did not answer in time") from None
        except httpx.HTTPError as e:
            raise _fail(LnurlReason.HTTP_ERROR, f"request to {url.host} failed: {type(e).__name__}") from None
        try:
            return await _read_json(resp, url, limits)
        except httpx.TimeoutException:
            raise _fail(LnurlReason.TIMEOUT, f"{url.host} did not answer in time") from None
        except httpx.HTTPError as e:
            raise _fail(LnurlReason.HTTP_ERROR, f"reading from {url.host} failed: {type(e).__name__}") from None
        finally:
            await resp.aclose()
    raise _fail(LnurlReason.CONNECTION_FAILED, f"cannot connect to {url.host}: {failure}")


# ---- LNURL-pay validation ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class _PayParams:
    callback: _Url
    min_msat: int
    max_msat: int
    metadata: str
    description: str
    comment_allowed: int


def _msat_field(data: dict[str, Any], key: str) -> int:
    value = data.get(key)
    if type(value) is not int or not 1 <= value <= MAX_MSAT:
        raise _fail(
            LnurlReason.BAD_PAY_REQUEST, f"{key} must be an integer number of millisatoshis from 1 to {MAX_MSAT}"
        )
    return value


def _parse_metadata(value: object) -> str:
    """Check LUD-06 metadata; return its text/plain description."""
    if not isinstance(value, str):
        raise _fail(LnurlReason.BAD_METADATA, "metadata must be a JSON string")
    try:
        value.encode("utf-8")
        entries = json.loads(value, parse_constant=_reject_constant)
    except (UnicodeEncodeError, ValueError, RecursionError):
        raise _fail(LnurlReason.BAD_METADATA, "metadata is not valid JSON text") from None
    if not isinstance(entries, list) or not entries:
        raise _fail(LnurlReason.BAD_METADATA, "metadata must be a non-empty JSON array")
    if not all(isinstance(e, list) and e and isinstance(e[0], str) for e in entries):
        raise _fail(LnurlReason.BAD_METADATA, "metadata entries must be arrays starting with a type string")
    plain = [e for e in entries if e[0] == "text/plain"]
    if not plain:
        raise _fail(LnurlReason.BAD_METADATA, "metadata has no text/plain entry")
    if len(plain[0]) < 2 or not isinstance(plain[0][1], str):
        raise _fail(LnurlReason.BAD_METADATA, "metadata text/plain entry has no text")
    return plain[0][1]


def _parse_pay_request(data: dict[str, Any], host: str) -> _PayParams:
    tag = data.get("tag")
    if tag != "payRequest":
        raise _fail(LnurlReason.NOT_PAY_REQUEST, f"{host} answered tag {_clip(tag, 40)!s}, not payRequest")
    try:
        callback = _parse_url(data.get("callback"))
    except ValueError as e:
        raise _fail(LnurlReason.BAD_PAY_REQUEST, f"callback: {e}") from None
    min_msat, max_msat = _msat_field(data, "minSendable"), _msat_field(data, "maxSendable")
    if min_msat > max_msat:
        raise _fail(LnurlReason.BAD_PAY_REQUEST, "minSendable is larger than maxSendable")
    description = _parse_metadata(data.get("metadata"))
    allowed = data.get("commentAllowed")
    comment_allowed = allowed if type(allowed) is int and allowed > 0 else 0
    return _PayParams(callback, min_msat, max_msat, data["metadata"], description, comment_allowed)


def _callback_url(callback: _Url, amount_msat: int, comment: str | None) -> _Url:
    """``callback`` with ``amount`` (and ``comment``) set; its other query parameters kept verbatim."""
    kept = [p for p in callback.query.split("&") if p and unquote_plus(p.split("=", 1)[0]) not in ("amount", "comment")]
    kept.append(f"amount={amount_msat}")
    if comment:
        kept.append("comment=" + quote(comment, safe=""))
    return _Url(callback.scheme, callback.host, callback.port, callback.path, "&".join(kept))


def _success_text(sa: dict[str, Any], key: str) -> str:
    value = sa.get(key)
    if not isinstance(value, str):
        raise _fail(LnurlReason.BAD_SUCCESS_ACTION, f"successAction {key} is missing")
    return _clip(value, MAX_SUCCESS_TEXT_CHARS)


def _parse_success_action(sa: object) -> SuccessAction | None:
    if sa is None:
        return None
    if not isinstance(sa, dict) or not isinstance(sa.get("tag"), str):
        raise _fail(LnurlReason.BAD_SUCCESS_ACTION, "successAction is not an object with a tag")
    tag = sa["tag"]
    if tag == "message":
        return SuccessAction(tag, message=_success_text(sa, "message"))
    if tag == "url":
        try:
            url = str(_parse_url(sa.get("url")))
        except ValueError as e:
            raise _fail(LnurlReason.BAD_SUCCESS_ACTION, f"successAction url: {e}") from None
        return SuccessAction(tag, description=_success_text(sa, "description"), url=url)
    if tag == "aes":
        ciphertext, iv = sa.get("ciphertext"), sa.get("iv")
        if not (
            isinstance(ciphertext, str)
            and 0 < len(ciphertext) <= 8192
            and ciphertext.isascii()
            and isinstance(iv, str)
            and len(iv) == 24
            and iv.isascii()
        ):
            raise _fail(LnurlReason.BAD_SUCCESS_ACTION, "successAction aes needs base64 ciphertext and iv")
        return SuccessAction(tag, description=_success_text(sa, "description"), ciphertext=ciphertext, iv=iv)
    raise _fail(LnurlReason.BAD_SUCCESS_ACTION, f"unsupported successAction tag {_clip(tag, 20)}")


_MULTIPLIER_DIGITS = {"": 0, "m": 3, "u": 6, "n": 9, "p": 12}


def _hrp_amount(pr: str) -> tuple[str, int | None]:
    """Network and exact amount from the invoice's human-readable part (BOLT 11)."""
    m = BOLT11_PREFIX_RE.fullmatch(pr[: pr.rfind("1")].lower())
    if m is None:
        raise _fail(LnurlReason.BAD_INVOICE, "invoice has an unrecognised prefix")
    hrp, digits, multiplier = m.groups()
    if digits is None:
        return NETWORK_OF_HRP[hrp], None
    numerator, denominator = int(digits) * 100_000_000_000, 10 ** _MULTIPLIER_DIGITS[multiplier]
    if numerator % denominator:
        raise _fail(LnurlReason.BAD_INVOICE, "invoice amount is not a whole number of millisatoshis")
    return NETWORK_OF_HRP[hrp], numerator // denominator


@dataclass(frozen=True, slots=True)
class _CheckedInvoice:
    bolt11: str
    payment_hash: bytes
    description_hash: bytes
    expires_at: int
    payee_pubkey: str


def _check_invoice(pr: object, amount_msat: int, metadata: str, network: str | None) -> _CheckedInvoice:
    if not isinstance(pr, str) or not pr:
        raise _fail(LnurlReason.BAD_INVOICE, "callback answer has no pr (invoice)")
    if len(pr) > MAX_INVOICE_CHARS:
        raise _fail(LnurlReason.BAD_INVOICE, f"invoice is longer than {MAX_INVOICE_CHARS} characters")
    if not pr.isascii() or not pr.lower().startswith("ln"):
        raise _fail(LnurlReason.BAD_INVOICE, "pr is not a BOLT11 invoice")
    invoice_network, hrp_msat = _hrp_amount(pr)
    try:
        inv, _ = decode_invoice(pr)  # a blinded invoice too (it has no payment secret)
    except Exception as e:  # noqa: BLE001 - the decoder raises many types on hostile input
        raise _fail(LnurlReason.BAD_INVOICE, f"invoice does not decode: {_clip(type(e).__name__, 60)}") from None
    if network is not None and invoice_network != network:
        raise _fail(LnurlReason.WRONG_NETWORK, f"invoice is for {invoice_network}, not {network}")
    if hrp_msat is None or inv.amount_msat is None:
        raise _fail(LnurlReason.AMOUNT_MISMATCH, "invoice has no amount")
    if hrp_msat != amount_msat or int(inv.amount_msat) != amount_msat:
        raise _fail(LnurlReason.AMOUNT_MISMATCH, f"invoice is for {hrp_msat} msat, not {amount_msat} msat")
    want = hashlib.sha256(metadata.encode("utf-8")).digest()
    got = bytes.fromhex(inv.description_hash) if inv.description_hash else b""
    if not hmac.compare_digest(got, want):
        raise _fail(
            LnurlReason.DESCRIPTION_HASH_MISMATCH,
            "invoice description hash is not sha256 of the metadata" if got else "invoice has no description hash",
        )
    if inv.date + inv.expiry <= time.time() + MIN_INVOICE_TTL_SECONDS:
        raise _fail(LnurlReason.INVOICE_EXPIRED, "invoice is expired or about to expire")
    payment_hash = bytes.fromhex(inv.payment_hash)
    if len(payment_hash) != 32:
        raise _fail(LnurlReason.BAD_INVOICE, "invoice payment hash is not 32 bytes")
    return _CheckedInvoice(pr, payment_hash, got, int(inv.date + inv.expiry), str(inv.payee or ""))


# ---- entry point ------------------------------------------------------------


async def fetch_invoice(
    target: LnurlTarget | str,
    amount_msat: int,
    *,
    client: httpx.AsyncClient | None = None,
    allow_private: bool = False,
    connect_timeout: float = 2.0,
    total_timeout: float = 5.0,
    max_response_bytes: int = 64 * 1024,
    comment: str | None = None,
    network: str | None = None,
    resolver: Resolver | None = None,
) -> FetchedInvoice:
    """Fetch a fresh invoice for exactly ``amount_msat`` from an LNURL-pay service.

    ``total_timeout`` bounds the whole call (both requests, DNS included). ``network``
    (``mainnet``/``testnet``/``signet``/``regtest``), if given, must match the invoice.
    ``resolver(host, port)`` returns address strings; the default is :func:`resolve_host`.
    A ``client`` of the caller's must not use proxies or follow redirects on its own
    (``trust_env=False``); requests are built here, so its cookies and auth are not sent.
    ``allow_private`` (tests and development only) permits non-public addresses and http.
    """
    if type(amount_msat) is not int or not 0 < amount_msat <= MAX_MSAT:
        raise ValueError("amount_msat must be a positive integer")
    if comment is not None and not isinstance(comment, str):
        raise ValueError("comment must be a string")
    if not (connect_timeout > 0 and total_timeout > 0 and max_response_bytes > 0):
        raise ValueError("timeouts and max_response_bytes must be positive")
    if network is not None and network not in BOLT11_HRP:
        raise ValueError(f"unknown network {network!r}")
    if isinstance(target, str):
        target = parse_destination(target)
    try:
        url = _parse_url(target.url)
    except ValueError as e:
        raise _invalid(f"target URL: {e}") from None
    tag = dict(parse_qsl(url.query)).get("tag")
    if tag is not None and tag != "payRequest":
        raise _fail(LnurlReason.NOT_PAY_REQUEST, f"LNURL is tagged {_clip(tag, 40)}, not payRequest")
    limits = _Limits(allow_private, resolver or _default_resolver, connect_timeout, total_timeout, max_response_bytes)
    own = client is None
    http = client or httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(total_timeout, connect=connect_timeout),
        limits=httpx.Limits(max_keepalive_connections=0),
    )
    try:
        async with asyncio.timeout(total_timeout):
            return await _fetch(http, url, amount_msat, comment or None, network, limits)
    except TimeoutError:
        raise _fail(LnurlReason.TIMEOUT, f"no invoice within {total_timeout} s") from None
    finally:
        if own:
            await http.aclose()


async def _default_resolver(host: str, port: int) -> Sequence[str]:
    return await resolve_host(host, port)  # looked up at call time, so tests may patch it


async def _fetch(
    client: httpx.AsyncClient, url: _Url, amount_msat: int, comment: str | None, network: str | None, limits: _Limits
) -> FetchedInvoice:
    params = _parse_pay_request(await _get_json(client, url, limits), url.host)
    if not params.min_msat <= amount_msat <= params.max_msat:
        raise _fail(
            LnurlReason.AMOUNT_OUT_OF_RANGE, f"{amount_msat} msat is outside {params.min_msat}..{params.max_msat} msat"
        )
    if comment is not None and len(comment) > params.comment_allowed:
        raise _fail(
            LnurlReason.COMMENT_TOO_LONG,
            f"comment has {len(comment)} characters; the service accepts {params.comment_allowed}",
        )
    answer = await _get_json(client, _callback_url(params.callback, amount_msat, comment), limits)
    success_action = _parse_success_action(answer.get("successAction"))
    inv = _check_invoice(answer.get("pr"), amount_msat, params.metadata, network)
    return FetchedInvoice(
        bolt11=inv.bolt11,
        payment_hash=inv.payment_hash,
        amount_msat=amount_msat,
        description_hash=inv.description_hash,
        metadata=params.metadata,
        callback=str(params.callback),
        description=_clip(params.description, 1000),
        expires_at=inv.expires_at,
        payee_pubkey=inv.payee_pubkey,
        success_action=success_action,
    )
