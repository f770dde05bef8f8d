"""Every method against its paper's equation in float64, through the whole path.

For each method: the adapted forward (`gl.apply`, the interceptor), ΔW
(`gl.analysis.delta_weights`) and the merged forward (`gl.merge`) are compared with a
numpy float64 reference written from the paper's equation, for a kernel
stored (n, m) (`nn.Dense`) and (m, n) (a GPT-2-style Conv1D). Each reference
has deliberately wrong variants (a missing or wrong scale, the wrong
normalisation, a transposed or reordered factor, dropout on the base branch),
and the test asserts the library does *not* match them at the same tolerance,
so a test here cannot agree with a wrong formula.

Kept independent of the library: the references take the adapter's arrays
only, never its methods (`factors`, `delta_weight`, `scale`).
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import f32_tolerance
from scipy.interpolate import BSpline

import genlora_jax as gl

M, N = 24, 16  # m ≠ n: a transposed factor or ΔW cannot pass
X = np.random.default_rng(0).standard_normal((3, N)).astype(np.float32)
W0 = (np.random.default_rng(1).standard_normal((M, N)) / np.sqrt(N)).astype(np.float32)
BIAS = (0.1 * np.random.default_rng(2).standard_normal(M)).astype(np.float32)

CONFIGS = {
    "lora": gl.LoRAConfig(rank=4, alpha=6.0),
    "genlora": gl.GenLoRAConfig(rank=4, groups=4, alpha=6.0),
    "dora": gl.DoRAConfig(rank=4, alpha=6.0),
    "hira": gl.HiRAConfig(rank=4),
    "melora": gl.MELoRAConfig(rank=2, mini=4, alpha=6.0),
    # a and ω large enough that the Sinter term is visible at this size
    "loran": gl.LoRANConfig(rank=4, alpha=6.0, amplitude=0.5, frequency=3.0),
    "aurora": gl.AuroRAConfig(rank=4, alpha=6.0),
}


class Conv1D(nn.Module):
    """GPT-2's layout: the kernel is W0 itself, (m, n)."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.zeros, (self.features, x.shape[-1]))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return x @ kernel.T + bias.reshape((1,) * (x.ndim - 1) + (-1,))


class Net(nn.Module):
    conv1d: bool

    @nn.compact
    def __call__(self, x):
        return (Conv1D(M, name="proj") if self.conv1d else nn.Dense(M, name="proj"))(x)


def _wrapped(method, conv1d):
    kernel = W0 if conv1d else W0.T
    base = {"proj": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(BIAS)}}
    params = gl.wrap(
        base,
        ["proj"],
        CONFIGS[method],
        rng=jax.random.key(3),
        transposed_kernels="proj" if conv1d else None,
    )
    adapter = params["proj"][gl.ADAPTER_KEY]
    leaves, tree = jax.tree.flatten(adapter)
    rng = np.random.default_rng(4)
    moved = [jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32) for x in leaves]
    params["proj"][gl.ADAPTER_KEY] = jax.tree.unflatten(tree, moved)
    return params


def _arrays(adapter):
    return {k: np.float64(v) for k, v in vars(adapter).items() if hasattr(v, "shape")}


# ------------------------------------------------------------------ references
# Each returns ΔW (m, n) in float64 from the adapter's arrays and the config's
# hyper-parameters; `variant` selects a deliberately wrong formula.


def _rbf_basis(z, theta, *, normalize=True, eps=1e-5, ddof=0, bandwidth_by=None):
    """GENLORA.md §2: per group, x̂ = (x − mean)/(std + ε); feature
    [SiLU(x̂), exp(−((x̂ − μ_k)/h)²)] with K centres on [−3, 3], h = 6/(K − 1)."""
    r, groups, k1 = theta.shape
    centres = k1 - 1
    mu = np.linspace(-3.0, 3.0, centres)
    h = 6.0 / (bandwidth_by or (centres - 1))
    size = z.size // groups
    out = np.zeros((r, z.size))
    for g in range(groups):
        x = z[g * size : (g + 1) * size]
        if normalize:
            x = (x - x.mean()) / (x.std(ddof=ddof) + eps)
        feats = [x / (1 + np.exp(-x))] + [np.exp(-(((x - m) / h) ** 2)) for m in mu]
        for i in range(r):
            out[i, g * size : (g + 1) * size] = sum(theta[i, g, k] * f for k, f in enumerate(feats))
    return out


def lora_delta(p, cfg, variant=None):
    s = {
        None: cfg.alpha / cfg.rank,
        "no scale": 1.0,
        "rslora scale": cfg.alpha / math.sqrt(cfg.rank),
    }
    return s[variant] * p["b"] @ p["a"]


def genlora_delta(p, cfg, variant=None):
    kw = {
        None: {},
        "no instance norm": {"normalize": False},
        "sample std": {"ddof": 1},
        "bandwidth 6/K": {"bandwidth_by": cfg.centres},
    }.get(variant, {})
    b = _rbf_basis(p["z_b"], p["theta_b"], **kw).T  # (m, r): column i is f_i(z_B)
    a = _rbf_basis(p["z_a"], p["theta_a"], **kw)  # (r, n)
    scale = 1.0 if variant == "no scale" else cfg.alpha / cfg.rank
    return scale * b @ a


def dora_weight(p, cfg, w0, variant=None):
    """W' = m ⊙ V / ‖V‖_row, V = W0 + s·BA, m = ‖W0‖_row + the trained offset."""
    v = w0 + cfg.alpha / cfg.rank * p["b"] @ p["a"]
    if variant == "column norm":
        return (np.linalg.norm(w0, axis=0) + 0)[None, :] * v / np.linalg.norm(v, axis=0)[None, :]
    magnitude = np.linalg.norm(w0, axis=1) + p["magnitude"]
    if variant == "magnitude without ‖W0‖":
        magnitude = p["magnitude"]
    return magnitude[:, None] * v / np.linalg.norm(v, axis=1)[:, None]


def hira_delta(p, cfg, w0, variant=None):
    if variant == "no Hadamard":
        return p["b"] @ p["a"]
    scale = 2.0 if variant == "LoRA's α/r" else 1.0
    return scale * w0 * (p["b"] @ p["a"])


def melora_delta(p, cfg, variant=None):
    k, mk, nk = cfg.mini, M // cfg.mini, N // cfg.mini
    scale = cfg.alpha / (cfg.rank * (k if variant == "α / total rank" else 1))
    dw = np.zeros((M, N))
    for i in range(k):
        j = k - 1 - i if variant == "reversed blocks" else i
        dw[j * mk : (j + 1) * mk, i * nk : (i + 1) * nk] = scale * p["b"][i] @ p["a"][i]
    return dw


def loran_delta(p, cfg, variant=None):
    s = cfg.alpha / cfg.rank
    z = p["b"] @ p["a"]
    if variant == "sinter of s·BA":
        z = s * z
        return z + cfg.amplitude * z * np.sin(cfg.frequency * z)
    if variant == "no sinter":
        return s * z
    return s * (z + cfg.amplitude * z * np.sin(cfg.frequency * z))


def aurora_out(p, cfg, x, variant=None):
    """y = W0 x + b + s·B·ANL(A x), ANL(h) = tanh(W_m tanh(h)) + Σ_c w_c B_c(h)."""
    h = x @ p["a"].T
    spline = np.zeros_like(h)
    knots = cfg.knots
    for c in range(p["spline"].shape[1]):
        element = BSpline.basis_element(knots[c : c + cfg.spline_order + 2], extrapolate=False)
        spline += p["spline"][:, c] * np.nan_to_num(element(h), nan=0.0)
    anl = np.tanh(np.tanh(h) @ p["mixer"].T)
    if variant != "no spline":
        anl = anl + spline
    if variant == "one tanh":
        anl = np.tanh(h) @ p["mixer"].T + spline
    return np.float64(X) @ np.float64(W0).T + BIAS + cfg.alpha / cfg.rank * anl @ p["b"].T


DELTAS = {
    "lora": (lora_delta, ["no scale", "rslora scale"]),
    "genlora": (genlora_delta, ["no scale", "no instance norm", "sample std", "bandwidth 6/K"]),
    "hira": (
        lambda p, c, v=None: hira_delta(p, c, np.float64(W0), v),
        ["no Hadamard", "LoRA's α/r"],
    ),
    "melora": (melora_delta, ["α / total rank", "reversed blocks"]),
    "loran": (loran_delta, ["no sinter", "sinter of s·BA"]),
    "dora": (
        lambda p, c, v=None: dora_weight(p, c, np.float64(W0), v) - np.float64(W0),
        ["column norm", "magnitude without ‖W0‖"],
    ),
}


def _close(got, want, terms):
    tol = f32_tolerance(terms, float(np.abs(want).max()) + 1.0)
    return bool(np.all(np.abs(np.float64(got) - want) <= tol))


@pytest.mark.parametrize("conv1d", [False, True], ids=["dense", "conv1d"])
@pytest.mark.parametrize("method", sorted(DELTAS))
def test_forward_delta_and_merge_follow_the_equation(method, conv1d):
    params = _wrapped(method, conv1d)
    p, cfg = _arrays(params["proj"][gl.ADAPTER_KEY]), CONFIGS[method]
    reference, wrong_variants = DELTAS[method]
    dw = reference(p, cfg)
    want = np.float64(X) @ (np.float64(W0) + dw).T + BIAS
    terms = N + cfg.rank * max(getattr(cfg, "mini", 1), 1) + 16  # x·W, B·A, the generator

    got_dw = gl.analysis.delta_weights(params)["proj"]
    forward = gl.apply(Net(conv1d), params, X)
    merged = Net(conv1d).apply({"params": gl.merge(params)}, X)
    assert _close(got_dw, dw, terms), np.abs(np.float64(got_dw) - dw).max()
    assert _close(forward, want, terms), np.abs(np.float64(forward) - want).max()
    assert _close(merged, want, terms), np.abs(np.float64(merged) - want).max()
    for variant in wrong_variants:
        wrong_dw = reference(p, cfg, variant)
        wrong = np.float64(X) @ (np.float64(W0) + wrong_dw).T + BIAS
        assert not _close(got_dw, wrong_dw, terms), f"ΔW also matches the wrong {variant!r}"
        assert not _close(forward, wrong, terms), f"forward also matches the wrong {variant!r}"


@pytest.mark.parametrize("conv1d", [False, True], ids=["dense", "conv1d"])
def test_aurora_forward_follows_the_equation(conv1d):
    params = _wrapped("aurora", conv1d)
    p, cfg = _arrays(params["proj"][gl.ADAPTER_KEY]), CONFIGS["aurora"]
    got = gl.apply(Net(conv1d), params, X)
    terms = N + 2 * cfg.rank + cfg.grid_size + cfg.spline_order
    assert _close(got, aurora_out(p, cfg, np.float64(X)), terms)
    for variant in ("no spline", "one tanh"):
        assert not _close(got, aurora_out(p, cfg, np.float64(X), variant), terms), variant


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_dropout_only_ever_touches_the_adapter_branch(method):
    """With ΔW's output factor at zero (B = 0, as at init) the adapted layer is the
    base layer exactly, with or without a dropout key: dropping the base branch
    (a wrong variant) would change it. HiRA, as its original, drops nothing."""
    base = {"proj": {"kernel": jnp.asarray(W0.T), "bias": jnp.asarray(BIAS)}}
    cfg = CONFIGS[method]
    if method != "hira":
        cfg = dataclasses.replace(cfg, dropout=0.5)
    params = gl.wrap(base, ["proj"], cfg, rng=jax.random.key(3))
    plain = Net(False).apply({"params": base}, X)
    dropped = gl.apply(Net(False), params, X, adapter_rng=jax.random.key(5))
    np.testing.assert_array_equal(dropped, plain)
    if method == "hira":  # no dropout anywhere: a moved adapter gives the same output with a key
        moved = _wrapped("hira", False)
        np.testing.assert_array_equal(
            gl.apply(Net(False), moved, X, adapter_rng=jax.random.key(5)),
            gl.apply(Net(False), moved, X),
        )
