"""NIP-40: expiration timestamp.

``["expiration", "<unix seconds>"]``: the event should be considered expired from
that second on. At most one such tag; the value is a canonical decimal integer.
A malformed or repeated tag raises :class:`~service.nostr.protocol.errors.CodecError`
(``invalid_expiration`` / ``duplicate_tag``): a hostile event cannot make a parser
silently treat it as never expiring.
"""

from __future__ import annotations

from service.nostr.nip01 import Event
from service.nostr.protocol.errors import CodecError, CodecErrorReason
from service.nostr.protocol.fields import Tag, Tags, arity, format_timestamp, parse_timestamp, single

TAG = "expiration"


def expiration_from_tags(tags: Tags) -> int | None:
    tag = single(tags, TAG)
    if tag is None:
        return None
    arity(tag, 2, 2, CodecErrorReason.INVALID_EXPIRATION)
    return parse_timestamp(tag[1], CodecErrorReason.INVALID_EXPIRATION, "expiration")


def expiration(event: Event) -> int | None:
    """The event's expiration time, or ``None`` if it has none."""
    return expiration_from_tags(event.tags)


def is_expired(event: Event, now: int) -> bool:
    """True from the expiration second on (``now >= expiration``)."""
    value = expiration(event)
    return value is not None and now >= value


def expiration_tag(timestamp: int) -> Tag:
    return (TAG, format_timestamp(timestamp, CodecErrorReason.INVALID_EXPIRATION, "expiration"))


__all__ = ["CodecError", "TAG", "expiration", "expiration_from_tags", "expiration_tag", "is_expired"]
