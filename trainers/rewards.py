"""Rule-based rewards for GRPO, in TRL's calling convention: `f(completions, <dataset columns>, **kwargs)` returns one
`float | None` per completion (None: this reward has no opinion on the sample, and TRL leaves it out).

DeepSeek-R1-Zero was trained with two rules only (no learned reward model): an accuracy reward, whether the final
answer is right, and a format reward, whether the reasoning sits in `<think>...</think>` followed by the answer in
`<answer>...</answer>`. Around them:

- `tag_count_reward`: partial credit (0.25 per tag present exactly once), a denser signal while the format is learned;
- `code_reward`: the fraction of a row's tests (MBPP's `test_list` of assert statements) that the completion's code
  passes, run in the isolated sandbox of trainers/sandbox.py;
- `soft_overlong_punishment` (DAPO eq. 13, TRL's implementation) and `length_scaled_accuracy_reward` (the cosine
  length schedule of "Demystifying Long Chain-of-Thought Reasoning", on top of this module's accuracy judgement).

Every reward takes plain completions (`str`) and conversational ones (`[{"role": "assistant", "content": ...}]`).

Accuracy is judged by math-verify with the gold parsed first (`verify(gold, answer)` is asymmetric), so equivalent
forms count: 1/2 = 0.5 = \\frac{1}{2}, \\sqrt{4} = 2. math-verify bounds its parse / compare time with signal.alarm,
which only works in the main thread of the main interpreter; TRL may call rewards from a thread (async rollouts) and
users call them from worker pools. Off the main thread the judgement runs in a helper process (whose main thread can
use the alarm), with a wall-clock bound of its own; a judgement that hangs there is killed and scores 0.
"""

from __future__ import annotations

import math
import multiprocessing
import re
import threading
from collections.abc import Callable, Sequence

__all__ = [
    "completion_text",
    "extract_answer",
    "extract_code",
    "accuracy_reward",
    "format_reward",
    "tag_count_reward",
    "code_reward",
    "soft_overlong_punishment",
    "length_scaled_accuracy_reward",
]

THINK_ANSWER_RE = re.compile(r"^\s*<think>(?:(?!</?think>|</?answer>).)*</think>\s*"
                             r"<answer>(?:(?!</?think>|</?answer>).)*</answer>\s*$", re.DOTALL)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
FENCED_RE = re.compile(r"```[ \t]*[\w+-]*[ \t]*\n(.*?)```", re.DOTALL)
JUDGE_SECONDS = 10  # math-verify's parse and compare each get 5 s of this in the helper process


def completion_text(completion) -> str:
    """The text of a plain (`str`) or conversational (list of messages; the last one's content) completion."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, list):  # content blocks: [{"type": "text", "text": ...}, ...]
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return str(content)
    if isinstance(completion, Sequence) and not completion:
        return ""
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_answer(text: str) -> str:
    """The final answer: inside the last <answer>...</answer>, else the last \\boxed{}, else the whole text (whose
    last expression math-verify then picks)."""
    answers = ANSWER_RE.findall(text)
    if answers:
        inner = answers[-1]
        boxed = _last_boxed(inner)
        return boxed if boxed is not None else inner
    boxed = _last_boxed(text)
    return boxed if boxed is not None else text


def _parse(text: str, first_match: bool):
    """math-verify's parse; a bare LaTeX answer such as \\sqrt{4} needs math delimiters to be found, so LaTeX is
    retried wrapped in $...$ (plain words are not: wrapped, they would parse as products of symbols)."""
    from math_verify import parse

    mode = "first_match" if first_match else "any_match"
    parsed = parse(text, extraction_mode=mode)
    if not parsed and "$" not in text and "\\" in text:
        parsed = parse(f"${text.strip()}$", extraction_mode=mode)
    return parsed


def judge(gold: str, answer: str) -> float | None:
    """1.0 / 0.0 for `answer` against `gold` (math-verify, gold first); None when the gold cannot be parsed.
    Main thread only (math-verify's signal-based timeouts); `accuracy_reward` routes other threads elsewhere."""
    from math_verify import verify

    gold_parsed = _parse(str(gold), first_match=True)
    if not any(not isinstance(x, str) for x in gold_parsed):  # only the raw-string fallback: not a math answer
        return None
    answer_parsed = _parse(answer, first_match=False)
    if not answer_parsed:
        return 0.0
    return float(verify(gold_parsed, answer_parsed))


def _judge_many(pairs: list[tuple[str, str]]) -> list[float | None]:
    return [judge(g, a) for g, a in pairs]


_pool_lock = threading.Lock()
_pool = None  # a multiprocessing Pool with one spawned worker, started on first use off the main thread


def _judge_in_helper(pairs: list[tuple[str, str]]) -> list[float | None]:
    """Judge in a helper process (its main thread may use signal.alarm). A batch that exceeds its time is killed
    with the helper; the batch is then judged one pair at a time so that only the culprit scores 0."""
    global _pool
    with _pool_lock:
        if _pool is None:
            # spawn: safe from a threaded parent (fork would copy locks held by other threads)
            _pool = multiprocessing.get_context("spawn").Pool(1)
        pool = _pool
    try:
        return pool.apply_async(_judge_many, (pairs,)).get(timeout=JUDGE_SECONDS * len(pairs) + 30)
    except multiprocessing.TimeoutError:
        with _pool_lock:
            if _pool is pool:
                _pool = None
        pool.terminate()  # kills the stuck worker
        if len(pairs) == 1:
            return [0.0]
        return [_judge_in_helper([pair])[0] for pair in pairs]


def accuracy_reward(completions, solution, **kwargs) -> list[float | None]:
    """1.0 when the completion's final answer equals the gold `solution` (math-verify; equivalent forms count), else
    0.0; None when the gold itself cannot be parsed (the sample is then left out of this reward)."""
    if len(completions) != len(solution):
        raise ValueError(f"accuracy_reward: {len(completions)} completions but {len(solution)} solutions")
    pairs = [(str(gold), extract_answer(completion_text(c))) for c, gold in zip(completions, solution)]
    if threading.current_thread() is threading.main_thread():
        return _judge_many(pairs)
    return _judge_in_helper(pairs)


def format_reward(completions, **kwargs) -> list[float]:
    """1.0 for exactly `<think>...</think>` then `<answer>...</answer>` (whitespace around them only, each tag once),
    else 0.0."""
    return [1.0 if THINK_ANSWER_RE.match(completion_text(c)) else 0.0 for c in completions]


def tag_count_reward(completions, **kwargs) -> list[float]:
    """0.25 for each of <think>, </think>, <answer>, </answer> that occurs exactly once."""
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    return [sum(0.25 for tag in tags if completion_text(c).count(tag) == 1) for c in completions]


def extract_code(text: str) -> str:
    """The completion's Python code: its last fenced block (```python ... ```), else the whole text."""
    blocks = FENCED_RE.findall(text)
    return blocks[-1] if blocks else text


def code_reward(completions, test_list, **kwargs) -> list[float]:
    """The fraction of the row's tests (`test_list`: assert statements, MBPP's column) that the completion's code
    passes, each completion run in its own sandboxed process (trainers/sandbox.py), all in parallel. A crash,
    timeout, memory hog, fork bomb or network attempt scores 0; so does every completion when the sandbox cannot
    be set up on this machine (the reason is logged), rather than running the code unprotected."""
    from .sandbox import run_tests_many

    if len(completions) != len(test_list):
        raise ValueError(f"code_reward: {len(completions)} completions but {len(test_list)} test lists")
    codes = [extract_code(completion_text(c)) for c in completions]
    results = run_tests_many(codes, [list(t) for t in test_list])
    log_extra = kwargs.get("log_extra")
    if log_extra is not None:
        log_extra("sandbox_error", [r.error or "" for r in results])
    return [r.score for r in results]


def soft_overlong_punishment(max_completion_len: int, soft_punish_cache: int) -> Callable:
    """DAPO's soft overlong punishment (eq. 13): 0 up to max_completion_len - soft_punish_cache tokens, then a linear
    ramp down to -1 at max_completion_len, -1 beyond. TRL's implementation (trl.rewards), re-exported here so the
    rule-based rewards live in one place."""
    from trl.rewards import get_soft_overlong_punishment

    if soft_punish_cache <= 0 or soft_punish_cache > max_completion_len:
        raise ValueError(f"soft_punish_cache must be in 1..max_completion_len ({max_completion_len}), "
                         f"got {soft_punish_cache}")
    return get_soft_overlong_punishment(max_completion_len, soft_punish_cache)


class _LengthScaledAccuracy:
    # A class rather than a closure so that it pickles (TRL can hand reward functions to a spawned process).
    __name__ = "length_scaled_accuracy_reward"

    def __init__(self, max_len, min_value_wrong, max_value_wrong, min_value_correct, max_value_correct):
        self.max_len = max_len
        self.wrong = (max_value_wrong, min_value_wrong)  # a short wrong answer is penalised more
        self.correct = (min_value_correct, max_value_correct)  # a short right answer is rewarded more

    def __call__(self, completions, solution, completion_ids, **kwargs) -> list[float | None]:
        rewards = []
        for ok, ids in zip(accuracy_reward(completions, solution), completion_ids):
            if ok is None:
                rewards.append(None)
                continue
            lo, hi = self.correct if ok else self.wrong
            progress = min(len(ids), self.max_len) / self.max_len
            rewards.append(lo + 0.5 * (hi - lo) * (1.0 + math.cos(progress * math.pi)))
        return rewards


def length_scaled_accuracy_reward(max_len: int, min_value_wrong: float = -1.0, max_value_wrong: float = -0.5,
                                  min_value_correct: float = 0.5, max_value_correct: float = 1.0) -> Callable:
    """The length-aware accuracy reward: this module's accuracy judgement scaled by the cosine schedule of
    Yeo et al. 2025 (appendix C.1) over the completion's token count: a right answer earns max_value_correct when
    empty and min_value_correct at max_len tokens, a wrong one min_value_wrong when empty and max_value_wrong at
    max_len (so a short wrong answer costs most). None where the gold cannot be parsed."""
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    return _LengthScaledAccuracy(max_len, min_value_wrong, max_value_wrong, min_value_correct, max_value_correct)
