"""A small causal transformer language model trained with DiLoCo, for the reference agents.

DiLoCo (Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models",
arXiv:2311.08105): each provider starts from the round's global model and runs H inner AdamW
steps on its own text shard; the customer turns the returned models into a pseudo-gradient
(the global model less the shard-size-weighted mean of the returned ones) and applies one outer
Nesterov step (lr 0.7, momentum 0.9), keeping the momentum from round to round.

* Text: the bytes of Python's own documentation topics (``pydoc_data.topics``, part of every
  CPython installation: nothing is downloaded), tokenized as bytes (vocabulary 256).
  :func:`split_corpus` cuts it deterministically (a seed) into training shards, validator
  hold-outs and the customer's test text.
* Model: :class:`TinyLM` (flax linen): token and learned position embeddings, pre-norm blocks of
  causal multi-head attention and a GELU MLP, a final norm and a vocabulary projection.
  Its size is an :class:`LMConfig`, stored in every model file and bounded on load.
* Loss: mean next-byte cross-entropy in nats (``val_loss``: lower is better).
* Bytes: a ``.npz`` of the flattened parameters (``block0/Dense_0/kernel``, …) plus ``config``,
  read with the same hostile-input checks as the digits models (``ml.load_npz``): exactly the
  members the config implies, each of its exact shape, float32, finite.

JAX, optax and flax are an optional extra (``pip install 'fedstr-escrow[lm]'``): the escrow
never imports this module.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass
from typing import Any

import numpy as np

from . import ml

try:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax
    from flax import traverse_util
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError("the language-model task needs the 'lm' extra: pip install 'fedstr-escrow[lm]'") from exc

TASK = "diloco/tinylm-bytes"
FORMAT = "npz:flat-params+config"
METRIC = "val_loss"
#: The outer optimizer of the DiLoCo paper (and of the FEDSTR proof of concept).
OUTER_LR = 0.7
OUTER_MOMENTUM = 0.9
DEFAULT_SEED = 7
#: What an agent accepts from others: a shard's bytes, a config's dimensions.
MAX_SHARD_BYTES = 4 << 20
MAX_DIM = 1024
MAX_LAYERS = 12
MAX_CONTEXT = 1024

Params = dict[str, Any]  # a flax parameter tree


@dataclass(frozen=True)
class LMConfig:
    """The model's shape; every model file names its own and it must match the round's."""

    vocab: int = 256
    context: int = 64
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 256

    def __post_init__(self) -> None:
        if self.vocab != 256:
            raise ml.UnsafeData("the vocabulary is the 256 byte values")
        if not (1 <= self.n_layers <= MAX_LAYERS and 2 <= self.context <= MAX_CONTEXT):
            raise ml.UnsafeData("layers or context out of bounds")
        if not (1 <= self.d_model <= MAX_DIM and 1 <= self.d_ff <= 4 * MAX_DIM and 1 <= self.n_heads <= 64):
            raise ml.UnsafeData("model dimensions out of bounds")
        if self.d_model % self.n_heads:
            raise ml.UnsafeData("d_model must be a multiple of n_heads")

    def to_array(self) -> np.ndarray:
        return np.array(astuple(self), dtype=np.int64)

    @classmethod
    def from_array(cls, arr: np.ndarray) -> LMConfig:
        if arr.dtype.kind not in "iu" or arr.shape != (6,):
            raise ml.UnsafeData("config must be 6 integers")
        return cls(*(int(v) for v in arr))


# --------------------------------------------------------------------- text


def load_corpus() -> bytes:
    """Python's documentation topics as UTF-8 bytes, in a fixed order (about 750 kB)."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[name] for name in sorted(topics.topics)).encode("utf-8")


@dataclass(frozen=True)
class TextSplit:
    shards: tuple[bytes, ...]
    holdouts: tuple[bytes, ...]
    test: bytes


def split_corpus(
    n_shards: int,
    n_holdouts: int,
    *,
    seed: int = DEFAULT_SEED,
    shard_bytes: int = 48_000,
    holdout_bytes: int = 16_000,
    block: int = 2_000,
) -> TextSplit:
    """Disjoint pieces of the corpus: blocks of ``block`` bytes dealt out in a seeded order, so
    every shard and hold-out is text from all over the documentation, and none overlap."""
    corpus = load_corpus()
    blocks = [corpus[i : i + block] for i in range(0, len(corpus) - block + 1, block)]
    order = np.random.default_rng(seed).permutation(len(blocks))
    per_shard, per_holdout = -(-shard_bytes // block), -(-holdout_bytes // block)
    need = n_shards * per_shard + (n_holdouts + 1) * per_holdout
    if need > len(blocks):
        raise ValueError(f"the corpus has {len(blocks)} blocks of {block} bytes, not {need}")
    it = iter(order.tolist())

    def take(k: int) -> bytes:
        return b"".join(blocks[next(it)] for _ in range(k))

    shards = tuple(take(per_shard) for _ in range(n_shards))
    holdouts = tuple(take(per_holdout) for _ in range(n_holdouts))
    return TextSplit(shards=shards, holdouts=holdouts, test=take(per_holdout))


def text_from_bytes(data: bytes, *, config: LMConfig, max_bytes: int = MAX_SHARD_BYTES) -> np.ndarray:
    """A shard or hold-out as tokens (any bytes are text here; only the size is checked)."""
    if type(data) is not bytes:
        raise ml.UnsafeData("expected bytes")
    if not config.context + 1 <= len(data) <= max_bytes:
        raise ml.UnsafeData(f"text must be {config.context + 1}..{max_bytes} bytes")
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)


# --------------------------------------------------------------------- the model


class _Block(nn.Module):
    config: LMConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=c.n_heads, qkv_features=c.d_model, deterministic=True)(
            h, mask=mask
        )
        h = nn.LayerNorm()(x)
        return x + nn.Dense(c.d_model)(nn.gelu(nn.Dense(c.d_ff)(h)))


class TinyLM(nn.Module):
    config: LMConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.config
        positions = self.param("positions", nn.initializers.normal(0.02), (c.context, c.d_model))
        x = nn.Embed(c.vocab, c.d_model)(tokens) + positions[: tokens.shape[-1]]
        mask = nn.make_causal_mask(tokens)
        for i in range(c.n_layers):
            x = _Block(c, name=f"block{i}")(x, mask)
        return nn.Dense(c.vocab)(nn.LayerNorm()(x))  # logits of the next byte


def init_params(config: LMConfig, seed: int = DEFAULT_SEED) -> Params:
    dummy = jnp.zeros((1, config.context), dtype=jnp.int32)
    params: Params = TinyLM(config).init(jax.random.PRNGKey(seed), dummy)["params"]
    return params


@functools.cache
def _param_shapes(config: LMConfig) -> dict[str, tuple[int, ...]]:
    dummy = jax.ShapeDtypeStruct((1, config.context), jnp.int32)
    tree = jax.eval_shape(lambda t: TinyLM(config).init(jax.random.PRNGKey(0), t)["params"], dummy)
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def parameter_bytes(config: LMConfig) -> int:
    """The bytes of a model of ``config``'s parameters (float32): a lower bound of its file's size,
    known from the config alone (what a provider compares with its ``max_model_bytes``)."""
    return 4 * sum(math.prod(shape) for shape in _param_shapes(config).values())


def _loss(params: Params, config: LMConfig, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = TinyLM(config).apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# One jitted step per (config, optimizer settings), shared by every agent of the process (XLA
# compiles it on its first call and caches it). The lock guards only the building of those
# functions (functools.cache is not thread-safe against two threads building one entry).
_COMPILE_LOCK = threading.Lock()


@functools.cache
def _train_step(config: LMConfig, lr: float, weight_decay: float) -> Any:
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=weight_decay))

    @jax.jit
    def step(params: Params, state: Any, x: jax.Array, y: jax.Array) -> tuple[Params, Any, jax.Array]:
        loss, grads = jax.value_and_grad(_loss)(params, config, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return opt, step


@functools.cache
def _eval_loss(config: LMConfig) -> Any:
    return jax.jit(functools.partial(_loss, config=config))


def _windows(tokens: np.ndarray, context: int, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = starts[:, None] + np.arange(context + 1)[None, :]
    chunk = tokens[idx]
    return chunk[:, :-1], chunk[:, 1:]


def train_inner(
    params: Params,
    tokens: np.ndarray,
    *,
    config: LMConfig,
    steps: int,
    batch: int = 16,
    lr: float = 3e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
) -> tuple[Params, float]:
    """DiLoCo's inner loop: ``steps`` AdamW steps on random windows of ``tokens`` from
    ``params`` (a fresh optimizer state, as in the paper's per-round workers). Returns the new
    parameters and the last batch's loss."""
    with _COMPILE_LOCK:
        opt, step = _train_step(config, lr, weight_decay)
    state = opt.init(params)
    rng = np.random.default_rng(seed)
    loss = float("nan")
    for _ in range(steps):
        starts = rng.integers(0, len(tokens) - config.context - 1, size=batch)
        x, y = _windows(tokens, config.context, starts)
        params, state, loss_arr = step(params, state, jnp.asarray(x), jnp.asarray(y))
        loss = float(loss_arr)
    return params, loss


def evaluate(params: Params, tokens: np.ndarray, *, config: LMConfig, max_windows: int = 256) -> float:
    """Mean next-byte cross-entropy (nats) over non-overlapping windows of ``tokens``: the same
    windows for every model, so scores of one hold-out compare."""
    starts = np.arange(0, len(tokens) - config.context - 1, config.context)[:max_windows]
    if len(starts) == 0:
        raise ml.UnsafeData("hold-out shorter than one window")
    x, y = _windows(tokens, config.context, starts)
    with _COMPILE_LOCK:
        fn = _eval_loss(config)
    value = float(fn(params, x=jnp.asarray(x), y=jnp.asarray(y)))
    if not np.isfinite(value):
        raise ml.UnsafeData("the model's loss is not finite")
    return value


# --------------------------------------------------------------------- DiLoCo's outer step


def _outer_optimizer(lr: float, momentum: float) -> optax.GradientTransformation:
    # PyTorch's SGD(nesterov=True), as the paper's: m <- mu m + g; update = g + mu m; theta -= lr update.
    return optax.sgd(lr, momentum=momentum, nesterov=True)


@dataclass
class OuterState:
    """The outer optimizer's momentum, kept by the customer from one round to the next."""

    momentum: Params | None = None  # None before the first outer step

    def to_bytes(self, config: LMConfig) -> bytes:
        """For a customer that stops between rounds (``--outer-state FILE``)."""
        if self.momentum is None:
            return ml.savez({"config": config.to_array()})
        return ml.savez({"config": config.to_array(), **_flat(self.momentum)})

    @classmethod
    def from_bytes(cls, data: bytes, config: LMConfig) -> OuterState:
        shapes = _param_shapes(config)
        try:
            arrays = ml.load_npz(data, {"config.npy", *(f"{k}.npy" for k in shapes)}, 1 << 30)
        except ml.UnsafeData:
            arrays = ml.load_npz(data, {"config.npy"}, 1 << 10)  # saved before the first outer step
            shapes = {}
        if LMConfig.from_array(arrays["config"]) != config:
            raise ml.UnsafeData("the saved momentum is of another model config")
        return cls(_unflat(_checked(arrays, shapes)) if shapes else None)


def pseudo_gradient(global_params: Params, local: Sequence[Params], weights: Sequence[float]) -> Params:
    """The global model less the weighted mean of the providers' models (weights: shard sizes)."""
    if not local or len(local) != len(weights) or min(weights) <= 0:
        raise ValueError("one positive weight per returned model")
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    mean = jax.tree_util.tree_map(lambda *xs: sum(wi * x for wi, x in zip(w, xs, strict=True)), *local)
    return jax.tree_util.tree_map(lambda g, m: g - m, global_params, mean)


def outer_step(
    global_params: Params,
    local: Sequence[Params],
    weights: Sequence[float],
    state: OuterState,
    *,
    lr: float = OUTER_LR,
    momentum: float = OUTER_MOMENTUM,
) -> tuple[Params, OuterState]:
    """One outer Nesterov step on the pseudo-gradient; the momentum carries into ``state``."""
    opt = _outer_optimizer(lr, momentum)
    grad = pseudo_gradient(global_params, local, weights)
    opt_state = opt.init(global_params)
    if state.momentum is not None:
        opt_state = optax.tree_utils.tree_set(opt_state, trace=state.momentum)
    updates, opt_state = opt.update(grad, opt_state, global_params)
    trace = optax.tree_utils.tree_get(opt_state, "trace")
    return optax.apply_updates(global_params, updates), OuterState(momentum=trace)


def global_norm(tree: Params | None) -> float:
    """The L2 norm of a parameter tree (0 for None): how much momentum the customer carries."""
    return 0.0 if tree is None else float(optax.global_norm(tree))


# --------------------------------------------------------------------- bytes, safely


def _flat(params: Params) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=np.float32) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def _unflat(flat: Mapping[str, np.ndarray]) -> Params:
    tree: Params = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()})
    return tree


def _checked(arrays: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    out = {}
    for name, shape in shapes.items():
        arr = ml.finite_float(arrays[name], name)
        if arr.shape != shape:
            raise ml.UnsafeData(f"{name} must have shape {shape}")
        out[name] = arr.astype(np.float32)
    return out


def model_to_bytes(params: Params, config: LMConfig) -> bytes:
    return ml.savez({"config": config.to_array(), **_flat(params)})


def model_from_bytes(data: bytes, *, config: LMConfig, max_bytes: int = ml.MAX_MODEL_BYTES) -> Params:
    """A model of the round's ``config``: exactly its members and shapes (checked before numpy
    reads anything), float32 and finite, and the config it names is the round's."""
    shapes = _param_shapes(config)
    arrays = ml.load_npz(data, {"config.npy", *(f"{k}.npy" for k in shapes)}, max_bytes)
    if LMConfig.from_array(arrays["config"]) != config:
        raise ml.UnsafeData(f"the model's config is not the round's {config}")
    return _unflat(_checked(arrays, shapes))


def evaluate_bytes(
    model_bytes: bytes, tokens: np.ndarray, *, config: LMConfig, max_bytes: int = ml.MAX_MODEL_BYTES
) -> float:
    return evaluate(model_from_bytes(model_bytes, config=config, max_bytes=max_bytes), tokens, config=config)
