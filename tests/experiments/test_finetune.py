"""Tests of the generative pipeline: presets, loss, generation, loading, end to end."""

import dataclasses
import json
import math
import zlib
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_f32_close, tiny_llama_config
from flax import traverse_util

import genlora_jax as gl
from experiments import data, evaluate, finetune, generate, models, presets, scoring
from genlora_jax import models as gguf

RECORDS = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "2 + 3 = 5. The answer is 5."},
    {"instruction": "Double the number.", "input": "21", "output": "The answer is 42."},
    {"instruction": "Is water wet?", "input": "", "output": "the correct answer is true"},
]
TARGETS = ["q_proj", "k_proj", "v_proj"]

# LLaMA-3-8B, targets q, k, v: (m, n) of q, k, v in each of 32 layers.
LLAMA3_PROJ = [(4096, 4096), (1024, 4096), (1024, 4096)] * 32


@pytest.fixture(scope="module")
def tokenizer():
    return models.tiny_tokenizer(map(finetune.training_text, RECORDS), vocab_size=400)


def _random_llama(config, seed=0):
    """A random Flax Llama, initialised under `jax.jit` (eager init is slow)."""
    from transformers import FlaxLlamaForCausalLM

    model = FlaxLlamaForCausalLM(config, _do_init=False)
    return model, jax.jit(model.init_weights, static_argnums=1)(jax.random.key(seed), (1, 1))


@pytest.fixture(scope="module")
def tiny(tokenizer):
    """A random tiny Llama and its params."""
    config = tiny_llama_config(
        vocab_size=len(tokenizer), max_position_embeddings=256, attention_bias=True
    )
    return _random_llama(config)


def _adapted(base, config):
    """``base`` wrapped with ``config``, every B drawn at random (ΔW ≠ 0)."""
    params = gl.wrap(base, TARGETS, config, rng=jax.random.key(1))

    def perturb(path, leaf):
        if getattr(path[-1], "name", None) == "b":
            key = jax.random.key(zlib.crc32(jax.tree_util.keystr(path).encode()))
            return jax.random.normal(key, leaf.shape) * 0.5
        return leaf

    return jax.tree_util.tree_map_with_path(perturb, params)


# ------------------------------------------------------------------------- presets


def test_smollm2_presets_cover_arc_and_math_with_their_scoring():
    names = [n for n, p in presets.PRESETS.items() if p.model == presets.SMOLLM2]
    assert len(names) == len(presets.SMOLLM2_FAMILIES) * len(presets.SMOLLM2_METHODS)
    arc = presets.get_preset("smollm2-arc-easy-genlora-r8g16")
    assert (arc.scoring, arc.train_format, arc.eval_tasks) == (
        "likelihood",
        "option",
        ("ARC-Easy",),
    )
    assert arc.train_data == "llm_adapters/commonsense/ARC-Easy/train.json"
    math_ = presets.get_preset("smollm2-math-lora-r8")
    assert (math_.scoring, math_.train_format, math_.num_beams) == ("generate", "llm-adapters", 1)
    # SmolLM2's own math family (the shared 3,260 problems), not the 8B models' Math10K
    family = presets.SMOLLM2_FAMILIES["math"]
    assert (
        math_.train_data
        == f"llm_adapters/{family.train_file}"
        != (presets.get_preset("llama3-8b-math-lora-r8").train_data)
    )
    assert (math_.eval_tasks, math_.lr) == (family.tasks, family.baseline_lr)
    for name in names:
        config = presets.PRESETS[name].adapter_config()
        assert config.dropout == (0.0 if isinstance(config, gl.HiRAConfig) else 0.05)


@pytest.mark.lenient
def test_smollm2_dry_run_counts_from_the_gguf_shapes():
    """GenLoRA r8 G16 on q/k/v of SmolLM2 (30 layers, d = 576, k/v out 192):
    per layer (576 + 576) + 2 (576 + 192) latents, 3 · 2 · 8 · 16 · 16 generator
    weights; LoRA r8: 8 · (576 + 576 + 2 (576 + 192))."""
    genlora = finetune.dry_run(presets.get_preset("smollm2-arc-easy-genlora-r8g16"), None)
    lora = finetune.dry_run(presets.get_preset("smollm2-arc-easy-lora-r8"), None)
    per_layer_latents = (576 + 576) + 2 * (576 + 192)
    assert genlora["trainable"] == 30 * (per_layer_latents + 3 * 2 * 8 * 16 * 16)
    assert lora["trainable"] == 30 * 8 * per_layer_latents
    d, v, kv, f = 576, 49_152, 192, 1536
    layer = 2 * d + d * d + 2 * d * kv + d * d + 3 * d * f  # norms, q, k, v, o, MLP
    # the Flax Llama has no tied head: lm_head is a copy of the embedding
    assert genlora["frozen"] == lora["frozen"] == 2 * v * d + 30 * layer + d
    from_file = finetune.dry_run(presets.get_preset("smollm2-arc-easy-lora-r8"), "smollm2")
    assert from_file == lora


def test_registry_names_parse_and_settings_follow_the_paper():
    names = [n for n, p in presets.PRESETS.items() if p.model in presets.MODELS.values()]
    assert len(names) == len(presets.MODELS) * len(presets.FAMILIES) * len(presets.METHODS)
    assert "llama3-8b-math-genlora-r8g16" in names
    for name in names:
        preset = presets.PRESETS[name]
        model_key, family, method = presets.parse_name(name)
        assert (preset.model, preset.family, preset.method) == (
            presets.MODELS[model_key],
            family,
            method,
        )
        genlora = method.startswith("genlora")
        expected_lr = {
            ("math", True): 1e-4,
            ("commonsense", True): 5e-3,
            ("math", False): 3e-4,
            ("commonsense", False): 2e-4,
        }[family, genlora]
        assert preset.lr == expected_lr, name
        assert preset.max_new_tokens == (256 if family == "math" else 32)
        assert (preset.batch_size, preset.micro_batch_size, preset.grad_accum) == (16, 4, 4)
        assert (preset.cutoff_len, preset.num_beams, preset.warmup_steps) == (256, 4, 100)
        assert preset.targets == tuple(TARGETS)
        config = preset.adapter_config()
        assert config.dropout == (0.0 if isinstance(config, gl.HiRAConfig) else 0.05)
        assert config.rank == preset.adapter["rank"]
    with pytest.raises(ValueError, match="not '\\{model\\}-\\{family\\}-\\{method\\}'"):
        presets.parse_name("llama3-8b-math-nosuchmethod")
    with pytest.raises(KeyError, match="close matches"):
        presets.get_preset("llama3-8b-math-genlora-r8g17")


def test_missing_adapter_class_fails_only_when_asked():
    preset = dataclasses.replace(presets.PRESETS["gemma-7b-math-lora-r8"], adapter_method="nosuch")
    with pytest.raises(ValueError, match=r"needs the method 'nosuch'"):
        preset.adapter_config()


@pytest.mark.lenient
@pytest.mark.parametrize(
    "method, expected",
    [
        # m + n + 2·r·G·(K + 1) per projection (GENLORA.md §2).
        ("genlora-r8g16", sum(m + n + 2 * 8 * 16 * 16 for m, n in LLAMA3_PROJ)),
        ("lora-r8", sum(8 * (m + n) for m, n in LLAMA3_PROJ)),
    ],
)
def test_llama3_8b_trainable_counts_from_shapes(method, expected):
    counts = finetune.dry_run(presets.PRESETS[f"llama3-8b-math-{method}"], model=None)
    assert counts["trainable"] == expected
    assert expected == {"genlora-r8g16": 983_040, "lora-r8": 4_718_592}[method]


# -------------------------------------------------------------------------- config


def test_flax_config_maps_qwen2_to_a_biased_llama_and_caps_positions():
    from transformers import LlamaConfig, Qwen2Config

    fields = dict(presets.ARCHITECTURES["qwen2.5-14b"])
    assert fields.pop("model_type") == "qwen2"
    qwen = Qwen2Config(**fields, rope_theta=1e6, max_position_embeddings=131072)
    llama = models.flax_config(qwen)
    assert isinstance(llama, LlamaConfig)
    assert llama.attention_bias and llama.rope_theta == 1e6
    assert (llama.hidden_size, llama.num_key_value_heads) == (5120, 8)
    assert llama.max_position_embeddings == models.MAX_POSITIONS
    scaled = LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(NotImplementedError, match="rope_scaling"):
        models.flax_config(scaled)


def test_rope_sin_cos_matches_transformers_table_and_the_formula():
    from transformers.models.llama import modeling_flax_llama

    positions = jnp.arange(64)[None]
    sin, cos = gguf.rope_sin_cos(positions, 16, 10000.0)
    table = np.asarray(modeling_flax_llama.create_sinusoidal_positions(64, 16))
    # the table rounds a float64 angle, rope_sin_cos forms it in float32 (as torch
    # does): an ulp of angles below 64 rad is at most 4e-6
    np.testing.assert_allclose(sin[0], table[:, :, :16], rtol=0, atol=1e-5)
    np.testing.assert_allclose(cos[0], table[:, :, 16:], rtol=0, atol=1e-5)
    sin, cos = gguf.rope_sin_cos(jnp.array([[37]]), 8, 5e5)
    pos, i = 37, 3  # frequency index i < d/2, repeated at i + d/2
    angle = pos * 5e5 ** (-2 * i / 8)
    np.testing.assert_allclose(sin[0, 0, 0, [i, i + 4]], math.sin(angle), rtol=1e-6)
    np.testing.assert_allclose(cos[0, 0, 0, [i, i + 4]], math.cos(angle), rtol=1e-6)


@pytest.mark.lenient
def test_patched_llama_rotary_embedding_uses_rope_theta(key):
    """After the patch, the module every Flax Llama attention builds rotates by θ."""
    from transformers.models.llama import modeling_flax_llama

    gguf.patch_llama_rope()
    config = tiny_llama_config(rope_theta=5e5)  # head_dim 16
    x = jax.random.normal(key, (1, 5, 4, 16))  # (batch, positions, heads, head_dim)
    positions = jnp.arange(5)[None]
    rotary = modeling_flax_llama.FlaxLlamaRotaryEmbedding(config)
    k, _ = rotary.apply({}, x, x, positions)
    # Naive RoPE (rotate-half layout): pairs (i, i + d/2) turn by p·θ^(−2i/d).
    angle = np.arange(5)[:, None] * 5e5 ** (-2 * np.arange(8) / 16)
    cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
    lo, hi = np.asarray(x[..., :8]), np.asarray(x[..., 8:])
    expected = np.concatenate([lo * cos - hi * sin, hi * cos + lo * sin], axis=-1)
    np.testing.assert_allclose(k, expected, atol=1e-5)


# --------------------------------------------------------------------------- load


def _torch_named(params):
    """Flax Llama params → PyTorch-named numpy tensors (kernels transposed)."""
    out = {}
    for key, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(value)
        if key[-1] == "kernel":
            value = np.ascontiguousarray(value.T)
        leaf = "bias" if key[-1] == "bias" else "weight"
        out[".".join((*key[:-1], leaf))] = value
    return out


@pytest.mark.lenient
def test_sharded_qwen2_checkpoint_loads_as_a_biased_llama(tmp_path, tokenizer, tiny):
    """Qwen2 naming (q/k/v biases, no o_proj bias), two shards plus an index."""
    from safetensors.numpy import save_file
    from transformers import FlaxLlamaForCausalLM, Qwen2Config

    llama, params = tiny[0].config, tiny[1]
    tensors = {k: v for k, v in _torch_named(params).items() if not k.endswith("o_proj.bias")}
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    names = sorted(tensors)
    shards = {"model-00001.safetensors": names[::2], "model-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / file, metadata={"format": "pt"})
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    Qwen2Config(
        **{f: getattr(llama, f) for f in fields},
        num_key_value_heads=llama.num_key_value_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
    ).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    model, loaded, loaded_tokenizer = models.load_pretrained(str(tmp_path), jnp.float32)
    assert isinstance(model, FlaxLlamaForCausalLM) and model.config.attention_bias
    assert loaded_tokenizer.eos_token_id == tokenizer.eos_token_id
    flat, want = traverse_util.flatten_dict(loaded), traverse_util.flatten_dict(params)
    assert set(flat) == set(want)
    for key, value in want.items():
        expected = np.zeros_like(value) if key[-2:] == ("o_proj", "bias") else value
        np.testing.assert_array_equal(flat[key], expected, err_msg="/".join(key))

    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, tmp_path / "one.safetensors", metadata={"format": "pt"})
    _, shapes = models.init_model(llama)
    with pytest.raises(ValueError, match="up_proj/kernel"):
        models.load_safetensors_params([tmp_path / "one.safetensors"], shapes, llama)


def test_missing_model_folder_says_pass_a_local_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?i)pass --model with a local folder"):
        models.resolve_model_folder(str(tmp_path / "nowhere"))


# --------------------------------------------------------------------------- loss


def _naive_loss(logits, ids, first, length):
    """Mean of −log p(ids[t] | ids[:t]) for first ≤ t < length, one sequence."""
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    terms = [-float(logp[t - 1, ids[t]]) for t in range(max(first, 1), length)]
    return sum(terms) / len(terms)


@pytest.mark.lenient
def test_causal_lm_loss_masks_the_prompt_unless_train_on_inputs(tokenizer, tiny):
    model, base = tiny
    params = _adapted(base, gl.LoRAConfig(rank=4))
    record = RECORDS[0]
    prompt_len = len(tokenizer(data.alpaca_prompt(record["instruction"]))["input_ids"])
    loss_fn = jax.jit(finetune.causal_lm_loss(model))
    losses = {}
    for on_inputs in (False, True):
        example = data.tokenize_for_causal_lm(record, tokenizer, 128, train_on_inputs=on_inputs)
        batch = data.pad_batch([example], 128, tokenizer.pad_token_id)
        if not on_inputs:  # the same tokens either way; only the labels differ
            logits = gl.apply(model, params, batch["input_ids"], batch["attention_mask"]).logits
        first = 0 if on_inputs else prompt_len
        expected = _naive_loss(logits[0], batch["input_ids"][0], first, len(example["input_ids"]))
        losses[on_inputs] = float(loss_fn(params, batch, None))
        np.testing.assert_allclose(losses[on_inputs], expected, rtol=1e-5)
    assert abs(losses[True] - losses[False]) > 1e-3


@pytest.mark.lenient
@pytest.mark.parametrize("head", ["float", "nf4"])
def test_chunked_loss_equals_the_whole_logits_loss(tokenizer, tiny, head):
    """``causal_lm_loss(model, chunk=N)`` (hidden states, then the head N
    positions at a time, each chunk's logits recomputed under `jax.checkpoint`,
    or with ``fused=True`` its gradient taken in the forward scan) gives
    the loss and adapter gradients of the whole-logits loss, with a chunk that
    does not divide B·T (padding) and with a quantized head kernel."""
    model, base = tiny
    if head == "nf4":  # every kernel whose input size 64 divides, lm_head included
        base = gl.quant.quantize_base(base)
        assert isinstance(base["lm_head"]["kernel"], gl.quant.QuantizedKernel)
    params = _adapted(base, gl.GenLoRAConfig(rank=4, groups=4))
    frozen, adapters = gl.split(params)
    examples = [data.tokenize_for_causal_lm(r, tokenizer, 64, False) for r in RECORDS[:3]]
    batch = data.pad_batch(examples, 64, tokenizer.pad_token_id)
    assert batch["input_ids"].size % 7 and batch["loss_mask"].sum() < batch["loss_mask"].size

    def value_and_grad(chunk, fused=False):
        loss_fn = finetune.causal_lm_loss(model, chunk=chunk, fused=fused)
        return jax.jit(jax.value_and_grad(lambda a: loss_fn(gl.join(frozen, a), batch, None)))(
            adapters
        )

    whole, g_whole = value_and_grad(0)
    vocab = model.config.vocab_size
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_whole)) > 0
    for fused in (True, False):
        chunked, g_chunked = value_and_grad(7, fused)
        assert_f32_close(chunked, whole, terms=vocab, layers=model.config.num_hidden_layers)
        for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_whole), strict=True):
            assert_f32_close(a, b, terms=batch["input_ids"].size * vocab, layers=2)
    # cut by the vocabulary instead: slices of at most vocab // 3 + 1 words
    loss_fn = finetune.causal_lm_loss(model, vocab_rows=vocab // 3 + 1)
    sliced, g_sliced = jax.jit(
        jax.value_and_grad(lambda a: loss_fn(gl.join(frozen, a), batch, None))
    )(adapters)
    assert_f32_close(sliced, whole, terms=vocab, layers=model.config.num_hidden_layers)
    for a, b in zip(jax.tree.leaves(g_sliced), jax.tree.leaves(g_whole), strict=True):
        assert_f32_close(a, b, terms=batch["input_ids"].size * vocab, layers=2)
    with pytest.raises(ValueError, match="by positions or by the vocabulary, not both"):
        finetune.causal_lm_loss(model, chunk=7, vocab_rows=64)
    with pytest.raises(ValueError, match="fused=True applies to the chunked loss"):
        finetune.causal_lm_loss(model, vocab_rows=64, fused=True)


@pytest.mark.parametrize("head", ["float", "nf4"])
def test_vocab_sliced_head_loss_gives_every_gradient(head):
    """`vocab_sliced_head_loss` (an online log-sum-exp over slices of the
    vocabulary, slices that do not divide it evenly asked for) gives the
    whole-logits loss and its gradients with respect to the hidden states and
    the head (a quantized head's scales too)."""
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, 5, 64)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(64, 96)) * 0.5, jnp.float32)
    if head == "nf4":
        kernel = gl.quant.quantize_nf4(kernel)
    labels = jnp.asarray(rng.integers(0, 96, (2, 5))).at[0, 0].set(95)  # the last word
    mask = jnp.ones((2, 5)).at[1, 3:].set(0)

    def whole(h, k):
        w = k.dequantize() if head == "nf4" else k
        ce = optax.softmax_cross_entropy_with_integer_labels(h @ w, labels)
        return jnp.sum(ce * mask)

    def floats(grad_k):  # the head's float leaves (a quantized head: its scales)
        return grad_k.scales if head == "nf4" else grad_k

    want_value = whole(hidden, kernel)
    want = jax.grad(whole, argnums=(0, 1), allow_int=True)(hidden, kernel)
    # 1 slice; 3 of 32; 5 of 20; 7 of 14, the last overlapping the one before by 2
    for rows in (96, 32, 20, 14):

        def sliced(h, k, rows=rows):
            return finetune.vocab_sliced_head_loss(h, k, labels, mask, rows)

        assert_f32_close(sliced(hidden, kernel), want_value, terms=96, layers=2)
        got = jax.grad(sliced, argnums=(0, 1), allow_int=True)(hidden, kernel)
        assert_f32_close(got[0], want[0], terms=96 * 64, layers=2)
        assert_f32_close(floats(got[1]), floats(want[1]), terms=10 * 64, layers=2)
    # a counted label outside the vocabulary is NaN (as the whole-logits loss);
    # an uncounted one, such as -100, is ignored
    bad = labels.at[1, 4].set(-100)
    assert np.isfinite(finetune.vocab_sliced_head_loss(hidden, kernel, bad, mask, 32))
    nan = finetune.vocab_sliced_head_loss(hidden, kernel, labels.at[0, 1].set(96), mask, 32)
    assert np.isnan(nan)
    with pytest.raises(ValueError, match="at least one word"):
        finetune.vocab_sliced_head_loss(hidden, kernel, labels, mask, 0)


def test_fused_head_loss_gives_every_gradient_and_skips_the_head_recompute_when_frozen():
    """Fused or not, `chunked_head_loss` gives the whole-logits gradients with
    respect to the hidden states and the head kernel. With the head frozen
    (gradients for the hidden states only), the fused backward pass does not
    recompute the logits: XLA counts about 2/3 of the flops of the default."""
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(8, 64)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 64, (2, 5)))
    mask = jnp.ones((2, 5)).at[1, 3:].set(0)

    def whole(h, k):
        ce = optax.softmax_cross_entropy_with_integer_labels(h @ k, labels)
        return jnp.sum(ce * mask)

    want = jax.grad(whole, argnums=(0, 1))(hidden, kernel)
    flops = {}
    for fused in (True, False):

        def chunked(h, k, fused=fused):
            return finetune.chunked_head_loss(h, k, labels, mask, 3, fused=fused)

        got = jax.grad(chunked, argnums=(0, 1))(hidden, kernel)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        # the training step's shape: the loss's value, and gradients for the hidden states only
        frozen = jax.jit(jax.value_and_grad(chunked)).lower(hidden, kernel).compile()
        flops[fused] = frozen.cost_analysis()["flops"]
    # per chunk, unfused: logits, logits again, the backward matmul; fused: logits, backward
    assert flops[True] < 0.75 * flops[False]
    # a bfloat16 model: the fused gradient keeps the hidden states' dtype, so a
    # bfloat16 op before the loss (here a scale, as the final RMSNorm) transposes
    scale = jnp.full((1, 1, 8), 1.5, jnp.bfloat16)
    grads = {}
    for fused in (True, False):

        def scaled(s, fused=fused):
            h = hidden.astype(jnp.bfloat16) * s
            return finetune.chunked_head_loss(h, kernel, labels, mask, 3, jnp.bfloat16, fused=fused)

        grads[fused] = jax.grad(scaled)(scale)
        assert grads[fused].dtype == jnp.bfloat16
    np.testing.assert_allclose(
        grads[True].astype(np.float32), grads[False].astype(np.float32), rtol=2e-2
    )


@pytest.mark.lenient
def test_chunked_loss_refuses_an_adapted_head(tiny):
    model, base = tiny
    params = gl.wrap(base, ["lm_head"], gl.LoRAConfig(rank=2))
    ids = jnp.ones((1, 8), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": ids, "labels": ids, "loss_mask": ids}
    with pytest.raises(ValueError, match=r"lm_head.*the whole-logits loss"):
        finetune.causal_lm_loss(model, chunk=4)(params, batch, None)


# --------------------------------------------------------------------- generation


def _naive_greedy(model, params, tokenizer, prompts, steps, length=128):
    """Argmax decoding by re-running the adapted model on the whole sequence.

    Rows are right-padded to ``length``; causal attention keeps the padding
    out of every position that is read.
    """
    forward = jax.jit(lambda ids: gl.apply(model, params, ids).logits)
    seqs = [list(tokenizer(prompt)["input_ids"]) for prompt in prompts]
    for _ in range(steps):
        ids = np.full((len(seqs), length), tokenizer.pad_token_id, np.int32)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = seq
        logits = np.asarray(forward(ids))
        for row, seq in enumerate(seqs):
            seq.append(int(np.argmax(logits[row, len(seq) - 1])))
    out = []
    for prompt, seq in zip(prompts, seqs, strict=True):
        new = seq[len(tokenizer(prompt)["input_ids"]) :]
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        out.append(tokenizer.decode(new, skip_special_tokens=True))
    return out


@pytest.mark.lenient
@pytest.mark.parametrize(
    "config", [gl.LoRAConfig(rank=4), gl.AuroRAConfig(rank=4)], ids=["lora", "aurora"]
)
def test_batched_greedy_generation_matches_naive_decoding(tokenizer, tiny, config):
    """LoRA decodes merged; AuroRA cannot merge and decodes through the interceptor."""
    model, base = tiny
    params = _adapted(base, config)
    assert gl.inference_params(params)[1] == isinstance(config, gl.AuroRAConfig)
    prompts = [data.alpaca_prompt(r["instruction"], r["input"]) for r in RECORDS]
    out = generate.generate(
        model, params, tokenizer, prompts, max_new_tokens=6, num_beams=1, batch_size=4
    )
    assert all(isinstance(text, str) for text in out)
    assert out == _naive_greedy(model, params, tokenizer, prompts, 6)


@pytest.mark.lenient
def test_beam_search_with_left_padding_equals_one_prompt_at_a_time(tokenizer, tiny):
    model, base = tiny
    tree, _ = gl.inference_params(_adapted(base, gl.LoRAConfig(rank=4)))
    seqs = [
        tokenizer(data.alpaca_prompt(r["instruction"], r["input"]))["input_ids"] for r in RECORDS
    ]
    decode = generate._decoder(model, 5, 4, tokenizer.pad_token_id, tokenizer.eos_token_id, False)
    batched = np.asarray(decode(tree, *generate.left_pad(seqs, 64, tokenizer.pad_token_id)))
    for row, seq in enumerate(seqs[:2]):
        alone = generate.left_pad([seq], 64, tokenizer.pad_token_id, rows=len(seqs))
        np.testing.assert_array_equal(np.asarray(decode(tree, *alone))[0], batched[row])


def test_left_pad_layout():
    ids, mask = generate.left_pad([[5, 6, 7], [8]], 4, pad_id=0, rows=3)
    np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 8], [0, 5, 6, 7]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1], [0, 1, 1, 1]])


class ScriptedLM:
    """A stand-in causal LM whose every continuation is a fixed token list."""

    def __init__(self, script):
        self.script = jnp.asarray(script, jnp.int32)
        self.config = SimpleNamespace(max_position_embeddings=None)

    def generate(self, input_ids, generation_config, attention_mask, params):
        new = jnp.full((generation_config.max_new_tokens,), generation_config.pad_token_id)
        new = new.at[: len(self.script)].set(self.script[: len(new)])
        tail = jnp.broadcast_to(new, (input_ids.shape[0], len(new)))
        return SimpleNamespace(sequences=jnp.concatenate([input_ids, tail], axis=1))


def test_score_tasks_scores_each_task_by_the_protocol(tokenizer):
    text = "the correct answer is true. The answer is 7."
    script = [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    script += tokenizer(" 9", add_special_tokens=False)["input_ids"]  # after EOS: ignored
    tasks = {
        "gsm8k": [
            {"instruction": "How many?", "input": "", "answer": "7.0"},
            {"instruction": "How many more?", "input": "", "answer": "8"},
        ],
        "boolq": [
            {"instruction": "Is it?", "input": "", "answer": "true"},
            {"instruction": "Is it not?", "input": "", "answer": "false"},
            {"instruction": "Is it so?", "input": "", "answer": "true"},
        ],
    }
    params = gl.wrap({"q_proj": {"kernel": jnp.zeros((8, 8))}}, ["q_proj"], gl.LoRAConfig(rank=2))
    scores = evaluate.score_tasks(
        ScriptedLM(script),
        params,
        tokenizer,
        tasks,
        "generate",
        max_new_tokens=len(script) + 2,
        num_beams=1,
        batch_size=2,
    )
    result = evaluate.accuracies(scores)
    assert result == pytest.approx({"gsm8k": 0.5, "boolq": 2 / 3, "average": (0.5 + 2 / 3) / 2})
    responses = scores["gsm8k"].responses
    assert responses == [text, text]
    assert scoring.extract_answer("gsm8k", responses[0]) == 7.0
    assert scores["boolq"].likelihood is None and scores["boolq"].metrics()["protocol_acc"] == 2 / 3


# --------------------------------------------------------------------- end to end


@pytest.mark.lenient
@pytest.mark.slow
def test_tiny_preset_end_to_end(tmp_path, data_dir):
    train = json.loads((data_dir / "llm_adapters/math/train_math_data.json").read_text())
    (tmp_path / "train.json").write_text(json.dumps(train[:64]))
    out = tmp_path / "run"
    results = finetune.main(
        [
            "--preset=tiny-llama-math-genlora",
            f"--data={tmp_path / 'train.json'}",
            "--steps=2",
            "--eval-limit=4",
            "--max-new-tokens=16",
            "--greedy",
            "--checkpoint-every=1",
            f"--out={out}",
        ]
    )
    saved = json.loads((out / "results.json").read_text())
    assert saved == results
    with gl.AdapterCheckpointer((out / "checkpoints").absolute()) as ckpt:
        # Checkpoints count micro-steps: 2 updates of grad_accum micro-batches.
        micro = 2 * presets.get_preset("tiny-llama-math-genlora").grad_accum
        assert ckpt.latest_step() == micro and len(ckpt.all_steps()) == min(3, micro)
    assert set(saved["accuracy"]) == {*presets.MATH_TASKS, "average"}
    assert all(0.0 <= v <= 1.0 for v in saved["accuracy"].values())
    assert math.isfinite(saved["final_loss"]) and saved["decoding"] == "greedy"
    rows = (out / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 4 * len(presets.MATH_TASKS)
    assert (out / "loss.png").is_file() and (out / "metrics.jsonl").is_file()
    # q: m = n = 64; k, v: m = 32, n = 64; two layers; r = 8, G = 16, K = 15.
    per_layer = sum(m + n + 2 * 8 * 16 * 16 for m, n in [(64, 64), (32, 64), (32, 64)])
    assert saved["trainable_params"] == 2 * per_layer


@pytest.mark.lenient
def test_zero_shot_scores_the_pretrained_model_without_training(tmp_path, data_dir):
    """``--zero-shot``: no step runs (no metrics, no trainable parameters
    reported); the adapters stay at their init, where ΔW = 0 (checked in
    tests/library), so what is scored is the pretrained model."""
    train = json.loads((data_dir / "llm_adapters/math/train_math_data.json").read_text())
    (tmp_path / "train.json").write_text(json.dumps(train[:8]))
    out = tmp_path / "run"
    argv = ["--preset=tiny-llama-math-genlora", f"--data={tmp_path / 'train.json'}"]
    argv += ["--tasks", "AddSub", "--eval-limit=2", "--max-new-tokens=4", "--greedy"]
    results = finetune.main([*argv, "--zero-shot", f"--out={out}"])
    assert (results["method"], results["steps"], results["trainable_params"]) == ("zero-shot", 0, 0)
    assert results["final_loss"] is None and not (out / "metrics.jsonl").exists()
    trained = finetune.main([*argv, "--steps=1", f"--out={tmp_path / 'one-step'}"])
    assert trained["steps"] == 1 and trained["final_loss"] is not None
