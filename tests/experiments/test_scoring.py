"""Tests of experiments.scoring against hand-written cases of the protocol."""

import json
import math

import pytest

from experiments import scoring
from experiments.data import alpaca_prompt, default_data_dir

MATH_TASKS = ("AddSub", "MultiArith", "SingleEq", "SVAMP", "gsm8k", "mawps", "AQuA")
COMMONSENSE_TASKS = ("boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge")


def test_extract_response_cuts_after_marker():
    full = alpaca_prompt("What is 2 + 2? Answer Choices: (A) 4 (B) 5") + " The answer is A. "
    assert scoring.extract_response(full) == "The answer is A."


def test_extract_response_stops_at_a_second_marker():
    text = "prompt ### Response: 4 ### Instruction: again ### Response: 5"
    assert scoring.extract_response(text) == "4 ### Instruction: again"


def test_extract_response_without_marker_is_the_stripped_text_and_idempotent():
    assert scoring.extract_response("  The answer is 7.\n") == "The answer is 7."
    once = scoring.extract_response(alpaca_prompt("Q") + "A: 3")
    assert scoring.extract_response(once) == once


@pytest.mark.parametrize(
    "response, expected",
    [
        ("The answer is 4.", 4.0),
        ("She paid $1,234 in total.", 1234.0),
        ("1,000,000.5 people", 1000000.5),
        ("7 - 3 = 4 crayons, so the answer is 4", 4.0),
        ("First 12, then 30, the answer is 18.", 18.0),
        ("The temperature fell to -5 degrees.", -5.0),
        ("It is 0.25 of the cake", 0.25),
        ("between 3-5 apples", -5.0),  # the regex reads '-5': protocol, pinned.
        ("no number here", math.inf),
        ("", math.inf),
    ],
)
def test_numeric_extraction_takes_the_last_number(response, expected):
    assert scoring.extract_answer("gsm8k", response) == expected


@pytest.mark.parametrize(
    "response, answer, correct",
    [
        ("The answer is 1,234.", "1234.0", True),
        ("The answer is 4. Then 5 more.", "4.0", False),
        ("The answer is -3.", "-3.0", True),
        ("The answer is 3.", "-3.0", False),
        ("The answer is 2.0005", "2", True),
        ("The answer is 2.002", "2", False),
        ("The answer is 1.8333", "1.8333333333333335", True),
        ("I do not know.", "0", False),
    ],
)
def test_numeric_correctness(response, answer, correct):
    assert scoring.is_correct("SVAMP", response, answer) is correct


def test_numeric_answer_that_is_not_a_number_names_the_task():
    with pytest.raises(ValueError, match="AddSub answers must be numbers, got 'four'"):
        scoring.is_correct("AddSub", "4", "four")


@pytest.mark.parametrize(
    "response, expected",
    [
        ("The answer is B", "B"),  # 'T' is no option letter: B is the first A-E.
        ("A car travels 60 km. The answer is (B).", "A"),  # first wins: protocol.
        ("(C) 12", "C"),
        ("Distance is 5 km, so (B)", "D"),
        ("the answer is b", ""),
        ("", ""),
    ],
)
def test_aqua_takes_the_first_capital_a_to_e(response, expected):
    assert scoring.extract_answer("AQuA", response) == expected


def test_aqua_correctness_is_exact():
    assert scoring.is_correct("AQuA", "The answer is (D).", "D")
    assert not scoring.is_correct("AQuA", "A train... the answer is (D).", "D")
    assert not scoring.is_correct("AQuA", "no option letter here", "A")


@pytest.mark.parametrize(
    "task, response, expected",
    [
        ("boolq", "the correct answer is true", "true"),
        ("boolq", "false, it is not true", "false"),
        ("boolq", "True", ""),  # case-sensitive, as in LLM-Adapters.
        ("piqa", "the correct answer is solution2", "solution2"),
        ("social_i_qa", "the correct answer is answer4", "answer4"),
        ("social_i_qa", "answer3 or answer1", "answer3"),
        ("hellaswag", "ending4", "ending4"),
        ("hellaswag", "ending5", ""),
        ("winogrande", "option2 fits, not option1", "option2"),
        ("ARC-Challenge", "the correct answer is answer5", "answer5"),
        ("openbookqa", "answer2", "answer2"),
        ("ARC-Easy", "I cannot tell", ""),
    ],
)
def test_commonsense_takes_the_first_label(task, response, expected):
    assert scoring.extract_answer(task, response) == expected


def test_social_i_qa_uses_five_labels_like_llm_adapters():
    # The data has three options, but the protocol's label set is answer1..5:
    # an out-of-range answer4 is extracted first and scores wrong.
    assert not scoring.is_correct("social_i_qa", "answer4, or rather answer3", "answer3")


def test_registry_covers_the_benchmark_tasks_and_rejects_unknown_ones():
    expected = {*MATH_TASKS, *COMMONSENSE_TASKS, "hellaswag", "openbookqa"}
    assert set(scoring.TASK_KINDS) == expected
    assert scoring.canonical_task("GSM8K") == "gsm8k"
    assert scoring.canonical_task("arc-challenge") == "ARC-Challenge"
    with pytest.raises(KeyError, match=r"unknown task 'mmlu'.*AddSub.*openbookqa"):
        scoring.extract_answer("mmlu", "answer1")


def test_score_task_counts_correct_predictions():
    records = [{"answer": "4.0"}, {"answer": "10.0"}, {"answer": "3.0"}, {"answer": "1.0"}]
    predictions = [
        alpaca_prompt("There are 7 crayons, 3 taken.") + "7 - 3 = 4. The answer is 4.",
        "The answer is 10.",
        "The answer is 3 or 2",
        "nothing",
    ]
    assert scoring.score_task("AddSub", predictions, records) == 0.5


def test_score_task_rejects_mismatched_or_empty_inputs():
    with pytest.raises(ValueError, match="2 predictions for 1 records"):
        scoring.score_task("boolq", ["true", "false"], [{"answer": "true"}])
    with pytest.raises(ValueError, match="empty"):
        scoring.score_task("boolq", [], [])


def test_summarize_reports_the_unweighted_average():
    summary = scoring.summarize({"gsm8k": 0.2, "AddSub": 0.9, "AQuA": 0.1})
    assert summary["gsm8k"] == 0.2
    assert summary["average"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="at least one"):
        scoring.summarize({})


def _llm_adapters_dir():
    root = default_data_dir()
    if root is None or not (root / "llm_adapters").is_dir():
        pytest.skip(f"shared data not found (set GENLORA_DATA); looked at {root}")
    return root / "llm_adapters"


def _task_records(task):
    group = "math" if task in MATH_TASKS else "commonsense"
    path = _llm_adapters_dir() / group / task / "test.json"
    return json.loads(path.read_text())


def test_registry_knows_every_task_directory_of_the_data():
    task_dirs = {p.parent.name for p in _llm_adapters_dir().glob("*/*/test.json")}
    assert task_dirs <= set(scoring.TASK_KINDS)  # data added later must be registered too
    assert {*MATH_TASKS, *COMMONSENSE_TASKS} <= task_dirs


@pytest.mark.parametrize("task", MATH_TASKS + COMMONSENSE_TASKS)
def test_every_stored_answer_scores_as_its_own_prediction(task):
    records = _task_records(task)
    answers = [str(record["answer"]) for record in records]
    assert scoring.score_task(task, answers, records) == 1.0


@pytest.mark.parametrize("task", COMMONSENSE_TASKS)
def test_stored_commonsense_outputs_are_all_correct(task):
    records = _task_records(task)
    outputs = [record["output"] for record in records]
    assert scoring.score_task(task, outputs, records) == 1.0
