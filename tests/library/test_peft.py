"""PEFT export/import and merged export, checked against torch `peft` on MiniLM.

The torch tests need the test extras ``torch`` (CPU) and ``peft``; they are
skipped with the install command when those are missing.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf
from conftest import assert_f32_close, perturbed
from flax import traverse_util

import genlora_jax as gl

INSTALL = 'pip install peft "torch==2.13.0"  (CPU wheel; the PEFT comparison tests need both)'
QKV = ["query", "key", "value"]


def needs_torch_peft():
    pytest.importorskip("torch", reason=INSTALL)
    return pytest.importorskip("peft", reason=INSTALL)


def random_like(shapes, seed=0):
    """Random params of the given shapes (NumPy: no init compile); norm scales 1."""
    weights = np.random.default_rng(seed)

    def leaf(path, s):
        if path[-1].key == "scale":
            return np.ones(s.shape, s.dtype)
        return (0.1 * weights.standard_normal(s.shape)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def without_updates(params):
    """The same tree with every adapter zeroed, so ΔW = 0 (LoRA, GenLoRA, DoRA) and
    a jitted forward reuses its compilation."""
    flat = traverse_util.flatten_dict(params)
    zero = {
        k: jax.tree.map(jnp.zeros_like, v) if isinstance(v, gl.methods.Adapter) else v
        for k, v in flat.items()
    }
    return traverse_util.unflatten_dict(zero)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return tf.FlaxBertModel.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def inputs():
    ids = np.random.default_rng(0).integers(1000, 30000, (2, 12))
    mask = np.ones((2, 12), np.int64)
    mask[1, 8:] = 0
    return ids, mask


def flax_hidden(model, params, inputs):
    ids, mask = inputs
    return np.asarray(_hidden(model, params, ids, mask))


@functools.partial(jax.jit, static_argnums=0)
def _hidden(model, params, ids, mask):
    return gl.apply(model, params, ids, attention_mask=mask).last_hidden_state


def torch_hidden(torch_model, inputs):
    import torch

    ids, mask = (torch.from_numpy(x) for x in inputs)
    with torch.no_grad():
        return torch_model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()


@pytest.fixture(scope="module")
def genlora_params(minilm):
    """GenLoRA r8 on Q, K; LoRA r4 (α = 3) on V: rank and α patterns in the export."""
    params = gl.wrap(
        minilm.params,
        QKV,
        gl.GenLoRAConfig(rank=8, groups=16),
        overrides={"value": gl.LoRAConfig(rank=4, alpha=3.0)},
    )
    return perturbed(params, 1, 0.1)


@pytest.mark.lenient
def test_genlora_exports_as_the_lora_it_generates(
    minilm, minilm_path, genlora_params, inputs, tmp_path
):
    peft = needs_torch_peft()
    config = gl.peft.export_peft(genlora_params, tmp_path, base_model_name_or_path="MiniLM-L6")
    assert config["target_modules"] == ["key", "query", "value"]
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (8, 16, False)
    assert config["rank_pattern"]["encoder.layer.5.attention.self.value"] == 4
    assert config["alpha_pattern"]["encoder.layer.0.attention.self.value"] == 3
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == config

    torch_model = peft.PeftModel.from_pretrained(
        tf.BertModel.from_pretrained(minilm_path), tmp_path
    )
    ours = flax_hidden(minilm, genlora_params, inputs)
    theirs = torch_hidden(torch_model.eval(), inputs)
    base = flax_hidden(minilm, without_updates(genlora_params), inputs)
    assert np.abs(ours - base).max() > 0.1  # the adapters matter
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)

    imported = gl.peft.import_peft(minilm.params, tmp_path)
    for path, adapter in gl.named_adapters(genlora_params).items():
        lora = gl.named_adapters(imported)[path]
        b, a = adapter.factors()
        assert isinstance(lora, gl.methods.LoRAParams) and lora.config.scale == adapter.config.scale
        np.testing.assert_array_equal(lora.a, a)
        np.testing.assert_array_equal(lora.b, b)


@pytest.mark.lenient
def test_adapter_trained_with_peft_imports(minilm, minilm_path, inputs, tmp_path):
    """A PEFT-written adapter (random A and B, rank and α patterns) computes the same here."""
    peft = needs_torch_peft()
    import torch

    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=QKV,
        rank_pattern={"value": 4},
        alpha_pattern={"value": 3},
        init_lora_weights=False,  # B random too, so ΔW ≠ 0
    )
    torch_model = peft.get_peft_model(tf.BertModel.from_pretrained(minilm_path), config).eval()
    torch_model.save_pretrained(tmp_path)
    imported = gl.peft.import_peft(minilm.params, tmp_path)
    value = gl.named_adapters(imported)["encoder/layer/3/attention/self/value"]
    assert (value.config.rank, value.config.scale) == (4, 0.75)
    ours = flax_hidden(minilm, imported, inputs)
    assert np.abs(ours - flax_hidden(minilm, without_updates(imported), inputs)).max() > 0.1
    np.testing.assert_allclose(torch_hidden(torch_model, inputs), ours, atol=1e-4, rtol=0)


@pytest.mark.lenient
def test_module_prefix_targets_a_model_with_a_head(minilm_path, genlora_params, tmp_path):
    peft = needs_torch_peft()
    gl.peft.export_peft(genlora_params, tmp_path, module_prefix="bert.")
    classifier = tf.BertForSequenceClassification.from_pretrained(minilm_path, num_labels=3)
    loaded = peft.PeftModel.from_pretrained(classifier, tmp_path)
    adapted = [n for n, _ in loaded.named_modules() if n.endswith("attention.self.query")]
    assert len(adapted) == 6 and adapted[0].startswith("base_model.model.bert.encoder.layer.0")
    with pytest.raises(ValueError, match=r"have no kernel at 'bert/encoder.*check module_prefix"):
        gl.peft.import_peft(gl.split(genlora_params)[0], tmp_path)
    imported = gl.peft.import_peft(gl.split(genlora_params)[0], tmp_path, module_prefix="bert.")
    assert sorted(gl.named_adapters(imported)) == sorted(gl.named_adapters(genlora_params))


@pytest.mark.lenient
def test_head_and_dora_through_peft(minilm, minilm_path, inputs, tmp_path):
    """DoRA with its magnitude vector, and the task head as modules_to_save."""
    peft = needs_torch_peft()
    import torch

    model = tf.FlaxBertForSequenceClassification(
        tf.BertConfig.from_pretrained(minilm_path, num_labels=3), _do_init=False
    )
    weights = np.random.default_rng(2)
    head = {
        "kernel": (0.1 * weights.standard_normal((384, 3))).astype(np.float32),
        "bias": np.zeros(3, np.float32),
    }
    base = {"bert": minilm.params, "classifier": head}  # the checkpoint's encoder, a new head
    params = gl.wrap(
        base, ["query", "value"], gl.DoRAConfig(rank=4), extra_trainable=["classifier"]
    )
    params = perturbed(params, 2, 0.1)
    config = gl.peft.export_peft(params, tmp_path, task_type="SEQ_CLS")
    assert config["use_dora"] and config["modules_to_save"] == ["classifier"]

    torch_base = tf.BertForSequenceClassification.from_pretrained(minilm_path, num_labels=3)
    torch_model = peft.PeftModel.from_pretrained(torch_base, tmp_path).eval()
    ids, mask = inputs
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    run = jax.jit(lambda p: gl.apply(model, p, ids, attention_mask=mask).logits)
    ours = np.asarray(run(params))
    np.testing.assert_allclose(theirs.numpy(), ours, atol=1e-4, rtol=0)
    assert np.abs(ours - np.asarray(run(without_updates(params)))).max() > 0.01  # DoRA matters

    imported = gl.peft.import_peft(base, tmp_path)
    for path, dora in gl.named_adapters(params).items():
        back = gl.named_adapters(imported)[path]
        assert isinstance(back, gl.methods.DoRAParams)
        np.testing.assert_array_equal(back.a, dora.a)
        np.testing.assert_array_equal(back.b, dora.b)
        np.testing.assert_allclose(back.magnitude, dora.magnitude, atol=1e-5)
    assert_trees_equal(imported["genlora"], params["genlora"])


@pytest.mark.lenient
def test_gpt2_conv1d_exports_with_fan_in_fan_out(tmp_path):
    """GPT-2's Conv1D stores (in, out) in torch and (out, in) in Flax; PEFT must agree."""
    peft = needs_torch_peft()
    import torch

    config = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=32)
    model = tf.FlaxGPT2Model(config, _do_init=False)
    shapes = jax.eval_shape(
        functools.partial(model.init_weights, input_shape=(1, 1)), jax.random.key(0)
    )
    base = random_like(shapes)
    gl.peft.save_merged(model, base, tmp_path / "base")  # no adapters: the base, torch-readable
    params = perturbed(gl.wrap(base, ["c_attn"], gl.GenLoRAConfig(rank=4, groups=4)), 3, 0.1)
    config = gl.peft.export_peft(params, tmp_path / "adapter")
    assert config["fan_in_fan_out"] and config["target_modules"] == ["c_attn"]

    torch_base = tf.GPT2Model.from_pretrained(tmp_path / "base")
    torch_model = peft.PeftModel.from_pretrained(torch_base, tmp_path / "adapter").eval()
    ids = np.random.default_rng(0).integers(0, 128, (2, 10))
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    run = jax.jit(lambda p: gl.apply(model, p, ids).last_hidden_state)
    ours = np.asarray(run(params))
    assert np.abs(ours - np.asarray(run(without_updates(params)))).max() > 0.1
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def small_base(seed=0):
    """A Llama-like tree with a decoy ``other/q_proj`` and a head (NumPy: no compiles)."""
    weights = np.random.default_rng(seed)

    def dense(n, m):
        return {
            "kernel": weights.standard_normal((n, m)).astype(np.float32),
            "bias": np.zeros(m, np.float32),
        }

    layers = {str(i): {"q_proj": dense(32, 32), "v_proj": dense(32, 16)} for i in range(2)}
    return {
        "model": {"layers": layers},
        "norm": {"scale": np.ones(32, np.float32), "bias": np.zeros(32, np.float32)},
        "score": dense(32, 2),
        "other": {"q_proj": dense(32, 32)},
    }


def test_lora_round_trip_is_exact(tmp_path):
    base = small_base()
    params = jax.jit(
        lambda base: gl.wrap(
            base,
            [r"model/layers/\d/(q|v)_proj"],
            gl.LoRAConfig(rank=4, rslora=True, alpha=6.0),
            overrides={r"model/layers/1/v_proj": {"rank": 2}},
            extra_trainable=["score", "norm"],
        )
    )(base)
    params = perturbed(params, 0, 0.1)
    config = gl.peft.export_peft(params, tmp_path)
    # q_proj names would also select other/q_proj, so the paths are listed in full
    assert config["target_modules"] == [
        "model.layers.0.q_proj",
        "model.layers.0.v_proj",
        "model.layers.1.q_proj",
        "model.layers.1.v_proj",
    ]
    assert config["use_rslora"] and config["lora_alpha"] == 6
    assert config["rank_pattern"] == {"model.layers.1.v_proj": 2}
    assert config["modules_to_save"] == ["norm", "score"]
    import safetensors.numpy

    tensors = safetensors.numpy.load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.v_proj.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.model.layers.0.v_proj.lora_B.weight"].shape == (16, 4)
    np.testing.assert_array_equal(
        tensors["base_model.model.score.weight"], params["genlora"]["score"]["kernel"].T
    )

    imported = gl.peft.import_peft(base, tmp_path)
    assert_trees_equal(imported, params)
    for path, adapter in gl.named_adapters(params).items():
        back = gl.named_adapters(imported)[path].config
        assert (back.rank, back.scale) == (adapter.config.rank, adapter.config.scale)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (gl.HiRAConfig(rank=2), "HiRAParams .* no PEFT LoRA form; export the merged model"),
        (gl.LoRANConfig(rank=2), "LoRANParams .*save_merged"),
        (gl.AuroRAConfig(rank=2), "cannot be merged either; serve it with"),
    ],
)
def test_adapters_without_a_lora_form_are_refused(tmp_path, config, message):
    params = gl.wrap(small_base(), ["q_proj"], config)
    with pytest.raises(ValueError, match=message):
        gl.peft.export_peft(params, tmp_path)
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_stacked_adapters_are_refused(tmp_path):
    base = {"layers": {"proj": {"kernel": np.ones((3, 16, 16), np.float32)}}}
    params = gl.wrap(base, ["proj"], gl.LoRAConfig(rank=2), stacked="layers")
    with pytest.raises(ValueError, match=r"layers/proj: the adapter is stacked .*nn.scan"):
        gl.peft.export_peft(params, tmp_path)


def test_import_refuses_what_does_not_fit(tmp_path):
    params = gl.wrap(small_base(), ["q_proj"], gl.LoRAConfig(rank=4))
    gl.peft.export_peft(params, tmp_path)
    other = small_base()
    other["model"]["layers"]["0"]["q_proj"]["kernel"] = jnp.ones((16, 32))
    with pytest.raises(ValueError, match=r"model/layers/0/q_proj: PEFT factors A \(4, 32\)"):
        gl.peft.import_peft(other, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type='IA3'"):
        gl.peft.import_peft(small_base(), tmp_path)


@pytest.mark.lenient
def test_merged_model_loads_with_plain_transformers(minilm, genlora_params, inputs, tmp_path):
    gl.peft.save_merged(minilm, genlora_params, tmp_path)
    ours = flax_hidden(minilm, genlora_params, inputs)
    loaded, params = tf.FlaxBertModel.from_pretrained(tmp_path, _do_init=False)
    ids, mask = inputs
    plain = jax.jit(lambda p: loaded(ids, attention_mask=mask, params=p).last_hidden_state)
    # merged W vs W0 x + ΔW x: float32 rounding through MiniLM's 6 layers (FFN 1536)
    effect = np.abs(ours - flax_hidden(minilm, without_updates(genlora_params), inputs)).max()
    assert_f32_close(plain(params), ours, terms=1536, layers=6, bug=effect)
    pytest.importorskip("torch", reason=INSTALL)
    torch_model, info = tf.BertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    np.testing.assert_allclose(torch_hidden(torch_model.eval(), inputs), ours, atol=1e-4, rtol=0)
