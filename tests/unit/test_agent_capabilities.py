"""The reference provider's capability checks (protocol.md §1a, §2 task params): which jobs it
refuses before any work (task, code, hardware, price), what it announces, and its training limit."""

from __future__ import annotations

import hashlib
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest

pytest.importorskip("sklearn")  # the agents' extra

from service.agents import provider as provider_module
from service.agents.common import PERMISSIVE_TERMS, read_job
from service.agents.provider import (
    AcceptancePolicy,
    Provider,
    RuntimeExceeded,
    runnable_code,
    unsupported_task,
    within_runtime,
)
from service.agents.relay import Relays
from service.agents.storage import Blobs
from service.agents.tasks import (
    DIGITS,
    DILOCO,
    Requirements,
    TaskError,
    requirements_of,
    task_code,
    task_code_sha256,
)
from service.nostr.nip01 import SecretKey, sign_event
from service.nostr.protocol import (
    CodecError,
    Direction,
    JobRequest,
    JobSpec,
    PayoutPolicy,
    Shard,
    Validation,
    build_capabilities,
    build_job_request,
    parse_capabilities,
)
from service.nostr.protocol.fields import placeholder_event

AGENTS = Path(provider_module.__file__).parent
ESCROW = SecretKey.generate()
CUSTOMER = SecretKey.generate()
VALIDATOR = SecretKey.generate().public_key_hex
OURS = {DIGITS: hashlib.sha256(b"our digits code").hexdigest(), DILOCO: hashlib.sha256(b"our lm code").hexdigest()}
HARDWARE = "cpu:2"


def job(params: tuple[tuple[str, str], ...] = (), *, bid: int = 3_000_000, shards: int = 3) -> JobRequest:
    now = int(time.time())
    spec = JobSpec(
        escrow=ESCROW.public_key_hex,
        bid_msat=bid,
        shards=tuple(Shard(index=k, url=f"https://data.example.org/{k}.npz") for k in range(shards)),
        validation=Validation("accuracy", Direction.MAX, Decimal("0.8"), 1),
        payout=PayoutPolicy.SPLIT,
        results_deadline=now + 60,
        validation_deadline=now + 240,
        validators=(VALIDATOR,),
        validator_fee_msat=50_000,
        params=params,
    )
    event = sign_event(CUSTOMER, *build_job_request(spec, customer=CUSTOMER.public_key_hex))
    return read_job(event, ESCROW.public_key_hex)


def refusal(params: tuple[tuple[str, str], ...]) -> str | None:
    return unsupported_task(job(params), code=OURS, hardware=HARDWARE)


# ---------------------------------------------------------------- what the job asks


def test_a_job_asking_for_our_task_code_and_hardware_is_taken() -> None:
    params = (("task", DIGITS), ("code", "https://code.example.org/ml.py"), ("code_sha256", OURS[DIGITS]))
    assert refusal((*params, ("hardware", HARDWARE), ("max_runtime_s", "600"))) is None


def test_a_job_that_asks_nothing_of_the_provider_is_taken() -> None:
    assert refusal(()) is None  # no task param: digits, which we run


def test_a_task_we_do_not_run_is_refused() -> None:
    why = refusal((("task", "vision/resnet50"),))
    assert why is not None and "'vision/resnet50' is not one we run" in why
    digits_only = {DIGITS: OURS[DIGITS]}
    why = unsupported_task(job((("task", DILOCO),)), code=digits_only, hardware=HARDWARE)
    assert why is not None and DILOCO in why


def test_other_code_than_ours_for_the_task_is_refused() -> None:
    # our DiLoCo code's hash, asked for the digits task: not what we run for digits
    why = refusal((("task", DIGITS), ("code_sha256", OURS[DILOCO])))
    assert why is not None and "asks for code" in why and OURS[DIGITS][:12] in why


def test_other_hardware_than_ours_is_refused() -> None:
    why = refusal((("hardware", "gpu:a100x8"),))
    assert why is not None and "'gpu:a100x8'" in why
    assert refusal((("hardware", "CPU:2"),)) is not None  # compared verbatim


@pytest.mark.parametrize(
    "params, fault",
    [
        ((("code", "https://code.example.org/ml.py"),), "needs its code_sha256"),
        ((("code", "not a url"), ("code_sha256", OURS[DIGITS])), "must be a URL"),
        ((("code_sha256", OURS[DIGITS].upper()),), "64 lowercase hex"),
        ((("max_runtime_s", "0"),), "1..604800"),
        ((("max_runtime_s", "604801"),), "1..604800"),
        ((("max_runtime_s", "+60"),), "canonical integer"),
        ((("max_runtime_s", "060"),), "canonical integer"),
        ((("max_runtime_s", "٦٠"),), "canonical integer"),  # Arabic-Indic digits: int() would take them
        ((("hardware", "h" * 65),), "1..64 characters"),
    ],
)
def test_malformed_requirements_are_refused_with_what_is_wrong(params, fault) -> None:
    why = refusal(params)
    assert why is not None and fault in why
    with pytest.raises(TaskError):
        requirements_of(dict(params))


def test_the_price_is_the_least_reward_per_shard_the_provider_takes() -> None:
    # 3 000 000 bid - 50 000 validator fee, no escrow fee: 2 950 000 over 3 shards = 983 333 per shard
    policy = AcceptancePolicy(min_reward_per_shard_msat=983_334, trusted_validators=frozenset({VALIDATOR}))
    why = policy.refusal(job(), pool=None, terms=PERMISSIVE_TERMS)
    assert why is not None and "983333 msat is below our minimum 983334" in why
    at_price = AcceptancePolicy(min_reward_per_shard_msat=983_333, trusted_validators=frozenset({VALIDATOR}))
    assert at_price.refusal(job(), pool=None, terms=PERMISSIVE_TERMS) is None


def test_requirements_write_the_params_they_are_read_from() -> None:
    wanted = Requirements("https://code.example.org/ml.py", OURS[DIGITS], "cpu:2", 90)
    assert requirements_of(dict(wanted.params())) == wanted
    assert Requirements().params() == []
    with pytest.raises(TaskError):
        Requirements(code_url="https://code.example.org/ml.py").params()  # refuses what a provider refuses


# --------------------------------------------------------------------- what it announces


def test_a_tasks_reference_code_is_the_source_of_the_module_that_trains_it() -> None:
    assert task_code(DIGITS) == (AGENTS / "ml.py").read_bytes()
    assert task_code_sha256(DILOCO) == hashlib.sha256((AGENTS / "lm.py").read_bytes()).hexdigest()
    assert task_code_sha256(DIGITS) != task_code_sha256(DILOCO)
    with pytest.raises(TaskError):
        task_code("vision/resnet50")


def test_the_provider_announces_its_tasks_code_hardware_price_and_escrow() -> None:
    key = SecretKey.generate()
    policy = AcceptancePolicy(min_reward_per_shard_msat=123_000)
    relays = Relays(["ws://127.0.0.1:1"])  # never contacted
    p = Provider(key, relays, ESCROW.public_key_hex, Blobs("http://127.0.0.1:1", key), lud16="a@b.c", policy=policy)
    caps = parse_capabilities(placeholder_event(build_capabilities(p.capabilities())))
    assert caps.price_msat_per_shard == 123_000
    assert caps.escrows == (ESCROW.public_key_hex,)
    assert caps.hardware == p.hardware and caps.hardware.startswith("cpu:")
    assert caps.max_model_bytes == p.blobs.max_model_bytes
    assert {t.task: t.code_sha256 for t in caps.tasks} == runnable_code()
    offer = caps.offer(DIGITS)
    assert offer is not None and offer.code_sha256 == task_code_sha256(DIGITS)
    # and it takes what it announces: a job asking for exactly that
    asked = (("task", DIGITS), ("code_sha256", offer.code_sha256), ("hardware", caps.hardware))
    assert unsupported_task(job(asked), code=p.code, hardware=p.hardware) is None


# ------------------------------------------------------------------------ its time limit


async def test_training_past_max_runtime_is_given_up_and_its_result_never_used() -> None:
    release = threading.Event()
    finished: list[str] = []

    def slow_training() -> str:
        release.wait()  # runs until the test lets it go: far past the limit
        finished.append("model")
        return "model"

    try:
        with pytest.raises(RuntimeExceeded, match=r"max_runtime_s \(1 s\): no result"):
            await within_runtime(1, slow_training)
        assert finished == []  # given up while the training still ran
    finally:
        release.set()


async def test_training_within_max_runtime_returns_its_model() -> None:
    assert await within_runtime(600, lambda x: x * 2, 21) == 42
    assert await within_runtime(None, lambda: "no limit") == "no limit"


# ---------------------------------------------------------------------------- the CLI


def test_the_customer_takes_provider_keys_or_discovers_them_never_both(capsys: pytest.CaptureFixture[str]) -> None:
    from service.agents.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["customer", "--discover", "3", "--hardware", "cpu:2", "--max-runtime-s", "90"])
    assert (args.discover, args.provider, args.hardware, args.max_runtime_s) == (3, None, "cpu:2", 90)
    pk = SecretKey.generate().public_key_hex
    assert parser.parse_args(["customer", "--provider", pk]).provider == [pk]
    for wrong in (["customer"], ["customer", "--provider", pk, "--discover", "1"], ["customer", "--discover", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(wrong)
    assert "--discover" in capsys.readouterr().err


def test_a_provider_whose_capabilities_cannot_be_announced_does_not_start() -> None:
    key = SecretKey.generate()
    with pytest.raises(CodecError, match="hardware"):
        Provider(
            key,
            Relays(["ws://127.0.0.1:1"]),
            ESCROW.public_key_hex,
            Blobs("http://127.0.0.1:1", key),
            lud16="a@b.c",
            hardware="h" * 65,
        )


def test_a_diloco_model_larger_than_our_max_model_bytes_is_refused() -> None:
    pytest.importorskip("jax")  # the lm extra
    from service.agents import lm

    size = lm.parameter_bytes(lm.LMConfig())
    assert size > 4 * 256 * 64  # at least the byte embedding
    diloco = job((("task", DILOCO),))
    why = unsupported_task(diloco, code=OURS, hardware=HARDWARE, max_model_bytes=size - 1)
    assert why is not None and f"{size} bytes of parameters" in why
    assert unsupported_task(diloco, code=OURS, hardware=HARDWARE, max_model_bytes=size) is None
