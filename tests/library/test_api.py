"""The public surface and the module layout (issue 12): names, registry, one owner per fact."""

import ast
import importlib
import importlib.util
import shutil
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO, perturbed
from test_training import Tiny, X

import genlora_jax as gl
from genlora_jax import _tree

DATA = Path(__file__).with_name("data")


# ------------------------------------------------------------------ the surface


def test_the_top_level_is_small_and_every_name_resolves():
    assert len(gl.__all__) <= 35
    for name in gl.__all__:
        assert getattr(gl, name) is not None
    for sub in ("methods", "analysis", "checkpoint", "peft", "sharding"):
        assert sub in gl.__all__


# genlora_jax 0.1.0's __all__ (commit e4e82db)
OLD_NAMES = (
    "ACTIVATIONS",
    "ADAPTER_KEY",
    "GPT2_CONV1D",
    "Adapter",
    "AdapterCheckpointer",
    "AdapterConfig",
    "AdapterNotAppliedError",
    "AuroRAConfig",
    "AuroRAParams",
    "Checkpoint",
    "CorruptCheckpointError",
    "DoRAConfig",
    "DoRAParams",
    "GenLoRAConfig",
    "GenLoRAParams",
    "HiRAConfig",
    "HiRAParams",
    "LoRAConfig",
    "LoRANConfig",
    "LoRANParams",
    "LoRAParams",
    "LowRankAdapter",
    "MELoRAConfig",
    "MELoRAParams",
    "ParamCount",
    "Reconstruction",
    "SpectrumRow",
    "adapted",
    "apply",
    "basis_vectors",
    "cast_base",
    "compare_methods",
    "count_params",
    "delta_weights",
    "effective_rank",
    "energy",
    "export_peft",
    "find_targets",
    "fit_rbf_reconstruction",
    "generate_basis",
    "import_peft",
    "instance_norm",
    "join",
    "low_rank_delta",
    "merge",
    "model_params",
    "named_adapters",
    "optimizer",
    "partition_specs",
    "plot_reconstruction",
    "plot_spectra",
    "rbf_features",
    "save_merged",
    "shard",
    "shardings",
    "spectral_table",
    "spectrum",
    "split",
    "state_shardings",
    "summary",
    "trainable_mask",
    "unmerge",
    "wrap",
)


def test_every_name_of_version_0_1_still_resolves():
    with pytest.warns(DeprecationWarning):
        missing = [name for name in OLD_NAMES if not hasattr(gl, name)]
    assert missing == []


def test_moved_names_still_resolve_with_a_warning():
    for name, where in gl._MOVED.items():
        module, _, attr = where.rpartition(".")
        new = getattr(importlib.import_module(f"genlora_jax.{module}"), attr)
        with pytest.warns(DeprecationWarning, match=rf"genlora_jax\.{name} moved"):
            assert getattr(gl, name) is new
        assert name not in gl.__all__
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        gl.not_a_name


def _imports(path: Path):
    """(module imported from, name) of every ``from genlora_jax... import name``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("genlora_jax"):
            for alias in node.names:
                yield node.module, alias.name


def test_no_library_module_imports_another_modules_private_name():
    offenders = [
        f"{path.relative_to(REPO)}: from {module} import {name}"
        for path in sorted((REPO / "genlora_jax").rglob("*.py"))
        for module, name in _imports(path)
        if name.startswith("_") and module != "genlora_jax._tree" and module != "genlora_jax"
    ]
    assert offenders == []


def test_the_layout_key_is_spelled_in_one_module():
    spelled = [
        path.relative_to(REPO)
        for path in (REPO / "genlora_jax").rglob("*.py")
        if 'ADAPTER_KEY = "genlora"' in path.read_text()
    ]
    assert spelled == [Path("genlora_jax/_tree.py")]


# ------------------------------------------------------------------ the registry


def test_the_registry_knows_every_method_by_its_config_name():
    assert set(gl.methods.REGISTRY) == {
        "genlora",
        "lora",
        "dora",
        "hira",
        "melora",
        "aurora",
        "loran",
    }
    for name, cls in gl.methods.REGISTRY.items():
        assert cls.method == name
        assert gl.methods.get(name) is cls
    assert gl.methods.config("lora", rank=4) == gl.LoRAConfig(rank=4)
    with pytest.raises(ValueError, match=r"unknown method 'lorra'; known methods: \['aurora'"):
        gl.methods.get("lorra")
    with pytest.raises(ValueError, match="already registered by LoRAConfig"):

        class Impostor(gl.LoRAConfig):
            pass

        gl.methods.register(Impostor)
    with pytest.raises(TypeError, match="AdapterConfig subclass"):
        gl.methods.register(dict)


# ------------------------------------------------------------------ inference


def test_inference_params_merges_what_merges_and_intercepts_the_rest(key):
    base = Tiny().init(key, X)["params"]
    for config, intercept in ((gl.LoRAConfig(rank=2), False), (gl.AuroRAConfig(rank=2), True)):
        params = perturbed(gl.wrap(base, ["q_proj", "v_proj"], config, rng=key), seed=1, scale=0.3)
        tree, flag = gl.inference_params(params)
        assert flag is intercept
        assert bool(gl.named_adapters(tree)) is intercept
        with gl.adapted(enabled=flag):
            served = Tiny().apply({"params": tree}, X)
        adapted = gl.apply(Tiny(), params, X)
        base_out = Tiny().apply({"params": base}, X)
        assert float(jnp.max(jnp.abs(adapted - base_out))) > 1e-3  # the adapters matter
        np.testing.assert_allclose(served, adapted, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ sites


@pytest.mark.parametrize("transposed", [False, True])
def test_a_site_converts_between_kernel_and_w_both_ways(key, transposed):
    w = jax.random.normal(key, (3, 6, 4), jnp.bfloat16)  # (L, m, n)
    kernel = w if transposed else jnp.swapaxes(w, -1, -2)
    adapter = gl.LoRAConfig(rank=2).init(key, m=6, n=4, kernel_transposed=transposed, path="q")
    site = _tree.Site(("q",), kernel, adapter)
    assert site.shape == (6, 4) and site.layers == (3,)
    assert site.w0().dtype == jnp.float32
    np.testing.assert_array_equal(site.w0(), w.astype(jnp.float32))
    chex.assert_trees_all_equal(site.with_w(site.w0()), kernel)


def test_sites_come_in_tree_order_and_need_their_kernel(key):
    base = Tiny().init(key, X)["params"]
    params = gl.wrap(base, ["v_proj", "q_proj"], gl.LoRAConfig(rank=2))
    names = [site.name for site in _tree.sites(params)]
    assert names == list(gl.named_adapters(params)) == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match=r"no kernel beside the adapter.*join"):
        _tree.sites(gl.split(params)[1])
    # the counts and the summary need no kernel: they read the adapter half too
    adapters = gl.split(params)[1]
    assert gl.count_params(adapters).trainable == gl.count_params(params).trainable
    assert gl.summary(adapters).splitlines()[1].startswith("q_proj")


# ------------------------------------------------------------------ old checkpoints


def test_a_checkpoint_written_by_version_0_1_restores(tmp_path):
    """``data/ckpt_v0_1`` was written by genlora_jax 0.1.0 (commit e4e82db, see
    ``data/make_v0_1_checkpoint.py``): the format is unchanged, so it restores
    onto a tree wrapped by this version, every leaf bit-identical."""
    spec = importlib.util.spec_from_file_location("make_v0_1", DATA / "make_v0_1_checkpoint.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    wrapped, base = maker.wrapped, maker.base
    shutil.copytree(DATA / "ckpt_v0_1", tmp_path / "ckpt")
    params = wrapped(gl)
    tx = gl.optimizer(optax.adam(1e-2))
    with gl.AdapterCheckpointer(tmp_path / "ckpt") as ckpt:
        state = ckpt.restore(params, opt_state=tx.init(gl.split(params)[1]))
    assert state.step == 3 and state.data_position == 24
    np.testing.assert_array_equal(jax.random.key_data(state.rng), [0, 5])
    expected = np.load(DATA / "ckpt_v0_1.npz")
    restored = jax.tree_util.tree_flatten_with_path((gl.split(state.params)[1], state.opt_state))
    assert len(restored[0]) == len(expected.files)
    for path, leaf in restored[0]:
        np.testing.assert_array_equal(leaf, expected[jax.tree_util.keystr(path)])
    out = gl.apply(_Model(), state.params, jnp.ones((2, 16)))
    plain = _Model().apply({"params": base()}, jnp.ones((2, 16)))
    assert float(jnp.max(jnp.abs(out - plain))) > 1e-3  # the restored adapters are read


class _Model(nn.Module):
    """The model of the v0.1 checkpoint's tree."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(8, name="q")(x) + nn.Dense(8, use_bias=False, name="v")(x)
        return nn.Dense(2, use_bias=False, name="head")(h)
