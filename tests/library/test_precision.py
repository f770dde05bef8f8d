"""Mixed precision: bfloat16 base, float32 adapters and optimizer state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers as tf
from conftest import tiny_llama_config
from flax import traverse_util

import genlora_jax as gl

TARGETS = ["q_proj", "k_proj", "v_proj"]
CONFIG = gl.GenLoRAConfig(rank=4, groups=8)


def perturbed(params, seed=0):
    """Adapters moved off their init, so ΔW ≠ 0."""
    base, adapters = gl.split(params)
    rng = np.random.default_rng(seed)
    moved = jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape, np.float32), adapters)
    return gl.join(base, moved)


def dtypes(tree):
    return {str(x.dtype) for x in jax.tree.leaves(tree)}


def relative_error(actual, desired):
    actual, desired = np.asarray(actual, np.float32), np.asarray(desired, np.float32)
    return float(np.linalg.norm(actual - desired) / np.linalg.norm(desired))


def test_cast_base_casts_only_float_base_leaves(key):
    base = {
        "q": {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)},
        "head": {"kernel": jnp.ones((8, 2))},
        "positions": jnp.arange(4),
    }
    params = gl.wrap(base, ["q"], gl.LoRAConfig(rank=2), rng=key, extra_trainable=["head"])
    cast = gl.cast_base(params)
    assert jax.tree.structure(cast) == jax.tree.structure(params)
    for (path, old), new in zip(
        traverse_util.flatten_dict(params).items(),
        traverse_util.flatten_dict(cast).values(),
        strict=True,
    ):
        if "genlora" in path:  # adapters and the extra head: untouched objects
            assert new is old
        elif path == ("positions",):
            assert new.dtype == jnp.int32
        else:
            assert new.dtype == jnp.bfloat16
            np.testing.assert_array_equal(np.asarray(new, np.float32), np.asarray(old))


@pytest.fixture(scope="module")
def llama():
    """The same tiny Llama computing in float32 and in bfloat16, and its weights."""
    config = tiny_llama_config()
    f32 = tf.FlaxLlamaForCausalLM(config, _do_init=False)
    bf16 = tf.FlaxLlamaForCausalLM(config, _do_init=False, dtype=jnp.bfloat16)
    weights = jax.jit(f32.init_weights, static_argnums=1)(jax.random.key(0), (1, 8))
    return f32, bf16, weights


IDS = np.random.default_rng(1).integers(1, 128, (2, 8))


@pytest.mark.lenient
def test_bfloat16_base_forward_and_merge_are_close_to_float32(llama, key):
    f32, bf16, weights = llama
    params = perturbed(gl.wrap(weights, TARGETS, CONFIG, rng=key))
    low = gl.cast_base(params)

    def logits(model, params):
        return jax.jit(lambda p: gl.apply(model, p, IDS).logits)(params)

    reference = logits(f32, params)
    effect = relative_error(logits(f32, weights), reference)  # what the adapters change
    got = logits(bf16, low)
    assert got.dtype == jnp.bfloat16
    assert relative_error(got, reference) < 2e-2 < effect

    # merged export: base-dtype kernels holding W0 + ΔW summed in float32
    merged = jax.jit(gl.merge)(low)
    assert dtypes(merged) == {"bfloat16"}
    kernels = traverse_util.flatten_dict(merged, sep="/")
    for name, adapter in gl.named_adapters(low).items():
        w0 = np.asarray(traverse_util.flatten_dict(low, sep="/")[f"{name}/kernel"], np.float32)
        want = w0 + np.asarray(adapter.delta_weight(w0.T)).T
        np.testing.assert_allclose(
            np.asarray(kernels[f"{name}/kernel"], np.float32), want, rtol=2**-8, atol=1e-6
        )
    exported = jax.jit(lambda p: bf16(IDS, params=p).logits)(merged)
    assert relative_error(exported, reference) < 2e-2


@pytest.mark.lenient
def test_bfloat16_base_trains_float32_adapters_like_float32(llama, key):
    f32, bf16, weights = llama
    params = gl.wrap(weights, TARGETS, CONFIG, rng=key)
    labels = np.random.default_rng(2).integers(0, 128, IDS.shape)
    tx = gl.optimizer(optax.adam(1e-2))

    def train(model, params, steps=3):
        base, adapters = gl.split(params)
        state = tx.init(adapters)

        @jax.jit
        def step(adapters, state):
            def loss_fn(adapters):
                logits = gl.apply(model, gl.join(base, adapters), IDS).logits
                return optax.softmax_cross_entropy_with_integer_labels(
                    logits.astype(jnp.float32), labels
                ).mean()

            value, grads = jax.value_and_grad(loss_fn)(adapters)
            assert dtypes(grads) == {"float32"}  # traced: the gradient dtype
            updates, state = tx.update(grads, state, adapters)
            return optax.apply_updates(adapters, updates), state, (value, grads)

        losses, grads = [], []
        for _ in range(steps):
            adapters, state, (value, g) = step(adapters, state)
            losses.append(float(value))
            grads.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]))
        return adapters, state, losses, grads

    adapters, state, losses, grads = train(bf16, gl.cast_base(params))
    _, _, want_losses, want_grads = train(f32, params)
    assert dtypes(adapters) == {"float32"}
    assert dtypes(state) == {"float32", "int32"}  # moments, and Adam's step count
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(losses, want_losses, rtol=1e-2)
    # same point, same gradient up to bfloat16 rounding (later steps start
    # from points that Adam's sign-like updates have already moved apart)
    assert relative_error(grads[0], want_grads[0]) < 2e-2
