"""Layers under `nn.scan` (stacked adapters) and `nn.remat` / gradient checkpointing.

The reference for a scanned model is the same stack of blocks unrolled in a
Python loop, each block given its slice of the stacked kernels and adapters:
outputs and gradients must agree, and merging must equal W0 + ΔW computed
layer by layer in the test.
"""

import functools
import operator

import flax.linen as nn
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers as tf
from conftest import assert_f32_close

import genlora_jax as gl

L, D, H = 3, 16, 32  # layers, width, MLP width
TARGETS = ["query", "value", "up"]
CONFIG = gl.GenLoRAConfig(rank=4, groups=4)


class Block(nn.Module):
    """A residual block with attention-like projections and an MLP."""

    @nn.compact
    def __call__(self, x, _):
        x = x + nn.Dense(D, name="value")(jnp.tanh(nn.Dense(D, name="query")(x)))
        return x + nn.Dense(D, name="down")(jax.nn.gelu(nn.Dense(H, name="up")(x))), None


class Scanned(nn.Module):
    """L blocks under `nn.scan`: every kernel is stacked, (L, n, m)."""

    remat: bool = False

    @nn.compact
    def __call__(self, x):
        block = nn.remat(Block) if self.remat else Block
        stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
        return nn.Dense(2, name="head")(stack(name="layers")(x, None)[0])


class Looped(nn.Module):
    """The same L blocks unrolled in a Python loop: the reference."""

    @nn.compact
    def __call__(self, x):
        for i in range(L):
            x, _ = Block(name=f"layers_{i}")(x, None)
        return nn.Dense(2, name="head")(x)


X = jax.random.normal(jax.random.key(7), (8, D))
Y = jax.random.normal(jax.random.key(8), (8, 2))


def perturbed(params, seed=0):
    """Every adapter array moved off its init, so ΔW ≠ 0 in every layer."""
    base, adapters = gl.split(params)
    rng = np.random.default_rng(seed)
    moved = jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape, np.float32), adapters)
    return gl.join(base, moved)


def assert_close(actual, desired, err_msg=""):
    """Equal up to float32 rounding of sums taken in another order (widths ≤ 64,
    up to 3 layers)."""
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(desired), strict=True):
        assert_f32_close(a, b, terms=64, layers=3, err_msg=err_msg)


def layer(tree, i):
    """Slice i of every leaf (adapters included)."""
    return jax.tree.map(operator.itemgetter(i), tree)


def unrolled(params):
    """Scanned layout → Looped layout: block i gets slice i of every stacked leaf."""
    blocks = jax.tree.map(np.asarray, params["layers"])
    out = {k: v for k, v in params.items() if k != "layers"}
    return out | {f"layers_{i}": layer(blocks, i) for i in range(L)}


def stacked(params):
    """Looped layout (params or gradients) → Scanned layout."""
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    blocks = [params[f"layers_{i}"] for i in range(L)]
    return out | {"layers": jax.tree.map(lambda *xs: np.stack(xs), *blocks)}


def loss(model, params):
    return jnp.mean((gl.apply(model, params, X) - Y) ** 2)


scanned = jax.jit(lambda params: gl.apply(Scanned(), params, X))


@pytest.fixture(scope="module")
def base():
    return jax.jit(Scanned().init)(jax.random.key(0), X)["params"]


def test_wrap_stacks_adapters_along_the_layer_axis(base, key):
    params = gl.wrap(base, TARGETS, CONFIG, rng=key, stacked="layers")
    adapters = gl.named_adapters(params)
    assert sorted(adapters) == [f"layers/{t}" for t in sorted(TARGETS)]
    up = jax.tree.map(np.asarray, adapters["layers/up"])
    assert (up.z_a.shape, up.z_b.shape, up.theta_a.shape) == ((L, D), (L, H), (L, 4, 4, 16))
    for i in range(1, L):  # each layer drew its own init
        assert not np.allclose(up.theta_a[0], up.theta_a[i])
        assert not np.allclose(up.z_a[0], up.z_a[i])
    np.testing.assert_array_equal(up.theta_b, 0.0)
    single = CONFIG.init(key, m=H, n=D, kernel_transposed=False, path="up")
    assert jax.tree.structure(layer(up, 0)) == jax.tree.structure(single)
    assert [x.shape for x in jax.tree.leaves(layer(up, 0))] == [
        x.shape for x in jax.tree.leaves(single)
    ]

    # counts: L times one layer's m + n + 2·r·G·(K + 1)
    per_layer = 2 * CONFIG.rank * CONFIG.groups * (CONFIG.centres + 1)
    want = {
        "layers/query": L * (D + D + per_layer),
        "layers/value": L * (D + D + per_layer),
        "layers/up": L * (H + D + per_layer),
    }
    counts = gl.count_params(params)
    assert counts.per_module == want and counts.trainable == sum(want.values())
    assert counts.frozen == sum(x.size for x in jax.tree.leaves(base))
    # a path regex works as well as the scanned module's name, under eval_shape too
    shapes = jax.eval_shape(lambda p: gl.wrap(p, TARGETS, CONFIG, stacked=r"lay.rs"), base)
    assert gl.count_params(shapes) == counts
    text = gl.summary(params)
    assert f"z_a({L}, {D})" in text and f"{counts.trainable:,}" in text

    with pytest.raises(ValueError, match=r"kernel is not 2-D.*name the scanned module with"):
        gl.wrap(base, TARGETS)


def test_scanned_equals_unrolled_and_merged(base, key):
    params = gl.wrap(base, TARGETS, CONFIG, rng=key, stacked="layers")
    # identity at initialisation
    base_out = scanned(base)
    np.testing.assert_array_equal(scanned(params), base_out)
    params = perturbed(params)
    out = scanned(params)
    assert np.abs(np.asarray(out - base_out)).max() > 1e-3

    # reference 1: the unrolled loop, each block with its slice of the adapters
    assert_close(out, jax.jit(lambda p: gl.apply(Looped(), p, X))(unrolled(params)))

    # reference 2: W0 + ΔW formed layer by layer here, run without interceptor
    @jax.jit
    def by_layer(module):
        kernel, adapter = module["kernel"], module["genlora"]
        return jnp.stack(
            [kernel[i] + layer(adapter, i).delta_weight(kernel[i].T).T for i in range(L)]
        )

    merged = jax.jit(gl.merge)(params)
    for name in TARGETS:
        assert_close(merged["layers"][name]["kernel"], by_layer(params["layers"][name]))
    assert_close(scanned(merged), out)

    # unmerge gives the stacked base kernels back
    # (checked against the record of an eager merge; under jit the caller vouches)
    eager = gl.unmerge(gl.merge(params), gl.split(params)[1])
    back = jax.jit(functools.partial(gl.unmerge, verify=False))(merged, gl.split(params)[1])
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b, c in zip(*map(jax.tree.leaves, (back, eager, params)), strict=True):
        assert_f32_close(a, c, terms=2)  # (W0 + ΔW) − ΔW, two roundings
        assert_f32_close(b, c, terms=2)


def test_scan_and_remat_gradients_equal_unrolled_and_every_layer_trains(base, key):
    base_half, adapters = gl.split(gl.wrap(base, TARGETS, CONFIG, rng=key, stacked="layers"))

    def grads(model, base, adapters):
        return jax.jit(jax.grad(lambda a: loss(model, gl.join(base, a))))(adapters)

    want = stacked(grads(Looped(), unrolled(base_half), unrolled(adapters)))
    for remat in (False, True):
        got = grads(Scanned(remat=remat), base_half, adapters)
        assert all(a.shape[0] == L for a in jax.tree.leaves(got))
        assert_close(got, want, err_msg=f"{remat=}")
    # at init B = 0, so θ_B receives gradient in every layer of every module
    for adapter in gl.named_adapters(want).values():
        assert np.all(np.any(adapter.theta_b != 0.0, axis=(1, 2, 3)))

    model = Scanned(remat=True)
    tx = gl.optimizer(optax.adam(1e-2))
    state = tx.init(adapters)

    @jax.jit
    def step(adapters, state):
        value, grads = jax.value_and_grad(lambda a: loss(model, gl.join(base_half, a)))(adapters)
        updates, state = tx.update(grads, state, adapters)
        return optax.apply_updates(adapters, updates), state, value

    trained, losses = adapters, []
    for _ in range(3):
        trained, state, value = step(trained, state)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    for old, new in zip(jax.tree.leaves(adapters), jax.tree.leaves(trained), strict=True):
        old, new = np.asarray(old), np.asarray(new)
        assert all(not np.array_equal(old[i], new[i]) for i in range(L))
    trained = gl.join(base_half, trained)
    assert_close(scanned(jax.jit(gl.merge)(trained)), scanned(trained))


@pytest.mark.lenient
def test_transformers_bert_with_gradient_checkpointing(key):
    """`transformers` remats each BERT layer (`FlaxBertCheckpointLayer`); its
    Flax Llama has no gradient checkpointing to test."""
    config = tf.BertConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=128,
        max_position_embeddings=64,
    )
    plain = tf.FlaxBertModel(config, _do_init=False)
    checkpointed = tf.FlaxBertModel(config, _do_init=False, gradient_checkpointing=True)
    weights = jax.jit(plain.init_weights, static_argnums=1)(key, (1, 8))
    params = gl.wrap(weights, ["query", "key", "value"], CONFIG, rng=key)
    base, adapters = gl.split(perturbed(params))
    rng = np.random.default_rng(1)
    ids, target = rng.integers(1, 128, (2, 8)), rng.standard_normal((2, 8, 64), np.float32)

    @jax.jit
    def both(adapters):
        def objective(model, adapters):
            out = gl.apply(model, gl.join(base, adapters), ids).last_hidden_state
            return jnp.mean((out - target) ** 2)

        return [jax.value_and_grad(objective, 1)(m, adapters) for m in (checkpointed, plain)]

    (value, grads), (want_value, want) = both(adapters)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    assert all(np.abs(np.asarray(g)).max() > 1e-6 for g in jax.tree.leaves(want))
    assert_close(grads, want)


@pytest.mark.lenient
def test_remat_llama_keeps_params_outputs_and_gradients():
    """`genlora_jax.models.remat_llama`: the Flax Llama with every decoder layer
    under `nn.remat` takes the same params and gives the same logits, hidden
    states and adapter gradients; the backward pass saves less (one input per
    layer instead of its activations), which only `benchmarks.isolated` measures;
    ``remat_llama(model, n)`` rematerialises the first ``n`` layers only."""
    from conftest import tiny_llama_config

    from genlora_jax.models import remat_llama

    config = tiny_llama_config(num_hidden_layers=3)
    plain = tf.FlaxLlamaForCausalLM(config, seed=0)
    for layers in (None, 2):
        remat = remat_llama(plain, layers)
        assert remat.remat_layers == (3 if layers is None else layers)
        check_remat_llama(plain, remat, config)
    with pytest.raises(TypeError, match="FlaxLlamaForCausalLM"):
        remat_llama(object())
    for bad in (4, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"remat layers.*(outside \[0, 3\]|must be an int)"):
            remat_llama(plain, bad)


def check_remat_llama(plain, remat, config):
    """``remat`` gives ``plain``'s logits, hidden states and adapter gradients,
    and recomputes exactly its `remat_layers` layers (checkpoint primitives in
    the traced gradient)."""
    from conftest import perturbed

    from genlora_jax.models import RematLlamaForCausalLM

    assert isinstance(remat, RematLlamaForCausalLM)
    assert jax.tree.structure(remat.params_shape_tree) == jax.tree.structure(plain.params)
    params = perturbed(gl.wrap(plain.params, ["q_proj", "v_proj", "up_proj"], CONFIG), 1, 0.3)
    base, adapters = gl.split(params)
    ids = jax.random.randint(jax.random.key(2), (2, 12), 0, config.vocab_size)
    mask = jnp.ones_like(ids).at[1, 9:].set(0)

    def loss_value(model, adapters):
        out = gl.apply(model, gl.join(base, adapters), ids, attention_mask=mask)
        ce = optax.softmax_cross_entropy_with_integer_labels(out.logits[:, :-1], ids[:, 1:])
        return jnp.sum(ce * mask[:, 1:]), out.logits

    def loss(model):
        fn = functools.partial(loss_value, model)
        return jax.jit(jax.value_and_grad(fn, has_aux=True))(adapters)

    (l0, logits0), g0 = loss(plain)
    (l1, logits1), g1 = loss(remat)
    traced = jax.make_jaxpr(jax.grad(lambda a: loss_value(remat, a)[0]))(adapters)
    assert count_checkpoints(traced.jaxpr) == remat.remat_layers
    assert_f32_close(logits1, logits0, terms=config.intermediate_size, layers=3)
    assert_f32_close(l1, l0, terms=ids.size * config.vocab_size, layers=3)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        assert_f32_close(a, b, terms=ids.size * config.intermediate_size, layers=3)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g0)) > 0
    hidden = [
        m(ids, attention_mask=mask, params=plain.params, output_hidden_states=True).hidden_states
        for m in (plain, remat)
    ]
    assert len(hidden[1]) == len(hidden[0]) == config.num_hidden_layers + 1
    for a, b in zip(hidden[1], hidden[0], strict=True):
        assert_f32_close(a, b, terms=config.intermediate_size, layers=3)


def count_checkpoints(jaxpr) -> int:
    """`jax.checkpoint` (``nn.remat``) calls in ``jaxpr``, nested ones included."""
    found = 0
    for eqn in jaxpr.eqns:
        found += eqn.primitive.name in ("checkpoint", "remat2", "remat")
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += count_checkpoints(sub)
    return found
