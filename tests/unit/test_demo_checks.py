"""The demo's --once verdict: what makes a finished demo run a failure (service/agents/demo.py)."""

from __future__ import annotations

import copy

from service.agents.demo import audit_problems, demo_problems, sealing_problems


def _model(provider: str, *, accepted: bool, reward: int, key: bool) -> dict:
    return {
        "provider": provider,
        "accepted": accepted,
        "reward_msat": reward,
        "sealed": True,
        "key_received": key,
        "readable": key,
    }


GOOD = {
    "rounds": [
        {
            "round": 1,
            "job_id": "a" * 64,
            "models": [
                _model("alice", accepted=True, reward=1000, key=True),
                _model("mallory", accepted=False, reward=0, key=False),
            ],
        }
    ],
    "refund_round": {
        "round": 2,
        "job_id": "b" * 64,
        "outcome": "refunded (no model passed)",
        "models": [_model("alice", accepted=False, reward=0, key=False)],
    },
    "audits": [
        {"job_id": "a" * 64, "ok": True, "summary": "no discrepancy", "discrepancies": []},
        {"job_id": "b" * 64, "ok": True, "summary": "no discrepancy", "discrepancies": []},
    ],
}


def test_a_clean_run_has_no_problem() -> None:
    assert demo_problems(GOOD) == []


def test_a_discrepancy_in_any_job_fails_the_run() -> None:
    bad = copy.deepcopy(GOOD)
    bad["audits"][1] = {
        "job_id": "b" * 64,
        "ok": False,
        "summary": "1 discrepancy",
        "discrepancies": [{"code": "refund_with_rewards", "message": "a refunded job paid a reward"}],
    }
    problems = audit_problems(bad)
    assert any("refund_with_rewards" in p for p in problems) and demo_problems(bad) == problems


def test_a_run_that_was_not_audited_fails() -> None:
    bad = copy.deepcopy(GOOD)
    del bad["audits"]
    assert demo_problems(bad) == ["the rounds were not audited"]


def test_the_customer_reading_an_unpaid_model_fails() -> None:
    bad = copy.deepcopy(GOOD)
    bad["rounds"][0]["models"][1]["key_received"] = True
    assert sealing_problems(bad) == ["round 1: the customer got mallory's unpaid model"]
    bad = copy.deepcopy(GOOD)
    bad["refund_round"]["models"][0]["readable"] = True
    assert sealing_problems(bad) == ["refunded round: the customer got alice's model"]
