"""Rule-based rewards for GRPO, in TRL's calling convention: `f(completions, <dataset columns>, **kwargs)` returns one
`float | None` per completion (None: this reward has no opinion on the sample, and TRL leaves it out).

DeepSeek-R1-Zero was trained with two rules only (no learned reward model): an accuracy reward, whether the final
answer is right, and a format reward, whether the reasoning sits in `<think>...</think>` followed by the answer in
`<answer>...</answer>`. Around them:

- `tag_count_reward`: partial credit (0.25 per tag present exactly once), a denser signal while the format is learned;
- `code_reward`: the fraction of a row's tests (MBPP's `test_list` of assert statements) that the completion's code
  passes, run in the isolated sandbox of trainers/sandbox.py;
- `countdown_reward`: the Countdown game (TinyZero's rule): the answer is an arithmetic expression that must use
  each given number exactly once and equal the target; 1.0 when it does, 0.1 for a well-formed answer that does not,
  0 otherwise (`make_countdown_reward` names the values and options). The expression is read by a small parser of
  its own (integers, + - * /, parentheses; exact rational arithmetic), never by `eval`;
- `random_reward_control`: any reward's values handed to the completions of the batch in a seeded random order, a
  control of the same mean that carries no information about the completion it scores;
- `soft_overlong_punishment` (DAPO eq. 13, TRL's implementation) and `length_scaled_accuracy_reward` (the cosine
  length schedule of "Demystifying Long Chain-of-Thought Reasoning", on top of this module's accuracy judgement).

Every reward takes plain completions (`str`) and conversational ones (`[{"role": "assistant", "content": ...}]`).

Accuracy is judged by math-verify with the gold parsed first (`verify(gold, answer)` is asymmetric), so equivalent
forms count: 1/2 = 0.5 = \\frac{1}{2}, \\sqrt{4} = 2. math-verify bounds its parse / compare time with signal.alarm,
which only works in the main thread of the main interpreter; TRL may call rewards from a thread (async rollouts) and
users call them from worker pools. Off the main thread the judgement runs in a helper process (whose main thread can
use the alarm), with a wall-clock bound of its own; a judgement that hangs there is killed and scores 0. The helper
is started as a plain `python -c` on the caller's import path, not as a multiprocessing worker, so it also works for
a script fed to Python on standard input (a spawned worker would re-import a `__main__` that has no file, fail, and
leave the pool waiting).

An infrastructure failure is never scored as a wrong answer: a judge helper that will not start or dies raises
JudgeUnavailableError, and a code sandbox that cannot be set up raises SandboxUnavailableError (trainers/sandbox.py),
when the reward is built (`make_code_reward`) or at its first call (`code_reward`).
"""

from __future__ import annotations

import atexit
import collections
import fractions
import json
import math
import operator
import os
import random
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

__all__ = [
    "completion_text",
    "extract_answer",
    "extract_code",
    "accuracy_reward",
    "format_reward",
    "tag_count_reward",
    "code_reward",
    "make_code_reward",
    "CodeReward",
    "JudgeUnavailableError",
    "soft_overlong_punishment",
    "length_scaled_accuracy_reward",
    "parse_arithmetic",
    "ArithmeticParseError",
    "countdown_reward",
    "make_countdown_reward",
    "CountdownReward",
    "random_reward_control",
]

THINK_ANSWER_RE = re.compile(r"^\s*<think>(?:(?!</?think>|</?answer>).)*</think>\s*"
                             r"<answer>(?:(?!</?think>|</?answer>).)*</answer>\s*$", re.DOTALL)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
FENCED_RE = re.compile(r"```[ \t]*[\w+-]*[ \t]*\n(.*?)```", re.DOTALL)
JUDGE_SECONDS = 10  # per pair, off the main thread: math-verify's parse and compare each get 5 s of this
JUDGE_SLACK_SECONDS = 30  # per batch, on top


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


class JudgeUnavailableError(RuntimeError):
    """The accuracy judge could not run (its helper process would not start or died): an infrastructure failure,
    raised rather than scored as a wrong answer."""


# The helper runs this module's judge in its main thread (where math-verify's signal.alarm works). It is started as
# `python -c _JUDGE_BOOT <sys.path> <module>`, so it depends on nothing of the caller but its import path: unlike a
# multiprocessing "spawn" worker it never re-imports the caller's __main__ (a script fed on stdin has no file).
_JUDGE_BOOT = "import sys, json, importlib; sys.path[:] = json.loads(sys.argv[1]); " \
              "importlib.import_module(sys.argv[2])._serve_judge()"
STARTUP_SECONDS = 120  # importing sympy on a loaded machine


def _serve_judge() -> None:
    """The helper's loop: one JSON list of [gold, answer] pairs per line in, one JSON list of scores per line out."""
    try:  # die with the trainer even when busy in a judgement (Linux)
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    answers = os.fdopen(os.dup(1), "w")  # the protocol's own channel; anything else printed goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import math_verify  # noqa: F401  (an import error surfaces before "ready")

    print("ready", file=answers, flush=True)
    for line in sys.stdin:
        print(json.dumps(_judge_many([tuple(p) for p in json.loads(line)])), file=answers, flush=True)


class _JudgeProcess:
    """One helper process and its pipes; `ask` returns its scores, or raises TimeoutError (the judgement ran past
    its deadline: the helper is killed) or JudgeUnavailableError (it would not start or died on its own)."""

    def __init__(self):
        module = __spec__.name if __spec__ is not None and __spec__.name != "__main__" else "trainers.rewards"
        path = [p or os.getcwd() for p in sys.path]
        self.proc = subprocess.Popen([sys.executable, "-c", _JUDGE_BOOT, json.dumps(path), module],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stderr = collections.deque(maxlen=40)  # drained continuously so that the helper never blocks on it
        self.drain = threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True)
        self.drain.start()
        self.buffer = b""
        try:
            line = self._readline(STARTUP_SECONDS)
        except TimeoutError:
            self.kill()
            raise JudgeUnavailableError(f"the accuracy judge process did not start within {STARTUP_SECONDS} s"
                                        f"{self._why()}") from None
        if line != b"ready":
            self.kill()
            raise JudgeUnavailableError(f"the accuracy judge process did not start{self._why()}")

    def _why(self) -> str:
        """Its exit status and the end of its stderr, once it has exited."""
        code = self.proc.poll()
        self.drain.join(timeout=5)
        tail = b"".join(self.stderr).decode(errors="replace").strip()[-2000:]
        return (f" (exit status {code})" if code is not None else "") + (f": {tail}" if tail else "")

    def _readline(self, seconds: float) -> bytes:
        deadline = time.monotonic() + seconds
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, 1 << 16)
            if not chunk:  # the helper closed its output: it exited
                self.proc.wait(timeout=30)
                return b""
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.strip()

    def ask(self, pairs: list[tuple[str, str]], seconds: float) -> list[float | None]:
        try:
            self.proc.stdin.write(json.dumps(pairs).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # it exited: said below, with its status and stderr
        try:
            line = self._readline(seconds)
        except TimeoutError:
            self.kill()
            raise
        if not line:
            self.kill()
            raise JudgeUnavailableError(f"the accuracy judge process died while judging{self._why()}")
        try:
            return json.loads(line)
        except ValueError:
            self.kill()
            raise JudgeUnavailableError(f"the accuracy judge process answered {line[:200]!r}{self._why()}") from None

    def kill(self) -> None:
        """Ends the helper (if still running) and closes its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        try:
            self.proc.stdin.close()
        except OSError:  # unflushed input to a helper that is gone
            pass
        self.proc.stdout.close()
        self.drain.join(timeout=5)
        self.proc.stderr.close()


_judge_lock = threading.Lock()
_judge_process: _JudgeProcess | None = None  # started on first use off the main thread


def _stop_judge() -> None:
    global _judge_process
    with _judge_lock:
        if _judge_process is not None:
            _judge_process.kill()
            _judge_process = None


atexit.register(_stop_judge)


def _judge_in_helper(pairs: list[tuple[str, str]]) -> list[float | None]:
    """Judge in the helper process. A batch that runs past its deadline kills the helper and is judged again one
    pair at a time, so that only the pair that hangs scores 0; a helper that will not start or dies on its own
    raises JudgeUnavailableError."""
    global _judge_process
    with _judge_lock:
        if _judge_process is not None and _judge_process.proc.poll() is not None:  # it exited while idle
            _judge_process.kill()
            _judge_process = None
        if _judge_process is None:
            _judge_process = _JudgeProcess()
        try:
            return _judge_process.ask(pairs, JUDGE_SECONDS * len(pairs) + JUDGE_SLACK_SECONDS)
        except TimeoutError:
            _judge_process = None
        except JudgeUnavailableError:
            _judge_process = None
            raise
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


def _score_code(completions, test_list, limits, backend, log_extra) -> list[float]:
    from .sandbox import SandboxUnavailableError, run_tests_many

    if len(completions) != len(test_list):
        raise ValueError(f"code_reward: {len(completions)} completions but {len(test_list)} test lists")
    codes = [extract_code(completion_text(c)) for c in completions]
    results = run_tests_many(codes, [list(t) for t in test_list], limits, backend=backend)
    failed = [r for r in results if r.sandbox_failed]
    if failed:
        raise SandboxUnavailableError(f"the code sandbox failed on {len(failed)} of {len(results)} completions "
                                      f"(not scored): {failed[0].error}")
    if log_extra is not None:
        log_extra("sandbox_error", [r.error or "" for r in results])
    return [r.score for r in results]


def code_reward(completions, test_list, **kwargs) -> list[float]:
    """The fraction of the row's tests (`test_list`: assert statements, MBPP's column) that the completion's code
    passes, each completion run in its own sandboxed process (trainers/sandbox.py), all in parallel. A crash,
    timeout, memory hog, fork bomb, network attempt or early exit scores 0. Where no sandbox can be set up (an
    ordinary user without user namespaces or bubblewrap) it raises SandboxUnavailableError saying why, rather than
    run the code unprotected or score it 0; `make_code_reward()` raises that when it is built."""
    from .sandbox import require_sandbox

    require_sandbox()  # once per process: one trivial program
    return _score_code(completions, test_list, None, "auto", kwargs.get("log_extra"))


class CodeReward:
    """`code_reward` with its own limits and backend, the sandbox checked when it is built. A class rather than a
    closure so that it pickles (TRL can hand reward functions to a spawned process)."""

    __name__ = "code_reward"

    def __init__(self, limits=None, backend: str = "auto"):
        from .sandbox import require_sandbox

        self.limits, self.backend = limits, backend
        self.sandbox_backend = require_sandbox(backend)

    def __call__(self, completions, test_list, **kwargs) -> list[float]:
        return _score_code(completions, test_list, self.limits, self.backend, kwargs.get("log_extra"))


def make_code_reward(limits=None, backend: str = "auto") -> CodeReward:
    """The code reward, built now: raises SandboxUnavailableError (naming why and what would enable it) when this
    machine cannot isolate the code, before any training starts. `limits`: a sandbox.SandboxLimits; `backend`:
    "auto", "root", "userns" or "bwrap"."""
    return CodeReward(limits, backend)


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


# ---------------------------------------------------------------------------------------------------------------------
# Countdown (TinyZero's task): numbers, a target, an expression that uses each number once
class ArithmeticParseError(ValueError):
    """The text is not an arithmetic expression of integers, + - * /, and parentheses."""


_ARITH_TOKEN_RE = re.compile(r"\s*(?:([0-9]+)|([-+*/()]))")
MAX_EXPRESSION_CHARS = 200  # a Countdown answer is short; longer text is not parsed (bounds time and recursion)
MAX_NESTING = 16
LEVELS = (("+", "-"), ("*", "/"))  # by precedence, lowest first
OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def parse_arithmetic(text: str) -> tuple[fractions.Fraction, list[int]]:
    """(value, the integer literals in order) of an expression of non-negative integers, + - * / and parentheses,
    evaluated exactly (fractions; `/` is true division). Raises ArithmeticParseError for anything else: unary signs,
    decimals, names, empty text, text over MAX_EXPRESSION_CHARS, nesting deeper than MAX_NESTING, division by
    zero. A recursive-descent parser with the usual precedence, left-associative; nothing is executed."""
    text = text.strip()
    if not text:
        raise ArithmeticParseError("empty expression")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ArithmeticParseError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    tokens, pos = [], 0
    while pos < len(text):
        m = _ARITH_TOKEN_RE.match(text, pos)
        if m is None or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise ArithmeticParseError(f"unexpected character {text[pos]!r} at {pos}")
        tokens.append(int(m.group(1)) if m.group(1) is not None else m.group(2))
        pos = m.end()
    literals: list[int] = []
    i = 0

    def peek():
        return tokens[i] if i < len(tokens) else None

    def factor(depth):
        nonlocal i
        tok = peek()
        if isinstance(tok, int):
            i += 1
            literals.append(tok)
            return fractions.Fraction(tok)
        if tok == "(":
            if depth >= MAX_NESTING:
                raise ArithmeticParseError(f"parentheses nested deeper than {MAX_NESTING}")
            i += 1
            value = binary(0, depth + 1)
            if peek() != ")":
                raise ArithmeticParseError("unbalanced parentheses")
            i += 1
            return value
        raise ArithmeticParseError(f"expected a number or '(', got {tok!r}")

    def binary(level, depth):
        """Operands of the next level joined by this level's operators, left to right (level 0: + -, 1: * /)."""
        nonlocal i
        operand = (lambda: binary(level + 1, depth)) if level + 1 < len(LEVELS) else (lambda: factor(depth))
        value = operand()
        while peek() in LEVELS[level]:
            op = tokens[i]
            i += 1
            right = operand()
            if op == "/" and right == 0:
                raise ArithmeticParseError("division by zero")
            value = OPERATIONS[op](value, right)
        return value

    value = binary(0, 0)
    if i != len(tokens):
        raise ArithmeticParseError(f"unexpected {tokens[i]!r} after a complete expression")
    return value, literals


class CountdownReward:
    """The Countdown reward (see `make_countdown_reward`). A class rather than a closure so that it pickles."""

    __name__ = "countdown_reward"

    def __init__(self, correct: float = 1.0, well_formed: float = 0.1, malformed: float = 0.0,
                 require_think_format: bool = True):
        self.correct, self.well_formed, self.malformed = float(correct), float(well_formed), float(malformed)
        self.require_think_format = require_think_format

    def judge(self, completion, numbers, target) -> str:
        """'correct', 'well_formed' (an answer that parses, wrong or not using the numbers once) or 'malformed'."""
        text = completion_text(completion)
        if self.require_think_format and not THINK_ANSWER_RE.match(text):
            return "malformed"
        answers = ANSWER_RE.findall(text)
        if not answers:
            return "malformed"
        try:
            value, literals = parse_arithmetic(answers[-1])
        except ArithmeticParseError:
            return "malformed"
        uses_each_once = sorted(literals) == sorted(int(n) for n in numbers)
        return "correct" if uses_each_once and value == int(target) else "well_formed"

    def __call__(self, completions, numbers, target, **kwargs) -> list[float]:
        if not len(completions) == len(numbers) == len(target):
            raise ValueError(f"countdown_reward: {len(completions)} completions, {len(numbers)} number lists, "
                             f"{len(target)} targets")
        values = {"correct": self.correct, "well_formed": self.well_formed, "malformed": self.malformed}
        return [values[self.judge(c, n, t)] for c, n, t in zip(completions, numbers, target)]


def make_countdown_reward(correct: float = 1.0, well_formed: float = 0.1, malformed: float = 0.0,
                          require_think_format: bool = True) -> CountdownReward:
    """The Countdown reward for rows with `numbers` (list of ints) and `target` (int) columns: `correct` when the
    last <answer>...</answer> holds an expression that uses every number exactly once (as many times as it is
    given) and equals the target, `well_formed` when it holds an expression that does not, `malformed` otherwise
    (no answer, text that is not an expression). TinyZero's shaping is the default (1.0 / 0.1 / 0);
    `require_think_format` (default) also asks for R1's `<think>...</think> <answer>...</answer>` layout, as
    format_reward does, else a completion without it is malformed."""
    return CountdownReward(correct, well_formed, malformed, require_think_format)


countdown_reward = make_countdown_reward()


class _RandomRewardControl:
    # A class rather than a closure so that it pickles.
    def __init__(self, reward_func, seed: int):
        self.reward_func, self.rng = reward_func, random.Random(seed)
        self.__name__ = f"random_{getattr(reward_func, '__name__', type(reward_func).__name__)}"

    def __call__(self, completions, **kwargs) -> list[float | None]:
        values = list(self.reward_func(completions=completions, **kwargs))
        self.rng.shuffle(values)
        return values


def random_reward_control(reward_func: Callable, seed: int = 0) -> Callable:
    """A control for a reward: `reward_func`'s values for a batch, handed out to its completions in a (seeded)
    random order. Every batch gets the same values, so the mean and the spread are those of the real reward, but
    the value a completion receives says nothing about it (the "spurious rewards" control: a gain under it is not
    due to the reward's information)."""
    return _RandomRewardControl(reward_func, seed)
