"""LoRA and GenLoRA layers against naive references, init, dropout, scale."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_rbf import reference_basis

import genlora_jax as gl

M, N = 48, 32


def _random(adapter, key, scale=0.5):
    """The same adapter with every array field drawn at random (ΔW ≠ 0)."""
    leaves, tree = jax.tree.flatten(adapter)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        tree,
        [scale * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves, strict=True)],
    )


@pytest.fixture(params=["lora", "genlora"])
def config(request):
    if request.param == "lora":
        return gl.LoRAConfig(rank=4, alpha=8.0)
    return gl.GenLoRAConfig(rank=4, groups=4, alpha=8.0)


def test_init_is_identity(config, key):
    adapter = config.init(key, m=M, n=N, kernel_transposed=False, path="q")
    np.testing.assert_array_equal(adapter.delta_weight(jnp.ones((M, N))), 0.0)
    x = jax.random.normal(key, (5, N))
    y = jax.random.normal(key, (5, M))
    np.testing.assert_array_equal(adapter(x, y, w0=None, bias=None, rng=None), y)


def test_forward_matches_materialised_delta(config, key):
    ka, kx, kw = jax.random.split(key, 3)
    adapter = _random(config.init(ka, m=M, n=N, kernel_transposed=False, path="q"), ka)
    w0 = jax.random.normal(kw, (M, N))
    x = jax.random.normal(kx, (2, 7, N))
    y = x @ w0.T
    got = adapter(x, y, w0=w0, bias=None, rng=None)
    want = np.einsum("btn,mn->btm", np.float64(x), np.float64(w0 + adapter.delta_weight(w0)))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_lora_delta_is_scaled_product(key):
    adapter = _random(
        gl.LoRAConfig(rank=4, alpha=8.0).init(key, m=M, n=N, kernel_transposed=False, path="q"), key
    )
    want = 2.0 * np.float64(adapter.b) @ np.float64(adapter.a)
    np.testing.assert_allclose(adapter.delta_weight(None), want, atol=1e-6)


def test_genlora_delta_matches_reference(key):
    cfg = gl.GenLoRAConfig(rank=4, groups=4, alpha=8.0)
    adapter = _random(cfg.init(key, m=M, n=N, kernel_transposed=False, path="q"), key)
    b = reference_basis(adapter.z_b, adapter.theta_b).T  # (m, r): column i is b_i
    a = reference_basis(adapter.z_a, adapter.theta_a)  # (r, n): row i is a_i
    np.testing.assert_allclose(adapter.delta_weight(None), cfg.scale * b @ a, atol=1e-5)
    assert np.linalg.matrix_rank(np.asarray(adapter.delta_weight(None)), tol=1e-4) <= 4


def test_genlora_init_follows_the_paper(key):
    adapter = gl.GenLoRAConfig(rank=8, groups=4).init(
        key, m=M, n=N, kernel_transposed=False, path="q"
    )
    np.testing.assert_array_equal(adapter.z_b, 0.0)
    np.testing.assert_array_equal(adapter.theta_b, 0.0)
    assert float(jnp.abs(adapter.z_a).max()) <= 1.0 / np.sqrt(N)
    # generators are drawn independently, so the r basis vectors of A differ
    a = np.asarray(adapter.factors()[1])
    assert np.linalg.matrix_rank(a, tol=1e-4) == 8
    np.testing.assert_allclose(np.std(adapter.theta_a), 1.0 / np.sqrt(N / 4), rtol=0.25)


def test_gradient_at_init_is_finite_and_reaches_theta_b(key):
    adapter = gl.GenLoRAConfig(rank=4, groups=4).init(
        key, m=M, n=N, kernel_transposed=False, path="q"
    )
    x = jax.random.normal(key, (3, N))

    def loss(adapter):
        return jnp.sum(adapter(x, jnp.ones((3, M)), w0=None, bias=None, rng=None) ** 2)

    grads = jax.grad(loss)(adapter)
    for leaf in jax.tree.leaves(grads):
        assert np.all(np.isfinite(leaf))
    assert float(jnp.abs(grads.theta_b).max()) > 0.0


@pytest.mark.parametrize(
    ("alpha", "rslora", "want"), [(None, False, 2.0), (16.0, False, 4.0), (16.0, True, 8.0)]
)
def test_scale(alpha, rslora, want):
    assert gl.LoRAConfig(rank=4, alpha=alpha, rslora=rslora).scale == want


def test_dropout_only_with_rng(key):
    cfg = gl.LoRAConfig(rank=4, dropout=0.5)
    adapter = _random(cfg.init(key, m=M, n=N, kernel_transposed=False, path="q"), key)
    x = jnp.ones((64, N))
    y = jnp.zeros((64, M))
    plain = adapter(x, y, w0=None, bias=None, rng=None)
    dropped = adapter(x, y, w0=None, bias=None, rng=jax.random.key(1))
    assert not np.allclose(plain, dropped)
    # inverted dropout keeps the expectation
    mean = jnp.mean(
        jnp.stack([adapter(x, y, w0=None, bias=None, rng=jax.random.key(i)) for i in range(40)]), 0
    )
    np.testing.assert_allclose(mean.mean(), plain.mean(), rtol=0.1)


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="rank must be an integer ≥ 1, got rank=0"):
        gl.LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="dropout must lie in"):
        gl.LoRAConfig(dropout=1.0)
    with pytest.raises(
        ValueError, match=r"layer/q: groups=16 does not divide its out \(m\) size 24"
    ):
        gl.GenLoRAConfig(groups=16).init(
            jax.random.key(0), m=24, n=32, kernel_transposed=False, path="layer/q"
        )
