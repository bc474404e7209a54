"""Rule-based rewards (trainers/rewards.py) in TRL's calling convention."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from trainers import rewards
from trainers.rewards import (
    JudgeUnavailableError,
    accuracy_reward,
    code_reward,
    extract_answer,
    format_reward,
    length_scaled_accuracy_reward,
    soft_overlong_punishment,
    tag_count_reward,
)
from trainers.sandbox import SandboxUnavailableError


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


STDIN_SCRIPT = """
import threading
from trainers.rewards import accuracy_reward

out = {}
def score():
    try:
        out["rewards"] = accuracy_reward(["<answer>\\\\frac{3}{4}</answer>", "<answer>4/5</answer>"],
                                         ["$0.75$", "$0.75$"])
    except Exception as e:
        out["error"] = repr(e)
worker = threading.Thread(target=score)  # TRL calls rewards from a worker thread
worker.start()
worker.join()
print(out)
"""


def test_accuracy_from_a_thread_of_a_script_on_stdin(tmp_path):
    # `python - < script.py`: __main__ is "<stdin>", which a spawned multiprocessing worker would try to re-import
    proc = subprocess.run([sys.executable, "-"], input=STDIN_SCRIPT, capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "{'rewards': [1.0, 0.0]}", proc.stdout + proc.stderr[-2000:]


def _raised_in_thread(fn, *args):
    out = {}

    def run():
        try:
            out["r"] = fn(*args)
        except BaseException as e:  # noqa: BLE001  (handed back to the test)
            out["e"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(120)
    return out


@pytest.fixture
def stand_in_judge(monkeypatch):
    """Replaces the judge helper's program (the real one is math-verify's) to make the infrastructure fail on cue;
    the helper started with it is killed afterwards."""
    monkeypatch.setattr(rewards, "_judge_process", None)

    def use(program: str):
        monkeypatch.setattr(rewards, "_JUDGE_BOOT", program)

    yield use
    if rewards._judge_process is not None:
        rewards._judge_process.kill()


def test_a_judge_that_cannot_start_raises(stand_in_judge):
    stand_in_judge("import sys; sys.stderr.write('ModuleNotFoundError: math_verify'); sys.exit(7)")
    out = _raised_in_thread(accuracy_reward, ["<answer>0.75</answer>"], ["3/4"])
    assert "r" not in out, "an infrastructure failure was scored"
    assert isinstance(out["e"], JudgeUnavailableError)
    assert "did not start" in str(out["e"]) and "exit status 7" in str(out["e"]) and "math_verify" in str(out["e"])


def test_a_judge_that_dies_raises(stand_in_judge):
    stand_in_judge("import sys; print('ready', flush=True); sys.stdin.readline(); sys.exit(9)")
    out = _raised_in_thread(accuracy_reward, ["<answer>0.75</answer>"], ["3/4"])
    assert isinstance(out.get("e"), JudgeUnavailableError), out
    assert "died while judging (exit status 9)" in str(out["e"])


def test_a_hanging_judgement_alone_scores_zero(stand_in_judge, monkeypatch):
    # a stand-in judge that never answers for one answer: the batch runs past its deadline, the helper is killed,
    # and the pairs are judged again one at a time in fresh helpers
    stand_in_judge("import sys, json, time\n"
                   "print('ready', flush=True)\n"
                   "for line in sys.stdin:\n"
                   "    pairs = json.loads(line)\n"
                   "    if any('hang' in answer for _, answer in pairs):\n"
                   "        time.sleep(600)\n"
                   "    print(json.dumps([1.0] * len(pairs)), flush=True)\n")
    monkeypatch.setattr(rewards, "JUDGE_SECONDS", 0.5)
    monkeypatch.setattr(rewards, "JUDGE_SLACK_SECONDS", 1.0)
    out = _raised_in_thread(accuracy_reward, ["<answer>1</answer>", "<answer>hang</answer>", "<answer>2</answer>"],
                            ["1", "1", "2"])
    assert out.get("r") == [1.0, 0.0, 1.0], out


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
    scores = code_reward(completions, [tests] * 4, log_extra=lambda k, v: logged.setdefault(k, v))
    assert scores == [1.0, 0.5, 1.0, 0.0]
    assert "timed out" in logged["sandbox_error"][3]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, for whom the 'userns' backend is refused")
def test_code_reward_raises_where_the_sandbox_fails():
    # a sandbox that cannot be set up is an infrastructure failure: raised, never scored as wrong code
    with pytest.raises(SandboxUnavailableError, match=r"failed on 2 of 2 completions .*ordinary users"):
        rewards._score_code(["def f(): pass", "x = 1"], [["assert f() is None"], ["assert x == 1"]], None, "userns",
                            None)


def test_soft_overlong_and_length_scaled():
    punish = soft_overlong_punishment(max_completion_len=10, soft_punish_cache=4)
    assert punish(completion_ids=[[0] * 6, [0] * 8, [0] * 10, [0] * 11]) == [0.0, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="soft_punish_cache"):
        soft_overlong_punishment(10, 0)
    scaled = length_scaled_accuracy_reward(max_len=10)
    out = scaled(["<answer>2</answer>", "<answer>2</answer>", "<answer>3</answer>", "<answer>3</answer>", "x"],
                 ["2", "2", "2", "2", "none"], completion_ids=[[0] * 0, [0] * 10, [0] * 0, [0] * 10, [0]])
    assert out[:4] == pytest.approx([1.0, 0.5, -1.0, -0.5]) and out[4] is None


# ---------------------------------------------------------------------------------------------------------------------
# Countdown
def test_parse_arithmetic_precedence_exactness_and_refusals():
    from fractions import Fraction

    from trainers.rewards import ArithmeticParseError, parse_arithmetic

    assert parse_arithmetic("2+3*4") == (14, [2, 3, 4])
    assert parse_arithmetic(" (2+3) * 4 ") == (20, [2, 3, 4])
    assert parse_arithmetic("8-3-2") == (3, [8, 3, 2])  # left-associative
    assert parse_arithmetic("8/3*3") == (8, [8, 3, 3])  # exact: no float rounding
    assert parse_arithmetic("7/2")[0] == Fraction(7, 2)
    for bad in ("", "2+", "-2+3", "2**3", "2^3", "(2+3", "2+3)", "2 3", "1.5*2", "__import__('os')", "2/0",
                "x+1", "٣+1", "(" * 20 + "1" + ")" * 20, "1+" * 150 + "1"):
        with pytest.raises(ArithmeticParseError):
            parse_arithmetic(bad)


def test_countdown_reward_tinyzero_shaping_and_options():
    from trainers.rewards import countdown_reward, make_countdown_reward

    numbers, target = [5, 7, 3], 38
    cases = {
        " <think>5*7=35 35+3=38</think> <answer>5*7+3</answer>": 1.0,
        "<think>x</think><answer>3+7*5</answer>": 1.0,  # any expression that uses each number once
        "<think>x</think> <answer>5*7+4</answer>": 0.1,  # a number not given
        "<think>x</think> <answer>5*7</answer>": 0.1,  # a number left out
        "<think>x</think> <answer>5*7+3+3</answer>": 0.1,  # a number used twice
        "<think>x</think> <answer>5+7+3</answer>": 0.1,  # wrong value
        "<think>x</think> <answer>38</answer>": 0.1,
        "<think>x</think> <answer>five times seven</answer>": 0.0,  # not an expression
        "5*7+3": 0.0,  # no R1 format
        "<answer>5*7+3</answer>": 0.0,
        "<think>x</think> <answer>5*7+3</answer> more": 0.0,
    }
    texts = list(cases)
    assert countdown_reward(texts, [numbers] * len(texts), [target] * len(texts)) == list(cases.values())
    # conversational completions; repeated numbers must be used as often as given
    assert countdown_reward([chat("<think></think><answer>3*3+1</answer>")], [[3, 3, 1]], [10]) == [1.0]
    assert countdown_reward([chat("<think></think><answer>3*3+1</answer>")], [[3, 1, 1]], [10]) == [0.1]
    # named options: other values, and the answer tag alone
    strict = make_countdown_reward(correct=2.0, well_formed=0.0, malformed=-1.0, require_think_format=False)
    assert strict(["<answer>5*7+3</answer>", "<answer>5+7+3</answer>", "no answer"], [numbers] * 3,
                  [target] * 3) == [2.0, 0.0, -1.0]
    with pytest.raises(ValueError, match="2 completions"):
        countdown_reward(["a", "b"], [numbers], [target])


def test_random_reward_control_keeps_the_values_not_their_owners():
    from trainers.rewards import countdown_reward, random_reward_control

    texts = [f"<think></think><answer>{e}</answer>" for e in ("5*7+3", "5+7+3", "x", "3+5*7", "5*7-3", "q")] * 4
    args = dict(completions=texts, numbers=[[5, 7, 3]] * len(texts), target=[38] * len(texts))
    real = countdown_reward(**args)
    control = random_reward_control(countdown_reward, seed=0)
    assert control.__name__ == "random_countdown_reward"
    shuffled = [control(**args) for _ in range(3)]
    assert all(sorted(s) == sorted(real) for s in shuffled)  # same values: same mean, same spread
    assert any(s != real for s in shuffled) and shuffled[0] != shuffled[1]
    again = random_reward_control(countdown_reward, seed=0)
    assert [again(**args) for _ in range(3)] == shuffled  # seeded
