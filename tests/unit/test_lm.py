"""The DiLoCo language-model task of the reference agents (service/agents/lm.py): the outer
Nesterov step against a hand computation, the pseudo-gradient's weights, the text split, the
model file read as hostile input, and inner training that lowers the held-out loss."""

from __future__ import annotations

import io

import numpy as np
import pytest

from service.agents import lm, ml

CONFIG = lm.LMConfig(context=16, d_model=16, n_heads=2, n_layers=1, d_ff=32)


def tree(w: list[float], b: float) -> dict:
    return {"layer": {"w": np.array(w, dtype=np.float32), "b": np.array([b], dtype=np.float32)}}


def leaves(t: dict) -> np.ndarray:
    return np.concatenate([np.asarray(t["layer"]["w"]), np.asarray(t["layer"]["b"])])


def test_outer_step_is_nesterov_with_momentum_carried_across_rounds() -> None:
    theta0 = tree([1.0, 2.0], 0.5)
    # round 1: two providers, shard sizes 1 and 3 -> weights 0.25, 0.75
    a, b = tree([0.0, 2.0], 0.5), tree([0.8, 1.0], 0.1)
    mean1 = 0.25 * leaves(a) + 0.75 * leaves(b)
    g1 = leaves(theta0) - mean1
    theta1, state = lm.outer_step(theta0, [a, b], [1, 3], lm.OuterState())
    m1 = g1  # momentum starts at 0: m = 0.9 * 0 + g
    expected1 = leaves(theta0) - 0.7 * (g1 + 0.9 * m1)
    np.testing.assert_allclose(leaves(theta1), expected1, rtol=1e-6)
    np.testing.assert_allclose(leaves(state.momentum), m1, rtol=1e-6)

    # round 2, from the new global model, with the momentum kept
    c = tree([float(leaves(theta1)[0]) - 0.2, float(leaves(theta1)[1]) + 0.1], float(leaves(theta1)[2]))
    g2 = leaves(theta1) - leaves(c)
    theta2, state2 = lm.outer_step(theta1, [c], [5], state)
    m2 = 0.9 * m1 + g2
    np.testing.assert_allclose(leaves(theta2), leaves(theta1) - 0.7 * (g2 + 0.9 * m2), rtol=1e-5)
    np.testing.assert_allclose(leaves(state2.momentum), m2, rtol=1e-5)

    # without the carried momentum the step differs: the state matters
    theta2_fresh, _ = lm.outer_step(theta1, [c], [5], lm.OuterState())
    assert not np.allclose(leaves(theta2_fresh), leaves(theta2))


def test_pseudo_gradient_is_weighted_by_shard_size_and_needs_positive_weights() -> None:
    g = lm.pseudo_gradient(tree([1.0, 1.0], 1.0), [tree([0.0, 0.0], 0.0), tree([1.0, 1.0], 1.0)], [3, 1])
    np.testing.assert_allclose(leaves(g), [0.75, 0.75, 0.75])
    for weights in ([1], [0, 1], [-1, 2]):
        with pytest.raises(ValueError):
            lm.pseudo_gradient(tree([1.0, 1.0], 1.0), [tree([0, 0], 0), tree([1, 1], 1)], weights)


def test_a_lazy_provider_contributes_no_pseudo_gradient() -> None:
    theta = tree([1.0, -1.0], 0.25)
    np.testing.assert_array_equal(leaves(lm.pseudo_gradient(theta, [theta], [1])), 0.0)


def test_split_is_deterministic_and_disjoint() -> None:
    s1, s2 = lm.split_corpus(3, 2, seed=3), lm.split_corpus(3, 2, seed=3)
    assert s1 == s2
    assert lm.split_corpus(3, 2, seed=4).shards != s1.shards
    pieces = [*s1.shards, *s1.holdouts, s1.test]
    blocks = [p[i : i + 2000] for p in pieces for i in range(0, len(p), 2000)]
    assert len(set(blocks)) == len(blocks)  # no block of the corpus in two pieces
    with pytest.raises(ValueError):
        lm.split_corpus(1000, 1)


def test_model_bytes_round_trip_and_hostile_files_are_refused() -> None:
    params = lm.init_params(CONFIG)
    data = lm.model_to_bytes(params, CONFIG)
    back = lm.model_from_bytes(data, config=CONFIG)
    tokens = lm.text_from_bytes(lm.split_corpus(1, 1).holdouts[0], config=CONFIG)
    assert lm.evaluate(back, tokens, config=CONFIG) == pytest.approx(lm.evaluate(params, tokens, config=CONFIG))

    other = lm.LMConfig(context=16, d_model=32, n_heads=2, n_layers=1, d_ff=32)
    with pytest.raises(ml.UnsafeData):  # another round's shape
        lm.model_from_bytes(lm.model_to_bytes(lm.init_params(other), other), config=CONFIG)
    flat = lm._flat(params)
    name = next(iter(flat))
    for bad in (
        {**flat, name: np.full_like(flat[name], np.nan)},  # non-finite
        {**flat, name: flat[name].reshape(-1)[:-1]},  # wrong shape
        {k: v for k, v in flat.items() if k != name},  # a member missing
        {**flat, "extra": np.zeros(1, np.float32)},  # a member too many
    ):
        with pytest.raises(ml.UnsafeData):
            lm.model_from_bytes(ml.savez({"config": CONFIG.to_array(), **bad}), config=CONFIG)
    buf = io.BytesIO()
    np.savez(buf, config=CONFIG.to_array())
    with pytest.raises(ml.UnsafeData):
        lm.model_from_bytes(buf.getvalue(), config=CONFIG)
    with pytest.raises(ml.UnsafeData):
        lm.model_from_bytes(b"not a zip", config=CONFIG)


def test_config_bounds() -> None:
    for bad in (dict(vocab=100), dict(d_model=10, n_heads=3), dict(n_layers=0), dict(context=10_000)):
        with pytest.raises(ml.UnsafeData):
            lm.LMConfig(**bad)  # type: ignore[arg-type]
    assert lm.LMConfig.from_array(CONFIG.to_array()) == CONFIG


def test_inner_training_lowers_held_out_loss_and_the_outer_state_survives_a_restart() -> None:
    split = lm.split_corpus(2, 1)
    shard = lm.text_from_bytes(split.shards[0], config=CONFIG)
    holdout = lm.text_from_bytes(split.holdouts[0], config=CONFIG)
    start = lm.init_params(CONFIG)
    before = lm.evaluate(start, holdout, config=CONFIG)
    trained, _ = lm.train_inner(start, shard, config=CONFIG, steps=20, seed=1)
    after = lm.evaluate(trained, holdout, config=CONFIG)
    assert after < before - 0.5  # from ~5.5 nats (uniform over bytes) towards the text's entropy
    again, _ = lm.train_inner(start, shard, config=CONFIG, steps=20, seed=1)
    np.testing.assert_allclose(leaves_of(again), leaves_of(trained), rtol=1e-5)  # seeded: reproducible

    new, state = lm.outer_step(start, [trained], [len(shard)], lm.OuterState())
    restored = lm.OuterState.from_bytes(state.to_bytes(CONFIG), CONFIG)
    np.testing.assert_allclose(leaves_of(restored.momentum), leaves_of(state.momentum))
    assert lm.OuterState.from_bytes(lm.OuterState().to_bytes(CONFIG), CONFIG).momentum is None


def leaves_of(t: dict) -> np.ndarray:
    import jax

    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(t)])
