"""The training tasks the reference agents know, and what each means for a round.

A job request names its task in ``["param", "task", …]`` (absent: digits, the first task):

* ``sklearn-digits/logreg`` (:mod:`service.agents.ml`): FedAvg of logistic regressions, scored
  by accuracy (``max``).
* ``diloco/tinylm-bytes`` (:mod:`service.agents.lm`, the ``lm`` extra): DiLoCo rounds of a
  small language model, scored by held-out loss (``val_loss``, ``min``). The request carries
  the round's global model (``model``, ``model_sha256``), its shape (``lm_config``: six
  integers, :class:`~service.agents.lm.LMConfig`) and the inner steps (``inner_steps``).

The customer's side of a round is a :class:`RoundTask`: what it sends (params, shard bytes,
the starting model) and what it does with the accepted models (FedAvg, or DiLoCo's outer step).
Providers and validators read the same params (:func:`task_of`, :func:`lm_config_of`).

A request may also name the code it expects (``code`` URL + ``code_sha256``), the hardware
(``hardware``) and a maximum training time (``max_runtime_s``): :func:`requirements_of`
(protocol.md §2). The reference code of a task is the source of the module that trains it
(:func:`task_code`): what a reference provider announces (§1a) and checks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from service.nostr.protocol import Direction
from service.nostr.protocol.fields import has_control, is_hex64, is_url

from . import ml

if TYPE_CHECKING:  # the lm extra is optional: imported only when a job asks for it
    from . import lm

DIGITS = "sklearn-digits/logreg"
DILOCO = "diloco/tinylm-bytes"  # == lm.TASK (kept here so that naming it needs no JAX)
LM_CONFIG_PARAM = "lm_config"
INNER_STEPS_PARAM = "inner_steps"
DEFAULT_INNER_STEPS = 30
MAX_INNER_STEPS = 10_000
CODE_PARAM = "code"
CODE_SHA256_PARAM = "code_sha256"
HARDWARE_PARAM = "hardware"
MAX_RUNTIME_PARAM = "max_runtime_s"
MAX_RUNTIME_S = 7 * 86_400
MAX_HARDWARE = 64
#: The module whose source is a task's reference code (its SHA-256 is the task's ``code_sha256``).
TASK_MODULES = {DIGITS: "ml.py", DILOCO: "lm.py"}


class TaskError(ValueError):
    """A request's task params that an agent cannot work with (unknown task, bad config)."""


def task_of(params: Mapping[str, str]) -> str:
    return params.get("task", DIGITS)


def lm_config_of(params: Mapping[str, str]) -> lm.LMConfig:
    from . import lm

    raw = params.get(LM_CONFIG_PARAM)
    if raw is None:
        return lm.LMConfig()
    try:
        values = [int(v) for v in raw.split(",")]
        if len(values) != 6:
            raise ValueError("six integers")
        return lm.LMConfig(*values)
    except (ValueError, ml.UnsafeData) as exc:
        raise TaskError(f"{LM_CONFIG_PARAM} must be six integers of a valid model shape: {exc}") from None


def format_lm_config(config: lm.LMConfig) -> str:
    return ",".join(str(int(v)) for v in config.to_array())


def inner_steps_of(params: Mapping[str, str], default: int = DEFAULT_INNER_STEPS) -> int:
    try:
        value = int(params.get(INNER_STEPS_PARAM, default))
    except ValueError:
        raise TaskError(f"{INNER_STEPS_PARAM} must be an integer") from None
    if not 1 <= value <= MAX_INNER_STEPS:
        raise TaskError(f"{INNER_STEPS_PARAM} must be 1..{MAX_INNER_STEPS}")
    return value


def lm_available() -> bool:
    """Whether the ``lm`` extra (JAX, optax, flax) is installed, without importing it (slow)."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("jax", "optax", "flax"))


def task_code(task: str) -> bytes:
    """The reference code of ``task``: the source of the module that trains it (read as a file, so
    the DiLoCo task's needs no JAX). Raises :class:`TaskError` for a task we do not know."""
    module = TASK_MODULES.get(task)
    if module is None:
        raise TaskError(f"task {task!r} is not one we know")
    return (Path(__file__).parent / module).read_bytes()


def task_code_sha256(task: str) -> str:
    return hashlib.sha256(task_code(task)).hexdigest()


@dataclass(frozen=True, slots=True)
class Requirements:
    """What a request expects of its provider (protocol.md §2, task params); None = not asked."""

    code_url: str | None = None
    code_sha256: str | None = None
    hardware: str | None = None
    max_runtime_s: int | None = None

    def params(self) -> list[tuple[str, str]]:
        """The ``param`` pairs that say these requirements (the inverse of :func:`requirements_of`)."""
        out: list[tuple[str, str]] = []
        if self.code_url is not None:
            out.append((CODE_PARAM, self.code_url))
        if self.code_sha256 is not None:
            out.append((CODE_SHA256_PARAM, self.code_sha256))
        if self.hardware is not None:
            out.append((HARDWARE_PARAM, self.hardware))
        if self.max_runtime_s is not None:
            out.append((MAX_RUNTIME_PARAM, str(self.max_runtime_s)))
        requirements_of(dict(out))  # refuse to write what a provider would refuse to read
        return out


def requirements_of(params: Mapping[str, str]) -> Requirements:
    """The request's code reference, hardware and maximum runtime; :class:`TaskError` when one is
    malformed (a ``code`` without its ``code_sha256``, a hash that is not 64 lowercase hex, …)."""
    code, sha = params.get(CODE_PARAM), params.get(CODE_SHA256_PARAM)
    if code is not None and not is_url(code):
        raise TaskError(f"{CODE_PARAM} must be a URL")
    if code is not None and sha is None:
        raise TaskError(f"{CODE_PARAM} needs its {CODE_SHA256_PARAM}")
    if sha is not None and not is_hex64(sha):
        raise TaskError(f"{CODE_SHA256_PARAM} must be 64 lowercase hex characters")
    hardware = params.get(HARDWARE_PARAM)
    if hardware is not None and (not 1 <= len(hardware) <= MAX_HARDWARE or has_control(hardware)):
        raise TaskError(f"{HARDWARE_PARAM} must be text of 1..{MAX_HARDWARE} characters")
    runtime_text = params.get(MAX_RUNTIME_PARAM)
    runtime = None
    if runtime_text is not None:
        # canonical digits only: int() would take signs, spaces and other scripts' digits
        if not (runtime_text.isascii() and runtime_text.isdigit()) or runtime_text != str(int(runtime_text)):
            raise TaskError(f"{MAX_RUNTIME_PARAM} must be a canonical integer")
        runtime = int(runtime_text)
        if not 1 <= runtime <= MAX_RUNTIME_S:
            raise TaskError(f"{MAX_RUNTIME_PARAM} must be 1..{MAX_RUNTIME_S}")
    return Requirements(code, sha, hardware, runtime)


class RoundTask(Protocol):
    """The customer's side of one round of a task."""

    metric: str
    direction: Direction

    def params(self) -> list[tuple[str, str]]: ...

    def shard_payloads(self) -> list[bytes]: ...

    def shard_weight(self, index: int) -> float: ...

    def start_payload(self) -> bytes | None: ...

    def load(self, data: bytes, *, max_bytes: int) -> Any:
        """A returned model (raises :class:`ml.UnsafeData` for one that is not usable)."""
        ...

    def test_score(self, model: Any) -> float:
        """The customer's own score of a model on its test data (the task's metric)."""
        ...

    def combine(self, models: Sequence[Any], weights: Sequence[float]) -> tuple[Any, float]:
        """The next global model from the accepted ones, and its test score."""
        ...


@dataclass
class DigitsRound:
    shards: Sequence[ml.Dataset]
    test: ml.Dataset
    start_model: ml.Model | None = None
    max_iter: int = 10
    metric: str = "accuracy"
    direction: Direction = Direction.MAX

    def params(self) -> list[tuple[str, str]]:
        return [("task", DIGITS), ("format", "npz:coef,intercept,classes"), ("max_iter", str(self.max_iter))]

    def shard_payloads(self) -> list[bytes]:
        return [ml.dataset_to_bytes(data) for data in self.shards]

    def shard_weight(self, index: int) -> float:
        return float(len(self.shards[index])) if 0 <= index < len(self.shards) else 1.0

    def start_payload(self) -> bytes | None:
        return None if self.start_model is None else ml.model_to_bytes(self.start_model)

    def load(self, data: bytes, *, max_bytes: int) -> ml.Model:
        return ml.model_from_bytes(data, max_bytes=max_bytes)

    def test_score(self, model: ml.Model) -> float:
        return round(ml.accuracy(model, self.test), 4)

    def combine(self, models: Sequence[ml.Model], weights: Sequence[float]) -> tuple[ml.Model, float]:
        avg = ml.fedavg(models, weights)
        return avg, self.test_score(avg)


@dataclass
class DiLoCoRun:
    """A chain of DiLoCo rounds, kept by the customer: the global model and the outer momentum
    move from round to round (``combine`` is the outer Nesterov step)."""

    shards: Sequence[bytes]
    test: bytes
    config: lm.LMConfig
    inner_steps: int = DEFAULT_INNER_STEPS
    global_params: Any = None  # set from the config's seeded initialization when None
    state: lm.OuterState = field(default=None)  # type: ignore[assignment]
    metric: str = "val_loss"
    direction: Direction = Direction.MIN
    history: list[float] = field(default_factory=list)  # the global model's test loss after each round
    momentum_norms: list[float] = field(default_factory=list)  # the outer momentum's L2 norm after each round

    def __post_init__(self) -> None:
        from . import lm

        if self.global_params is None:
            self.global_params = lm.init_params(self.config)
        if self.state is None:
            self.state = lm.OuterState()
        self._test_tokens = lm.text_from_bytes(self.test, config=self.config)

    def params(self) -> list[tuple[str, str]]:
        from . import lm

        return [
            ("task", DILOCO),
            ("format", lm.FORMAT),
            (LM_CONFIG_PARAM, format_lm_config(self.config)),
            (INNER_STEPS_PARAM, str(self.inner_steps)),
        ]

    def shard_payloads(self) -> list[bytes]:
        return list(self.shards)

    def shard_weight(self, index: int) -> float:
        return float(len(self.shards[index])) if 0 <= index < len(self.shards) else 1.0

    def start_payload(self) -> bytes:
        from . import lm

        return lm.model_to_bytes(self.global_params, self.config)

    def load(self, data: bytes, *, max_bytes: int) -> Any:
        from . import lm

        return lm.model_from_bytes(data, config=self.config, max_bytes=max_bytes)

    def test_score(self, model: Any) -> float:
        from . import lm

        return round(lm.evaluate(model, self._test_tokens, config=self.config), 4)

    def global_loss(self) -> float:
        return self.test_score(self.global_params)

    def combine(self, models: Sequence[Any], weights: Sequence[float]) -> tuple[Any, float]:
        from . import lm

        self.global_params, self.state = lm.outer_step(self.global_params, models, weights, self.state)
        loss = self.global_loss()
        self.history.append(loss)
        self.momentum_norms.append(lm.global_norm(self.state.momentum))
        return self.global_params, loss
