"""Baselines (DoRA, HiRA, MELoRA, AuroRA, LoRAN) and GenLoRA ablations.

Every method goes through the same `wrap` / `apply` / `optimizer` / `merge`
path; each is checked against a naive float64 reference written here, for
identity at init (tiny linen model and tiny Llama), finite gradients, only
trainable leaves moving, and merged == intercepted. Parameter counts are
checked at the LLaMA-3-8B shapes.
"""

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_f32_close, tiny_llama_config
from scipy.interpolate import BSpline

import genlora_jax as gl
from genlora_jax.methods.aurora import bspline_basis

M, N = 48, 32
BASELINES = {
    "dora": gl.DoRAConfig(rank=4, alpha=8.0),
    "hira": gl.HiRAConfig(rank=4),
    "melora": gl.MELoRAConfig(rank=8, mini=4, alpha=8.0),
    "aurora": gl.AuroRAConfig(rank=4, alpha=8.0),
    "loran": gl.LoRANConfig(rank=4, alpha=8.0),
}
GENLORA = gl.GenLoRAConfig(rank=4, groups=4)
NO_NORM = dataclasses.replace(GENLORA, normalize=False)
NO_GROUPS = gl.GenLoRAConfig(rank=16, groups=1)  # the budget of r = 4, G = 4
FROZEN_ZA = dataclasses.replace(GENLORA, freeze_z_a=True)
FROZEN_ZB = dataclasses.replace(GENLORA, freeze_z_b=True)
FROZEN_BOTH = dataclasses.replace(GENLORA, freeze_z_a=True, freeze_z_b=True)
# The tiny model's (q_proj, k_proj, v_proj) configs per run. The GenLoRA
# ablations share runs, one per projection (through `overrides`), so the file
# compiles fewer models; plain GenLoRA and LoRA are covered by test_models.py.
RUNS = {
    **{name: (cfg, cfg, cfg) for name, cfg in BASELINES.items()},
    "genlora:no-norm,no-groups,frozen-za": (NO_NORM, NO_GROUPS, FROZEN_ZA),
    "genlora:frozen-zb,frozen-both,full": (FROZEN_ZB, FROZEN_BOTH, GENLORA),
}


# Test data comes from numpy's RNG and the adapters run under jax.jit: few
# XLA compiles keep this file fast on a shared CPU.
def _normal(seed, *shape, scale=1.0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _init(config, key):
    return config.init(key, m=M, n=N, kernel_transposed=False, path="q")


def _random(adapter):
    """The same adapter with every array field drawn at random (ΔW ≠ 0)."""
    leaves, tree = jax.tree.flatten(adapter)
    drawn = [_normal(100 + i, *leaf.shape, scale=0.3) for i, leaf in enumerate(leaves)]
    return jax.tree.unflatten(tree, drawn)


@jax.jit
def _layer(adapter, x, y, w0, bias):
    return adapter(x, y, w0=w0, bias=bias, rng=None)


def _spline_reference(h, coef, knots, order):
    """Σ_c coef[j, c] · N_c(h_j) with scipy's B-spline basis elements (0 off support)."""
    out = np.zeros_like(h)
    for c in range(coef.shape[1]):
        element = BSpline.basis_element(knots[c : c + order + 2], extrapolate=False)
        out += coef[:, c] * np.nan_to_num(element(h), nan=0.0)
    return out


def _reference(adapter, x, w0, bias):
    """The adapted layer written out naively in float64, from each method's formula."""
    x, w0, bias = (np.float64(v) for v in (x, w0, bias))
    p = {k: np.float64(v) for k, v in vars(adapter).items() if hasattr(v, "shape")}
    cfg, base = adapter.config, x @ w0.T + bias
    if isinstance(adapter, gl.methods.DoRAParams):
        v = w0 + cfg.scale * p["b"] @ p["a"]
        m_vec = np.linalg.norm(w0, axis=1) + p["magnitude"]
        w = m_vec[:, None] * v / np.linalg.norm(v, axis=1)[:, None]
        return x @ w.T + bias
    if isinstance(adapter, gl.methods.HiRAParams):
        return x @ (w0 * (1.0 + p["b"] @ p["a"])).T + bias
    if isinstance(adapter, gl.methods.MELoRAParams):
        k = cfg.mini
        mk, nk = w0.shape[0] // k, w0.shape[1] // k
        out = base.copy()
        for i in range(k):
            xi = x[..., i * nk : (i + 1) * nk]
            out[..., i * mk : (i + 1) * mk] += cfg.scale * xi @ p["a"][i].T @ p["b"][i].T
        return out
    if isinstance(adapter, gl.methods.AuroRAParams):
        h = x @ p["a"].T
        spline = np.stack(
            [
                _spline_reference(row, p["spline"], cfg.knots, cfg.spline_order)
                for row in h.reshape(-1, h.shape[-1])
            ]
        ).reshape(h.shape)
        anl = np.tanh(np.tanh(h) @ p["mixer"].T) + spline
        return base + cfg.scale * anl @ p["b"].T
    if isinstance(adapter, gl.methods.LoRANParams):
        z = p["b"] @ p["a"]
        dw = cfg.scale * (z + cfg.amplitude * z * np.sin(cfg.frequency * z))
        return base + x @ dw.T
    raise AssertionError(f"no reference for {type(adapter).__name__}")


def _layer_inputs():
    x = _normal(1, 2, 5, N, scale=0.5)
    w0 = _normal(2, M, N, scale=1 / np.sqrt(N))
    bias = _normal(3, M, scale=0.1)
    return x, w0, bias, x @ w0.T + bias[None, None, :]


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_layer_matches_naive_reference(name, key):
    adapter = _random(_init(BASELINES[name], key))
    x, w0, bias, y = _layer_inputs()
    got = _layer(adapter, x, y, w0, bias)
    np.testing.assert_allclose(got, _reference(adapter, x, w0, bias), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_layer_is_identity_at_init(name, key):
    x, w0, bias, y = _layer_inputs()
    np.testing.assert_array_equal(_layer(_init(BASELINES[name], key), x, y, w0, bias), y)


def test_bspline_basis_matches_scipy():
    cfg = gl.AuroRAConfig()
    h = jnp.linspace(-2.5, 2.5, 101)
    got = np.asarray(bspline_basis(h, cfg.knots, cfg.spline_order))
    assert got.shape == (101, cfg.grid_size + cfg.spline_order)
    eye = np.eye(got.shape[1])
    want = np.stack(
        [_spline_reference(np.float64(h), eye[c][None, :], cfg.knots, 3) for c in range(8)], -1
    )
    np.testing.assert_allclose(got, want, atol=1e-6)
    inside = np.abs(np.asarray(h)) <= 1.0  # the bases sum to one on the grid [-1, 1]
    np.testing.assert_allclose(got[inside].sum(-1), 1.0, atol=1e-6)


def test_dora_norm_is_constant_in_backward(key):
    """d/dB of Σ g·y' with ‖V‖ detached is s · Σ_t (c ⊙ g_t)(A x_t)ᵀ, c = m_vec/‖V‖."""
    cfg = BASELINES["dora"]
    adapter = _random(_init(cfg, key))
    x, w0, bias, y = _layer_inputs()
    g = _normal(4, *y.shape)
    grads = jax.grad(lambda ad: jnp.sum(g * ad(x, y, w0=w0, bias=bias, rng=None)))(adapter)
    a, b, mag, x64, w64 = (np.float64(v) for v in (adapter.a, adapter.b, adapter.magnitude, x, w0))
    v = w64 + cfg.scale * b @ a
    c = (np.linalg.norm(w64, axis=1) + mag) / np.linalg.norm(v, axis=1)
    want = cfg.scale * np.einsum("btm,btr->mr", c * np.float64(g), x64 @ a.T)
    np.testing.assert_allclose(grads.b, want, atol=1e-5, rtol=1e-5)
    # y' = m_vec ⊙ (V x)/‖V‖ + b, so d/dm_vec = Σ_t g_t ⊙ (V x_t)/‖V‖
    want = np.einsum("btm,btm->m", np.float64(g), x64 @ v.T) / np.linalg.norm(v, axis=1)
    np.testing.assert_allclose(grads.magnitude, want, atol=1e-5, rtol=1e-5)


class _Tiny(nn.Module):
    """Three projections of a 32-wide input, mixed nonlinearly, and a head."""

    @nn.compact
    def __call__(self, x):
        q = nn.Dense(M, name="q_proj")(x)
        k = nn.Dense(M, name="k_proj")(x)
        v = nn.Dense(N, name="v_proj")(x)
        return nn.Dense(4, name="out")(jnp.concatenate([jnp.tanh(q * k), v], axis=-1))


TARGETS = ["q_proj", "k_proj", "v_proj"]
X_TINY = _normal(5, 6, N)
TARGET_TINY = _normal(6, 6, 4)


@jax.jit
def _tiny_base():
    return _Tiny().init(jax.random.key(3), X_TINY)["params"]


def _tiny_forward(params):
    """The plain model on plain params, or the adapted model on wrapped params."""
    if gl.named_adapters(params):
        return gl.apply(_Tiny(), params, X_TINY)
    return _Tiny().apply({"params": params}, X_TINY)


def _train(params, steps=3):
    """A few Adam steps on a random regression target, adapters only.

    Returns the gradient at init and the trained params.
    """
    base, adapters = gl.split(params)
    tx = gl.optimizer(optax.adam(1e-2))

    @jax.jit
    def step(adapters, state):
        grads = jax.grad(
            lambda ad: jnp.mean((_tiny_forward(gl.join(base, ad)) - TARGET_TINY) ** 2)
        )(adapters)
        updates, state = tx.update(grads, state, adapters)
        return optax.apply_updates(adapters, updates), state, grads

    trained, state, grads = step(adapters, tx.init(adapters))
    for _ in range(steps - 1):
        trained, state, _ = step(trained, state)
    return grads, gl.join(base, trained)


@functools.partial(jax.jit, static_argnames=("mergeable", "invertible"))
def _outputs(base, params, trained, *, mergeable, invertible):
    """Base, init, trained and merged outputs, and the unmerged tree, in one compile."""
    out = {"base": _tiny_forward(base), "init": _tiny_forward(params)}
    out["trained"] = _tiny_forward(trained)
    if mergeable:
        merged = gl.merge(trained)
        out["merged"] = _tiny_forward(merged)
        if invertible:
            out["unmerged"] = gl.unmerge(merged, gl.split(trained)[1], verify=False)
    return out


@pytest.mark.parametrize("run", list(RUNS))
def test_tiny_model_init_grad_train_merge(run, key):
    base = _tiny_base()
    q, k, v = RUNS[run]
    params = gl.wrap(base, TARGETS, q, rng=key, overrides={"k_proj": k, "v_proj": v})
    configs = {path: a.config for path, a in gl.named_adapters(params).items()}
    assert configs == {"q_proj": q, "k_proj": k, "v_proj": v}
    grads, trained = _train(params)
    mergeable, invertible = run != "aurora", run not in ("aurora", "dora")
    out = _outputs(base, params, trained, mergeable=mergeable, invertible=invertible)

    np.testing.assert_array_equal(out["init"], out["base"])
    grad_leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in grad_leaves)
    assert max(float(jnp.abs(g).max()) for g in grad_leaves) > 0.0

    # only trainable leaves move; frozen fields (e.g. frozen latents) stay in the tree
    mask = jax.tree.leaves(gl.trainable_mask(gl.split(params)[1]))
    before, after = jax.tree.leaves(gl.split(params)[1]), jax.tree.leaves(gl.split(trained)[1])
    if run not in BASELINES:
        assert not all(mask)  # the frozen latents are in the tree
    for trainable, old, new in zip(mask, before, after, strict=True):
        assert trainable != np.array_equal(old, new)
    chex.assert_trees_all_equal(gl.split(trained)[0], base)
    assert float(jnp.max(jnp.abs(out["trained"] - out["base"]))) > 1e-4

    if not mergeable:
        with pytest.raises(
            ValueError,
            match=r"[qkv]_proj: AuroRAParams cannot be merged into W0 \(its nonlinearity acts on "
            r"activations\); serve it with `genlora_jax.apply`",
        ):
            gl.merge(trained)
        return
    # two layers: the projections (n = 32 terms) and the head (M + N = 80)
    effect = float(jnp.max(jnp.abs(out["trained"] - out["base"])))
    assert_f32_close(out["merged"], out["trained"], terms=M + N, layers=2, bug=effect)
    if not invertible:
        merged = jax.eval_shape(gl.merge, trained)
        with pytest.raises(NotImplementedError, match="DoRA cannot recover W0"):
            jax.eval_shape(gl.unmerge, merged, gl.split(trained)[1])
        return
    for old, new in zip(jax.tree.leaves(trained), jax.tree.leaves(out["unmerged"]), strict=True):
        assert_f32_close(new, old, terms=2)  # (W0 + ΔW) − ΔW, two roundings


@pytest.mark.lenient
def test_tiny_llama_identity_at_init(key):
    from transformers import FlaxLlamaForCausalLM

    model = FlaxLlamaForCausalLM(tiny_llama_config(), _do_init=False)
    shapes = jax.eval_shape(functools.partial(model.init_weights, input_shape=(1, 1)), key)
    # RMSNorm weights 1, everything else N(0, 0.02²) as Llama's init
    base = jax.tree_util.tree_map_with_path(
        lambda path, s: (
            jnp.ones(s.shape) if path[-1].key == "weight" else _normal(7, *s.shape, scale=0.02)
        ),
        shapes,
    )
    ids = jax.random.randint(key, (2, 8), 1, 128)
    base_out = jax.jit(lambda p: model(ids, params=p).logits)(base)
    logits = jax.jit(lambda p: gl.apply(model, p, ids).logits)
    # two compiled models instead of five: a method per projection (k, v: GQA, m = 32)
    for q, k, v in (("dora", "hira", "melora"), ("aurora", "loran", "dora")):
        cfg = {name: BASELINES[name] for name in (q, k, v)}
        params = gl.wrap(
            base, TARGETS, cfg[q], rng=key, overrides={"k_proj": cfg[k], "v_proj": cfg[v]}
        )
        assert {type(a.config) for a in gl.named_adapters(params).values()} == {
            type(c) for c in cfg.values()
        }
        # bit-exact at the layer (tests above); here XLA fuses the two graphs differently:
        # 2 layers and the LM head, widest reduction the FFN's 128 or the vocabulary's 128
        assert_f32_close(logits(params), base_out, terms=128, layers=3, err_msg=str(cfg))


# LLaMA-3-8B, targets q, k, v: (m, n) of q, k, v in each of 32 layers.
LLAMA3_PROJ = [(4096, 4096), (1024, 4096), (1024, 4096)] * 32


def _lora_count(r):
    return sum(r * (m + n) for m, n in LLAMA3_PROJ)


def _genlora_count(r, groups, centres=15, z_a=True, z_b=True):
    """m + n + 2·r·G·(K + 1) per projection, without the frozen latents."""
    return sum(z_b * m + z_a * n + 2 * r * groups * (centres + 1) for m, n in LLAMA3_PROJ)


LLAMA3_COUNTS = {
    "lora": (gl.LoRAConfig(rank=8), _lora_count(8)),
    "dora": (gl.DoRAConfig(rank=8), _lora_count(8) + 32 * (4096 + 1024 + 1024)),
    "hira": (gl.HiRAConfig(rank=8), _lora_count(8)),
    "loran": (gl.LoRANConfig(rank=8), _lora_count(8)),
    # 4 minis of rank 8: LoRA r=8's count (the paper's tables), rank 32
    "melora": (gl.MELoRAConfig(rank=8, mini=4), _lora_count(8)),
    "aurora": (gl.AuroRAConfig(rank=8), _lora_count(8) + 96 * (8 * 8 + 8 * (5 + 3))),
    "genlora": (gl.GenLoRAConfig(rank=8, groups=16), _genlora_count(8, 16)),
    "genlora-no-norm": (
        gl.GenLoRAConfig(rank=8, groups=16, normalize=False),
        _genlora_count(8, 16),
    ),
    "genlora-g1": (gl.GenLoRAConfig(rank=128, groups=1), _genlora_count(128, 1)),
    "genlora-frozen-za": (
        gl.GenLoRAConfig(rank=8, groups=16, freeze_z_a=True),
        _genlora_count(8, 16, z_a=False),
    ),
    "genlora-frozen-zb": (
        gl.GenLoRAConfig(rank=8, groups=16, freeze_z_b=True),
        _genlora_count(8, 16, z_b=False),
    ),
    "genlora-frozen-both": (
        gl.GenLoRAConfig(rank=8, groups=16, freeze_z_a=True, freeze_z_b=True),
        _genlora_count(8, 16, z_a=False, z_b=False),
    ),
}


@pytest.mark.lenient
def test_llama3_8b_counts(llama3_8b_shapes):
    # the paper's figures (GENLORA.md §5) follow from the formulas above
    assert _lora_count(8) == 4_718_592
    assert LLAMA3_COUNTS["dora"][1] == 4_915_200
    assert _genlora_count(8, 16) == 983_040
    assert _genlora_count(8, 16, z_a=False, z_b=False) == 393_216
    # G = 1 at r = 128 spends exactly the budget of r = 8, G = 16
    assert _genlora_count(128, 1) == _genlora_count(8, 16)
    for name, (cfg, want) in LLAMA3_COUNTS.items():
        wrapped = jax.eval_shape(lambda p, cfg=cfg: gl.wrap(p, TARGETS, cfg), llama3_8b_shapes)
        counts = gl.count_params(wrapped)
        assert counts.trainable == want, name
        assert len(counts.per_module) == 96, name
    shown = ("lora", "dora", "genlora-frozen-both")
    table = gl.compare_methods(
        llama3_8b_shapes, TARGETS, {name: LLAMA3_COUNTS[name][0] for name in shown}
    )
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    assert rows["lora"][2:4] == ["4,718,592", "1.000"]
    assert rows["dora"][2:4] == ["4,915,200", "1.042"]
    assert rows["genlora-frozen-both"][2:4] == ["393,216", "0.083"]
    assert "model/layers/0/self_attn/k_proj (m=1024, n=4096)" in table.splitlines()[0]
    assert "magnitude(1024,)" in rows["dora"][-1]


def test_bad_configs_are_named(key):
    with pytest.raises(ValueError, match="mini must be an integer ≥ 1"):
        gl.MELoRAConfig(rank=8, mini=0)
    with pytest.raises(
        ValueError, match=r"layer/v: mini=4 does not divide both its out size m=6 and in size"
    ):
        gl.wrap({"layer": {"v": {"kernel": jnp.ones((32, 6))}}}, ["v"], gl.MELoRAConfig())
    with pytest.raises(ValueError, match="HiRA has no α/r scale"):
        gl.HiRAConfig(alpha=16.0)
    with pytest.raises(ValueError, match="HiRA's original forward has no dropout on its update"):
        gl.HiRAConfig(dropout=0.05)
    assert gl.HiRAConfig(dropout=0.05, dropout_on_update=True).dropout == 0.05
    with pytest.raises(ValueError, match="need grid_size ≥ 1"):
        gl.AuroRAConfig(grid=(1.0, -1.0))
    aurora = _init(BASELINES["aurora"], key)
    with pytest.raises(ValueError, match="AuroRA has no weight update ΔW"):
        aurora.delta_weight(jnp.zeros((M, N)))


def test_compare_methods_without_lora_uses_lora_r8():
    base = {"layer": {"q": {"kernel": jax.ShapeDtypeStruct((N, M), jnp.float32)}}}
    table = gl.compare_methods(base, ["q"], {"DoRA": gl.DoRAConfig(rank=4)})
    header, row = table.splitlines()
    assert header.split()[:5] == ["method", "kind", "trainable", "vs", "LoRA"]
    assert "r=8" in header and f"shapes of layer/q (m={M}, n={N})" in header
    dora, lora8 = 4 * (M + N) + M, 8 * (M + N)
    assert row.split()[:4] == ["DoRA", "dora", f"{dora:,}", f"{dora / lora8:.3f}"]
    assert row.split()[4:] == ["a(4,", f"{N})", f"b({M},", "4)", f"magnitude({M},)"]
    with pytest.raises(ValueError, match="configs is empty"):
        gl.compare_methods(base, ["q"], {})
