"""Training through the interceptor: what moves, what does not, what is traced."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import genlora_jax as gl


class Tiny(nn.Module):
    """Two projections and a head, like an attention block feeding a classifier."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(32, name="q_proj")(x)
        h = nn.Dense(32, name="v_proj")(jnp.tanh(h))
        return nn.Dense(2, name="classifier")(h)


X = jax.random.normal(jax.random.key(7), (8, 16))
Y = jax.random.normal(jax.random.key(8), (8, 2))


@pytest.fixture
def base(key):
    return Tiny().init(key, X)["params"]


def loss_fn(params, rng=None):
    return jnp.mean((gl.apply(Tiny(), params, X, adapter_rng=rng) - Y) ** 2)


def train(params, steps=3, lr=1e-2):
    tx = gl.optimizer(optax.adam(lr))
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def test_only_adapters_and_extras_move(base):
    params = gl.wrap(
        base,
        ["q_proj", "v_proj"],
        gl.GenLoRAConfig(rank=4, groups=4),
        extra_trainable=["classifier"],
    )
    trained, _ = train(params)
    mask = gl.trainable_mask(params)
    for flag, old, new in zip(
        jax.tree.leaves(mask), jax.tree.leaves(params), jax.tree.leaves(trained), strict=True
    ):
        if flag:
            assert not np.array_equal(old, new)
        else:
            np.testing.assert_array_equal(old, new)
    assert float(loss_fn(trained)) < float(loss_fn(params))


@pytest.mark.parametrize(("freeze_a", "freeze_b"), [(True, False), (False, True), (True, True)])
def test_frozen_latents_stay_and_carry_no_state(base, freeze_a, freeze_b):
    cfg = gl.GenLoRAConfig(rank=4, groups=4, freeze_z_a=freeze_a, freeze_z_b=freeze_b)
    params = gl.wrap(base, ["q_proj", "v_proj"], cfg)
    trained, state = train(params)
    for name, adapter in gl.named_adapters(params).items():
        new = gl.named_adapters(trained)[name]
        assert np.array_equal(adapter.z_a, new.z_a) == freeze_a
        assert np.array_equal(adapter.z_b, new.z_b) == freeze_b
        assert not np.array_equal(adapter.theta_b, new.theta_b)
    # Adam keeps two moments per trainable number and nothing for frozen ones
    state_size = sum(np.size(x) for x in jax.tree.leaves(state) if np.ndim(x) > 0)
    assert state_size == 2 * gl.count_params(params).trainable


def test_gradients_at_init_are_finite_and_nonzero(base):
    params = gl.wrap(base, ["q_proj", "v_proj"], gl.GenLoRAConfig(rank=4, groups=4))
    grads = jax.jit(jax.grad(loss_fn))(params)
    for adapter in gl.named_adapters(grads).values():
        for leaf in jax.tree.leaves(adapter):
            assert np.all(np.isfinite(leaf))
        assert float(jnp.abs(adapter.theta_b).max()) > 0


def test_base_weights_are_arguments_not_constants(base):
    params = gl.wrap(base, ["q_proj", "v_proj"], gl.LoRAConfig(rank=4))
    jaxpr = jax.make_jaxpr(jax.grad(loss_fn))(params)
    const_numbers = sum(np.size(c) for c in jaxpr.consts)
    assert const_numbers < 16 * 32, f"{const_numbers} numbers baked into the step"


def test_adapter_dropout_needs_an_rng(base):
    params = gl.wrap(base, ["q_proj"], gl.LoRAConfig(rank=4, dropout=0.5))
    params, _ = train(params, steps=2)
    plain = gl.apply(Tiny(), params, X)
    np.testing.assert_array_equal(plain, gl.apply(Tiny(), params, X))
    assert not np.allclose(plain, gl.apply(Tiny(), params, X, adapter_rng=jax.random.key(3)))


class Reentrant(nn.Dense):
    """A Dense subclass whose __call__ calls the parent's: intercepted twice."""

    def __call__(self, x):
        return super().__call__(x)


class WithSubclass(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Reentrant(32, name="q_proj")(x)


def test_reentrant_calls_apply_the_adapter_once(key):
    base = WithSubclass().init(key, X)["params"]
    params = gl.wrap(base, ["q_proj"], gl.LoRAConfig(rank=4))
    params = jax.tree.map(lambda x: x + 0.1, params)  # ΔW ≠ 0
    adapted = gl.apply(WithSubclass(), params, X)
    merged = WithSubclass().apply({"params": gl.merge(params)}, X)
    np.testing.assert_allclose(adapted, merged, atol=1e-5)


def test_wrong_orientation_is_caught_at_trace_time(base):
    params = gl.wrap(base, ["q_proj"], gl.LoRAConfig(rank=4), transposed_kernels="q_proj")
    with pytest.raises(
        ValueError, match=r"q_proj: the adapter assumes a kernel stored as \(out, in\)"
    ):
        jax.jit(loss_fn)(params)
