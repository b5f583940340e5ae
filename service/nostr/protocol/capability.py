"""Provider capabilities (kind 31990, NIP-89, by a provider): protocol.md §1a.

``["d", "fedstr-provider"]``, ``["k", "5701"]``, ``["t", "fedstr-provider"]`` (the topic a relay
filter ``{"kinds": [31990], "#t": ["fedstr-provider"]}`` finds them by, and what tells them from
an escrow's announcement, §1); content = a JSON object (keys sorted, compact): ``name``,
``tasks`` (``[{"task": <name>, "code_sha256": <hex>}, …]``: the training tasks it runs and the
SHA-256 of the code it runs for each), ``hardware`` (short text such as ``cpu:2``),
``max_model_bytes``, ``price_msat_per_shard`` (the least reward per shard it takes) and,
optionally, ``escrows`` (the escrow keys it works with; absent = any). Unknown keys are ignored;
missing, mistyped or out-of-bounds ones are ``invalid_capabilities``. The same ``d`` makes it
replaceable: a provider republishes it at start and relays keep the newest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from service.bitcoin import MAX_MSAT
from service.nostr.nip01 import Event

from .errors import CodecError, CodecErrorReason
from .fields import (
    Template,
    arity,
    check_text,
    expect_kind,
    is_hex64,
    named,
    parse_uint,
    placeholder_event,
    single,
    template,
)
from .terms import KIND_ANNOUNCEMENT, KIND_JOB_REQUEST

R = CodecErrorReason

#: The ``d`` identifier and the ``t`` topic of every provider capability event.
CAPABILITY_D = "fedstr-provider"
CAPABILITY_TOPIC = "fedstr-provider"
MAX_TASKS = 32
MAX_ESCROWS = 64
MAX_TASK_NAME = 64
MAX_HARDWARE = 64
MAX_NAME = 128
#: The largest ``max_model_bytes`` (a signed 64-bit integer, like every stored size).
MAX_MODEL_BYTES = 2**63 - 1


@dataclass(frozen=True, slots=True)
class TaskOffer:
    """One task a provider runs, and the SHA-256 of the code it runs for it."""

    task: str
    code_sha256: str


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a provider announces it can do (§1a)."""

    name: str
    tasks: tuple[TaskOffer, ...]
    hardware: str
    max_model_bytes: int
    price_msat_per_shard: int
    escrows: tuple[str, ...] | None = None  # None: works with any escrow
    job_kind: int = KIND_JOB_REQUEST

    def offer(self, task: str) -> TaskOffer | None:
        """The provider's offer for ``task``, if it runs it."""
        return next((t for t in self.tasks if t.task == task), None)

    def works_with(self, escrow: str) -> bool:
        return self.escrows is None or escrow in self.escrows


def is_capability_event(event: Event) -> bool:
    """Whether a kind-31990 event is marked as a provider's capabilities (its ``d`` or ``t``), so
    that the escrow-announcement parser can refuse it by name."""
    return any(tag[:2] in (("d", CAPABILITY_D), ("t", CAPABILITY_TOPIC)) for tag in event.tags)


def _bad(message: str) -> CodecError:
    return CodecError(R.INVALID_CAPABILITIES, message)


def _int(body: dict[str, Any], name: str, low: int, high: int) -> int:
    value = body.get(name)
    if type(value) is not int or not low <= value <= high:
        raise _bad(f"{name} must be an integer in {low}..{high}")
    return value


def _read_tasks(raw: object) -> tuple[TaskOffer, ...]:
    if type(raw) is not list or not 1 <= len(raw) <= MAX_TASKS:
        raise _bad(f"tasks must be a list of 1..{MAX_TASKS} objects")
    tasks: list[TaskOffer] = []
    for item in raw:
        if type(item) is not dict or not is_hex64(item.get("code_sha256")):
            raise _bad("each task is {task: text, code_sha256: 64 lowercase hex}")
        name = check_text(item.get("task"), R.INVALID_CAPABILITIES, "task", MAX_TASK_NAME)
        if any(t.task == name for t in tasks):
            raise _bad("a task is listed twice")
        tasks.append(TaskOffer(name, item["code_sha256"]))
    return tuple(tasks)


def _read_escrows(body: dict[str, Any]) -> tuple[str, ...] | None:
    if "escrows" not in body:
        return None
    raw = body["escrows"]
    # an empty list would say "no escrow": refused, so that absent is the one way to say "any"
    if type(raw) is not list or not 1 <= len(raw) <= MAX_ESCROWS or not all(is_hex64(pk) for pk in raw):
        raise _bad(f"escrows must be a list of 1..{MAX_ESCROWS} pubkeys (64 lowercase hex)")
    if len(set(raw)) != len(raw):
        raise _bad("an escrow is listed twice")
    return tuple(raw)


def parse_capabilities(event: Event) -> Capabilities:
    expect_kind(event, KIND_ANNOUNCEMENT)
    d = single(event.tags, "d", R.INVALID_CAPABILITIES)
    k = single(event.tags, "k", R.INVALID_CAPABILITIES)
    assert d is not None and k is not None
    arity(d, 2, 2, R.INVALID_CAPABILITIES)
    arity(k, 2, 2, R.INVALID_CAPABILITIES)
    if d[1] != CAPABILITY_D:
        raise _bad(f"the 'd' identifier must be {CAPABILITY_D!r} (an escrow's announcement is not a provider's)")
    if not any(tag[1:] == (CAPABILITY_TOPIC,) for tag in named(event.tags, "t")):
        raise _bad(f"no ['t', {CAPABILITY_TOPIC!r}] tag")
    job_kind = parse_uint(k[1], R.INVALID_CAPABILITIES, "k", 65535)
    try:
        body = json.loads(event.content)
    except (ValueError, RecursionError):
        raise _bad("content is not JSON") from None
    if not isinstance(body, dict):
        raise _bad("content must be a JSON object")
    return Capabilities(
        name=check_text(body.get("name"), R.INVALID_CAPABILITIES, "name", MAX_NAME),
        tasks=_read_tasks(body.get("tasks")),
        hardware=check_text(body.get("hardware"), R.INVALID_CAPABILITIES, "hardware", MAX_HARDWARE),
        max_model_bytes=_int(body, "max_model_bytes", 1, MAX_MODEL_BYTES),
        price_msat_per_shard=_int(body, "price_msat_per_shard", 0, MAX_MSAT),
        escrows=_read_escrows(body),
        job_kind=job_kind,
    )


def _content(caps: Capabilities) -> str:
    body: dict[str, Any] = {
        "name": caps.name,
        "tasks": [{"task": t.task, "code_sha256": t.code_sha256} for t in caps.tasks],
        "hardware": caps.hardware,
        "max_model_bytes": caps.max_model_bytes,
        "price_msat_per_shard": caps.price_msat_per_shard,
    }
    if caps.escrows is not None:
        body["escrows"] = list(caps.escrows)
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def build_capabilities(caps: Capabilities) -> Template:
    result = template(
        KIND_ANNOUNCEMENT,
        [("d", CAPABILITY_D), ("k", str(caps.job_kind)), ("t", CAPABILITY_TOPIC)],
        _content(caps),
    )
    if parse_capabilities(placeholder_event(result)) != caps:
        raise _bad("the capabilities do not round-trip: check their fields' types")
    return result
