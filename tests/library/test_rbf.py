"""The RBF generator against a loop-by-loop reference of GENLORA.md §2."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import genlora_jax as gl


def reference_basis(z, theta, *, lo=-3.0, hi=3.0, normalize=True, eps=1e-5):
    """b_i = concat_g [w_b[i,g]·SiLU(x̂_g) + Σ_k w[i,g,k]·exp(−((x̂_g − μ_k)/h)²)]."""
    z, theta = np.asarray(z, np.float64), np.asarray(theta, np.float64)
    r, groups, k1 = theta.shape
    mu = np.linspace(lo, hi, k1 - 1)
    h = (hi - lo) / (k1 - 2)
    out = np.zeros((r, z.size))
    size = z.size // groups
    for g in range(groups):
        x = z[g * size : (g + 1) * size]
        if normalize:
            x = (x - x.mean()) / (x.std() + eps)
        silu = x / (1.0 + np.exp(-x))
        for i in range(r):
            value = theta[i, g, 0] * silu
            for k in range(k1 - 1):
                value = value + theta[i, g, k + 1] * np.exp(-(((x - mu[k]) / h) ** 2))
            out[i, g * size : (g + 1) * size] = value
    return out


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize(("r", "groups", "centres", "d"), [(8, 16, 15, 64), (3, 1, 5, 12)])
def test_generate_basis_matches_reference(key, normalize, r, groups, centres, d):
    kz, kt = jax.random.split(key)
    z = jax.random.normal(kz, (d,)) * 2.0
    # θ at the paper's init scale 1/√(d/G), so values are O(1) as in training
    theta = jax.random.normal(kt, (r, groups, centres + 1)) / math.sqrt(d / groups)
    got = gl.methods.rbf.generate_basis(z, theta, normalize=normalize)
    want = reference_basis(z, theta, normalize=normalize)
    assert got.shape == (r, d)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)


def test_features_are_shared_and_shaped(key):
    z = jax.random.normal(key, (48,))
    feats = gl.methods.rbf.rbf_features(z, groups=4, centres=15)
    assert feats.shape == (4, 12, 16)
    np.testing.assert_allclose(
        feats[..., 0], jax.nn.silu(gl.methods.rbf.instance_norm(z.reshape(4, 12), 1e-5))
    )
    # the Gaussian bumps peak at 1 on the grid points and never exceed it
    assert float(feats[..., 1:].max()) <= 1.0


def test_instance_norm_value_and_zero_variance_gradient():
    x = jnp.array([[1.0, 2.0, 4.0, 9.0]])
    want = (np.asarray(x) - np.mean(x)) / (np.std(x) + 1e-5)
    np.testing.assert_allclose(gl.methods.rbf.instance_norm(x, 1e-5), want, rtol=1e-6)

    def naive(x):
        return jnp.sum((x - x.mean()) / (jnp.std(x) + 1e-5))

    zeros = jnp.zeros((1, 8))
    assert not np.all(np.isfinite(jax.grad(naive)(zeros))), "the trap this guards against"
    grad = jax.grad(lambda x: jnp.sum(gl.methods.rbf.instance_norm(x, 1e-5) ** 2))(zeros)
    assert np.all(np.isfinite(grad))


def test_bad_groups_and_activation_are_named():
    with pytest.raises(ValueError, match="groups=5 does not divide the latent length 12"):
        gl.methods.rbf.rbf_features(jnp.ones(12), groups=5)
    with pytest.raises(ValueError, match="base_activation='relu6' is unknown"):
        gl.GenLoRAConfig(base_activation="relu6")


def test_bandwidth_is_grid_spacing():
    mu, h = gl.methods.rbf.rbf_centres(15, (-3.0, 3.0))
    assert math.isclose(h, 6.0 / 14.0)
    np.testing.assert_allclose(np.diff(mu), h, rtol=1e-6)
