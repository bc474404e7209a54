"""Rule-based rewards (trainers/rewards.py) in TRL's calling convention."""

from __future__ import annotations

import multiprocessing
import threading

import pytest

from trainers.rewards import (
    accuracy_reward,
    code_reward,
    extract_answer,
    format_reward,
    length_scaled_accuracy_reward,
    soft_overlong_punishment,
    tag_count_reward,
)


def chat(text):
    return [{"role": "assistant", "content": text}]


R1 = "<think>\n3 + 4 = 7\n</think>\n<answer>\n7\n</answer>"


def test_accuracy_equivalent_forms_and_gold_first():
    completions = ["<answer>0.5</answer>", "<answer>\\frac{1}{2}</answer>", "<answer>1/2</answer>",
                   "so \\boxed{\\sqrt{4}}", "first 3, then 5, finally 2", "<answer>3</answer>", "<answer></answer>"]
    solution = ["1/2", "0.5", "\\frac{1}{2}", "2", "2", "2", "2"]
    assert accuracy_reward(completions, solution) == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    # the answer tag wins over a boxed expression or numbers elsewhere in the text
    assert accuracy_reward(["\\boxed{5} <answer>6</answer>"], ["6"]) == [1.0]
    assert extract_answer("x \\boxed{\\frac{1}{2}} y") == "\\frac{1}{2}"


def test_accuracy_unparseable_gold_is_none_and_conversational():
    assert accuracy_reward([chat(R1), chat("<answer>7</answer>")], ["no number here", "7"]) == [None, 1.0]
    with pytest.raises(ValueError, match="2 completions but 1"):
        accuracy_reward(["a", "b"], ["1"])


def _in_thread(fn, *args):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn(*args)))
    t.start()
    t.join(60)
    return out["r"]


def test_accuracy_off_the_main_thread_and_in_worker_processes():
    completions, solution = ["<answer>0.5</answer>", "<answer>3</answer>"], ["1/2", "2"]
    assert _in_thread(accuracy_reward, completions, solution) == [1.0, 0.0]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.apply(accuracy_reward, (completions, solution)) == [1.0, 0.0]


def test_format_and_tag_count():
    texts = [R1, "<think>a</think><answer>b</answer>", "<answer>7</answer>", "<think>a</think>", "x" + R1,
             R1 + "<answer>8</answer>", "<think><think>a</think><answer>b</answer>", chat(R1)]
    assert format_reward(texts) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert tag_count_reward(texts) == [1.0, 1.0, 0.5, 0.5, 1.0, 0.5, 0.75, 1.0]


def test_code_reward_scores_fraction_and_hostile_code_zero():
    tests = ["assert sq(2) == 4", "assert sq(3) == 9"]
    completions = [
        "Here:\n```python\ndef sq(x):\n    return x * x\n```",
        chat("```python\ndef sq(x):\n    return 4\n```"),
        "def sq(x):\n    return x ** 2\n",  # no fence: the whole text is the program
        "```python\nwhile True:\n    pass\n```",
    ]
    logged = {}
    rewards = code_reward(completions, [tests] * 4, log_extra=lambda k, v: logged.setdefault(k, v))
    assert rewards == [1.0, 0.5, 1.0, 0.0]
    assert "timed out" in logged["sandbox_error"][3]


def test_soft_overlong_and_length_scaled():
    punish = soft_overlong_punishment(max_completion_len=10, soft_punish_cache=4)
    assert punish(completion_ids=[[0] * 6, [0] * 8, [0] * 10, [0] * 11]) == [0.0, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="soft_punish_cache"):
        soft_overlong_punishment(10, 0)
    scaled = length_scaled_accuracy_reward(max_len=10)
    out = scaled(["<answer>2</answer>", "<answer>2</answer>", "<answer>3</answer>", "<answer>3</answer>", "x"],
                 ["2", "2", "2", "2", "none"], completion_ids=[[0] * 0, [0] * 10, [0] * 0, [0] * 10, [0]])
    assert out[:4] == pytest.approx([1.0, 0.5, -1.0, -0.5]) and out[4] is None
