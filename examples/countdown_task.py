"""The Countdown task of the R1 demo (examples/r1_pipeline.py): numbers, a target, and an expression that reaches it.

A problem gives three numbers from 1 to `max_number` and a target ("User: 3 5 7 to 38 Assistant:"); the answer is an
arithmetic expression that uses each number exactly once and equals the target ("5*7+3"). The R1 demo uses numbers
up to 12 with + and -: 1,264 problems, enough that 300 held out leave RL problems the cold start has not seen (with
numbers up to 9 there are 550). TinyZero made it the smallest task on which RL with a rule-based reward teaches
search; here it replaces the three-digit sums (examples/arithmetic_task.py,
still the task of `make grpo-demo`) because a sum has one way to be worked out, so a cold start that teaches it leaves
RL nothing to find, while a Countdown problem has many candidate expressions of which few hit the target: a model
that has learned the format and the arithmetic still has to pick the operations, and sampling several times finds
the target more often than once (pass@8 well above pass@1), the gap that RL turns into pass@1.

- Problems: every target reachable as (x o1 y) o2 z from an ordering of the numbers, o1, o2 in `ops` ("+-*" by
  default; "/" adds exact integer division), intermediate result and target in 1..`max_target`. A problem's key is
  its numbers as a multiset and its target: the held-out keys are never trained on in any order of their numbers.
- Worked trace (cold start): one valid solution, no search shown, "<think>5*7=35 35+3=38</think>
  <answer>5*7+3</answer>" (parentheses where precedence needs them).
- Base-model "facts": lines of computation steps of random chains ("3*4=12 12-5=7 ..."): the arithmetic the traces
  need, with no problem, target or R1 format.
- Reward: trainers.rewards.countdown_reward (TinyZero's shaping: 1.0 correct, 0.1 well formed, 0 otherwise), which
  reads the rows' `numbers` and `target` columns.
"""

from __future__ import annotations

import itertools
import random
from functools import lru_cache

from examples.arithmetic_task import TEMPLATE

PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


def apply(a: int, op: str, b: int) -> int | None:
    """a op b over the integers; None for a division that does not come out whole."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        return a // b if b and a % b == 0 else None
    raise ValueError(f"unknown operation {op!r} (Countdown uses + - * /)")


@lru_cache(maxsize=8192)
def chains(numbers: tuple[int, ...], ops: str = "+-*", max_target: int = 99) -> tuple[tuple, ...]:
    """Every (x, o1, y, o2, z, r, t) with (x, y, z) an ordering of the three numbers, r = x o1 y and t = r o2 z,
    both in 1..max_target."""
    if len(numbers) != 3:
        raise ValueError(f"Countdown here takes three numbers, got {numbers}")
    found = []
    for x, y, z in sorted(set(itertools.permutations(numbers))):
        for o1, o2 in itertools.product(ops, repeat=2):
            r = apply(x, o1, y)
            if r is None or not 1 <= r <= max_target:
                continue
            t = apply(r, o2, z)
            if t is not None and 1 <= t <= max_target:
                found.append((x, o1, y, o2, z, r, t))
    return tuple(found)


def expression(chain: tuple) -> str:
    """The answer of a chain: "(x o1 y) o2 z", parenthesised only where precedence needs it."""
    x, o1, y, o2, z = chain[:5]
    left = f"{x}{o1}{y}"
    if PRECEDENCE[o1] < PRECEDENCE[o2]:  # left-associative: "x-y-z" and "x*y/z" already read as (x o1 y) o2 z
        left = f"({left})"
    return f"{left}{o2}{z}"


def worked_trace(chain: tuple) -> str:
    """The cold-start completion for a chain: its two steps, then its expression."""
    x, o1, y, o2, z, r, t = chain
    return f" <think>{x}{o1}{y}={r} {r}{o2}{z}={t}</think> <answer>{expression(chain)}</answer>"


def question_text(numbers, target: int) -> str:
    return f"{' '.join(map(str, numbers))} to {target}"


def prompt_text(numbers, target: int) -> str:
    from trainers.prompts import r1_prompt

    return r1_prompt(question_text(numbers, target), system_prompt="", template=TEMPLATE)


def problem(numbers, target: int, ops: str = "+-*", max_target: int = 99) -> dict:
    """One problem row: question, answer (the target, as text), numbers, target and its solution chains."""
    numbers = tuple(int(n) for n in numbers)
    solutions = [c for c in chains(numbers, ops, max_target) if c[-1] == target]
    if not solutions:
        raise ValueError(f"{question_text(numbers, target)} has no solution with operations {ops!r}")
    return {"question": question_text(numbers, target), "answer": str(target), "numbers": list(numbers),
            "target": int(target), "solutions": solutions}


@lru_cache(maxsize=8)
def _keys(max_number: int, ops: str, max_target: int) -> tuple:
    """Every (sorted numbers, target) that has a solution."""
    keys = set()
    for numbers in itertools.combinations_with_replacement(range(1, max_number + 1), 3):
        keys.update((numbers, c[-1]) for c in chains(numbers, ops, max_target))
    return tuple(sorted(keys))


def split_problems(n_held_out: int, seed: int, ops: str = "+-*", max_number: int = 9,
                   max_target: int = 99) -> tuple[list[dict], list[dict]]:
    """(held-out problems, training problems). The keys (numbers as a multiset, target) are shuffled once with
    `seed`: the first `n_held_out` are held out (one problem each, its numbers in a random order), the others give
    every ordering of their numbers as training problems (shuffled)."""
    keys = list(_keys(max_number, ops, max_target))
    if not 0 < n_held_out < len(keys):
        raise ValueError(f"n_held_out must be between 1 and {len(keys) - 1} (there are {len(keys)} Countdown "
                         f"problems with numbers 1..{max_number}, operations {ops!r}), got {n_held_out}")
    rng = random.Random(seed)
    rng.shuffle(keys)
    held_out = []
    for numbers, target in keys[:n_held_out]:
        order = list(numbers)
        rng.shuffle(order)
        held_out.append(problem(order, target, ops, max_target))
    train = [problem(order, target, ops, max_target)
             for numbers, target in keys[n_held_out:] for order in sorted(set(itertools.permutations(numbers)))]
    rng.shuffle(train)
    return held_out, train


def trace_rows(problems: list[dict], seed: int) -> list[dict]:
    """Cold-start rows (prompt, completion, numbers, target): one solution per problem, chosen at random."""
    rng = random.Random(seed)
    return [{"prompt": prompt_text(p["numbers"], p["target"]), "completion": worked_trace(rng.choice(p["solutions"])),
             "numbers": p["numbers"], "target": p["target"]} for p in problems]


def fact_line(rng: random.Random, ops: str = "+-*", max_number: int = 9, max_target: int = 99,
              n_chains: int = 4) -> str:
    """Computation steps as a base model would have read them: `n_chains` random chains, two steps each."""
    steps = []
    while len(steps) < 2 * n_chains:
        numbers = tuple(rng.randint(1, max_number) for _ in range(3))
        options = chains(numbers, ops, max_target)
        if options:
            x, o1, y, o2, z, r, t = rng.choice(options)
            steps += [f"{x}{o1}{y}={r}", f"{r}{o2}{z}={t}"]
    return " ".join(steps)
