"""A relay's answers to our events decide whether it counts as taking them (service/nostr/pool.py)."""

from __future__ import annotations

from service.health import pool_check
from service.nostr.pool import RelayStatus


def test_refusals_and_acceptances_in_order() -> None:
    st = RelayStatus("wss://r")
    assert st.accepting is None, "nothing answered yet"
    st.answered(True, "", now=1.0)
    assert st.accepting is True
    st.answered(False, "rate-limited: slow down", now=2.0)
    st.answered(False, "error: database busy", now=3.0)
    assert st.accepting is True and st.refused == 0, "transient answers say nothing about us"
    st.answered(False, "blocked: pubkey is not allowed", now=4.0)
    assert st.accepting is False and st.last_refusal == "blocked: pubkey is not allowed"
    st.answered(False, "duplicate: already have it", now=5.0)
    assert st.accepting is True, "a duplicate is an acceptance"
    st.answered(False, "", now=6.0)
    assert st.accepting is False and st.last_refusal == "refused without a reason"
    assert (st.accepted, st.refused) == (2, 2)


def test_readiness_counts_a_refusing_relay_as_down() -> None:
    st = RelayStatus("wss://r", connected=True)
    assert pool_check(st.as_dict()).ok
    st.answered(False, "restricted: permission denied", now=1.0)
    check = pool_check(st.as_dict())
    assert not check.ok and check.detail == "refuses our events: restricted: permission denied"
    assert check.info is not None and check.info["accepting"] is False
    st.answered(True, "", now=2.0)
    assert pool_check(st.as_dict()).ok
