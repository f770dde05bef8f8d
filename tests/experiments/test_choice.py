"""Option-likelihood scoring: option parsing on every shared file, the training
format, and the batched scorer against a naive per-option reference."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_llama_config

import genlora_jax as gl
from experiments import choice, data, llm

ARC = {
    "instruction": "Please choose the correct answer to the question: Which is a gas?\n\n"
    "Answer1: ice Answer2: steam Answer3: wood Answer4: iron\n\n"
    "Answer format: answer1/answer2/answer3/answer4",
    "input": "",
    "output": "the correct answer is answer2",
    "answer": "answer2",
}


def test_parse_arc_boolq_piqa_and_winogrande():
    assert choice.parse_choice(ARC) == choice.Choice(
        "Which is a gas?", ("ice", "steam", "wood", "iron"), 1
    )
    boolq = {
        "instruction": "Please answer the following question with true or false, question: "
        "is the sky blue?\n\nAnswer format: true/false",
        "answer": "false",
    }
    assert choice.parse_choice(boolq) == choice.Choice("is the sky blue?", ("true", "false"), 1)
    piqa = {
        "instruction": "Please choose the correct solution to the question: Open a jar?\n\n"
        "Solution1: Twist the lid.\n\nSolution2: Eat the lid.\n\n"
        "Answer format: solution1/solution2",
        "answer": "solution1",
    }
    assert choice.parse_choice(piqa).options == ("Twist the lid.", "Eat the lid.")
    wino = {
        "instruction": "Please choose the correct answer to fill in the blank to complete the "
        "given sentence: Sarah beat Maria so _ won.\n\nOption1: Sarah Option2: Maria "
        "Answer format: option1/option2",
        "answer": "option1",
    }
    assert choice.parse_choice(wino) == choice.Choice(
        "Sarah beat Maria so _ won.", ("Sarah", "Maria"), 0
    )


def test_every_shared_multiple_choice_file_parses(data_dir):
    files = sorted((data_dir / "llm_adapters" / "commonsense").glob("*/*.json"))
    assert len(files) >= 9
    for path in files:
        for record in json.loads(path.read_text()):
            c = choice.parse_choice(record)
            assert 2 <= len(c.options) <= 5 and 0 <= c.answer < len(c.options), path


def test_non_choice_and_inconsistent_records_are_refused():
    with pytest.raises(ValueError, match="not an LLM-Adapters multiple-choice instruction"):
        choice.parse_choice({"instruction": "What is 2 + 2?", "answer": "4"})
    bad = {**ARC, "instruction": ARC["instruction"].replace("Answer3: wood ", "")}
    with pytest.raises(ValueError, match=r"options \[1, 2, 4\] do not match the answer format"):
        choice.parse_choice(bad)


class _CharTokenizer:
    """Characters as ids (1 + byte), BOS 1 when special tokens are on, EOS 2."""

    eos_token_id, pad_token_id = 2, 0

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + (ord(c) % 120) for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_option_example_trains_on_the_answer_only():
    tok = _CharTokenizer()
    ex = choice.option_example(ARC, tok, cutoff_len=256)
    prompt = tok(choice.prompt("Which is a gas?"))["input_ids"]
    answer = tok(" steam", add_special_tokens=False)["input_ids"] + [2]
    assert ex["input_ids"] == prompt + answer
    assert ex["labels"] == [data.IGNORE_INDEX] * len(prompt) + answer
    short = choice.option_example(ARC, tok, cutoff_len=10)  # the prompt is cut from the left
    assert short["input_ids"] == (prompt + answer)[-10:] and short["labels"][-7:] == answer


@pytest.mark.lenient
def test_scores_equal_a_naive_per_option_log_likelihood(key):
    from transformers import FlaxLlamaForCausalLM

    model = FlaxLlamaForCausalLM(tiny_llama_config(), seed=0)
    params = gl.wrap(model.params, ["q_proj", "v_proj"], gl.LoRAConfig(rank=2), rng=key)
    tok = _CharTokenizer()
    three = {
        "instruction": "Please choose the correct answer to the question: Which is wet?\n\n"
        "Answer1: water Answer2: sand Answer3: dust\n\nAnswer format: answer1/answer2/answer3",
        "answer": "answer1",
    }
    records = [ARC, {**ARC, "answer": "answer4"}, three]  # 4, 4 and 3 options: padded rows
    got = choice.score_choices(model, params, tok, records, questions_per_batch=2)

    def naive(c):
        """log p(option | prompt), one unpadded sequence at a time."""
        sums = []
        for option in c.options:
            ctx = tok(choice.prompt(c.question))["input_ids"]
            cont = tok(" " + option, add_special_tokens=False)["input_ids"]
            ids = jnp.array([ctx + cont])
            logp = jax.nn.log_softmax(model(ids, params=model.params).logits[0], -1)
            sums.append(sum(float(logp[len(ctx) + i - 1, t]) for i, t in enumerate(cont)))
        sums = np.array(sums)
        return int(np.argmax(sums)), int(np.argmax(sums / [len(o) for o in c.options]))

    want = [naive(choice.parse_choice(r)) for r in records]
    assert got.predictions == want
    answers = [choice.parse_choice(r).answer for r in records]
    assert got.acc == np.mean([p[0] == a for p, a in zip(want, answers, strict=True)])
    assert got.n == 3 and got.chance == pytest.approx((1 / 4 + 1 / 4 + 1 / 3) / 3)
    assert got.stderr(0.5) == pytest.approx(np.sqrt(0.25 / 3))


def test_llm_train_validation_split_is_disjoint_and_fixed():
    records = [{"id": i} for i in range(50)]
    train, val = llm.split_train(records, 20, 10)
    assert len(train) == 20 and len(val) == 10
    assert not {r["id"] for r in train} & {r["id"] for r in val}
    assert llm.split_train(records, 20, 10) == (train, val)
    assert len(llm.split_train(records, 0, 10)[0]) == 40
    with pytest.raises(ValueError, match=r"exceed the 50 training records"):
        llm.split_train(records, 45, 10)


def test_llm_batches_are_bucketed_and_a_function_of_the_step():
    tok = _CharTokenizer()
    examples = [choice.option_example(ARC, tok) for _ in range(5)]
    examples += [choice.option_example({**ARC, "answer": "answer1"}, tok) for _ in range(5)]
    batches = llm.make_batches(examples, 4, tok.pad_token_id, seed=0)
    first = batches(3)
    assert first["input_ids"].shape[1] % llm.BUCKET == 0
    for k, v in batches(3).items():
        np.testing.assert_array_equal(v, first[k])
