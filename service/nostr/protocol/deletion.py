"""Deletion request (kind 5, NIP-09, by the customer): cancels an unfunded job (protocol.md §4).

``["e", <id>]`` / ``["e", <id>, <relay>]`` per event to delete (at least one: the
escrow only acts on event ids), optional ``["k", "<kind>"]`` tags, the reason in the
content. ``a`` tags are allowed and ignored. Repeated ids are read once.
Stateful (engine): only events *by the same author* are deleted; a funded job ignores it.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.nostr.nip01 import Event

from .errors import CodecError, CodecErrorReason
from .fields import (
    Tag,
    Template,
    arity,
    event_tag,
    expect_kind,
    format_uint,
    named,
    parse_hex64,
    parse_relay_hint,
    parse_uint,
    placeholder_event,
    pubkey_tag,
    template,
)
from .terms import KIND_DELETION

R = CodecErrorReason

MAX_KIND = 65535


@dataclass(frozen=True, slots=True)
class Deletion:
    id: str
    author: str
    created_at: int
    event_ids: tuple[str, ...]
    kinds: tuple[int, ...]
    reason: str


def parse_deletion(event: Event) -> Deletion:
    expect_kind(event, KIND_DELETION)
    ids: list[str] = []
    for tag in named(event.tags, "e"):
        arity(tag, 2, 3, R.INVALID_EVENT_REF)
        event_id = parse_hex64(tag[1], R.INVALID_EVENT_REF, "deleted event id")
        if len(tag) == 3:
            parse_relay_hint(tag[2], R.INVALID_EVENT_REF, "'e' relay hint")
        if event_id not in ids:
            ids.append(event_id)
    if not ids:
        raise CodecError(R.MISSING_EVENT_REF, "a deletion names no event id")
    kinds: list[int] = []
    for tag in named(event.tags, "k"):
        arity(tag, 2, 2, R.INVALID_KIND_REF)
        kind = parse_uint(tag[1], R.INVALID_KIND_REF, "deleted kind", MAX_KIND)
        if kind not in kinds:
            kinds.append(kind)
    return Deletion(
        id=event.id,
        author=event.pubkey,
        created_at=event.created_at,
        event_ids=tuple(ids),
        kinds=tuple(kinds),
        reason=event.content,
    )


def build_deletion(
    event_ids: tuple[str, ...], *, kinds: tuple[int, ...] = (), reason: str = "", escrow: str | None = None
) -> Template:
    """A NIP-09 deletion; ``escrow`` adds the routing tag ``["p", <escrow>]`` so the escrow sees it."""
    tags: list[Tag] = [event_tag(event_id) for event_id in event_ids]
    if escrow is not None:
        tags.append(pubkey_tag(escrow))
    tags += [("k", format_uint(kind, R.INVALID_KIND_REF, "deleted kind", MAX_KIND)) for kind in kinds]
    if type(reason) is not str:
        raise TypeError("reason must be a string")
    result = template(KIND_DELETION, tags, reason)
    parse_deletion(placeholder_event(result))
    return result
