"""R1-style prompts: a dataset of questions and answers -> TRL GRPO rows (`prompt`, `solution`).

DeepSeek-R1-Zero's template tells the model to reason inside <think> </think> and answer inside <answer> </answer>,
and nothing else; the rewards of trainers.rewards check exactly that structure (format_reward) and the answer
(accuracy_reward, which reads the `solution` column). Plain rows get one string ending in "Assistant:", for base
models; conversational rows get a system and a user message, for models with a chat template (TRL applies it).
"""

from __future__ import annotations

R1_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. The Assistant "
    "first thinks about the reasoning process in the mind and then provides the User with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>."
)
PLAIN_TEMPLATE = "{system} User: {question} Assistant:"


def r1_prompt(question: str, *, conversational: bool = False, system_prompt: str = R1_SYSTEM_PROMPT,
              template: str = PLAIN_TEMPLATE):
    """One R1-style prompt: a string (`template` filled with `system` and `question`) or a list of messages."""
    if conversational:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return messages + [{"role": "user", "content": question}]
    if "{question}" not in template:
        raise ValueError(f"the prompt template must contain {{question}}, got {template!r}")
    return template.format(system=system_prompt, question=question).strip()


def make_r1_prompts(dataset, question_column: str = "question", answer_column: str = "answer", *,
                    conversational: bool = False, system_prompt: str = R1_SYSTEM_PROMPT,
                    template: str = PLAIN_TEMPLATE, solution_column: str = "solution"):
    """Add `prompt` (R1-style) and `solution` (the gold answer, for accuracy_reward) to every row.

    `dataset` is a `datasets.Dataset` (mapped; the other columns are kept, TRL hands them to the rewards) or a list
    of dicts (a new list is returned).
    """
    def convert(row):
        if question_column not in row or answer_column not in row:
            raise KeyError(f"make_r1_prompts: a row lacks {question_column!r} or {answer_column!r}; it has "
                           f"{sorted(row)}")
        return {"prompt": r1_prompt(row[question_column], conversational=conversational,
                                    system_prompt=system_prompt, template=template),
                solution_column: str(row[answer_column])}

    if isinstance(dataset, list):
        return [{**row, **convert(row)} for row in dataset]
    return dataset.map(convert)
