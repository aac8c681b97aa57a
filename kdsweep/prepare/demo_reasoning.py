"""The reasoning demo: a tiny Qwen3 teacher that thinks before it answers, distilled with its
traces and without them.

Each conversation asks for a chain of single-digit additions and subtractions whose every step
stays a digit ("What is 7 - 3 + 4 - 6?"); the assistant reasons in a think block, one step a line
("7 - 3 = 4", "4 + 4 = 8", "8 - 6 = 2"), then answers ("2"). A step is one of a hundred facts;
the answer composes three of them, which a small model learns far more easily one step at a time
than at once. The rows are rendered through Qwen3's published chat template, in thinking mode,
by a tokenizer with Qwen3's added tokens (``<think>`` and ``</think>`` are single tokens), as
Qwen3's rows are. Everything is generated here, deterministically: a corpus of 20,000 rows on
which the teacher (~490K parameters) is trained once and cached, the 500 rows the students
(~110K) train on, and 500 held-out rows (in ``studies/data/sums``) whose chains are in neither.
A study names the models ``demo:reasoning-teacher`` and ``demo:reasoning-student``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from rich.console import Console
from transformers import Qwen3ForCausalLM

from kdsweep.paths import cache_dir
from kdsweep.prepare.demo_models import (
    TEACHER_SHAPE,
    Messages,
    build_tokenizer,
    config,
    parameters,
    train_and_save,
)

PREFIX = "reasoning-"  # demo:reasoning-teacher, demo:reasoning-student
STEPS = 3  # operations per chain
_QUESTIONS = ("What is {}?", "Compute {}.", "{} = ?", "Work out {}.")
CORPUS_ROWS, TRAIN_ROWS, HELD_OUT_ROWS = 20_000, 500, 500
VALIDATION_ROWS = TEST_ROWS = HELD_OUT_ROWS // 2
SEED = 0

# The student: wider than the demo's, as this vocabulary is small (a few hundred tokens).
STUDENT_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
}
# Bump when the data, tokenizer, shapes or teacher training change: it names the cache.
DEMO_VERSION = 1
TEACHER_TRAINING = {"max_steps": 800, "batch_size": 32, "learning_rate": 3e-3, "eval_every": 400}

Chain = tuple[int, tuple[tuple[str, int], ...]]  # a start, then each (operation, operand)


def chain(rng: random.Random) -> Chain:
    """A chain of :data:`STEPS` operations whose every result is a digit."""
    while True:
        start = value = rng.randint(0, 9)
        steps = []
        for _ in range(STEPS):
            op, operand = rng.choice("+-"), rng.randint(1, 9)
            value = value + operand if op == "+" else value - operand
            if not 0 <= value <= 9:
                break
            steps.append((op, operand))
        else:
            return start, tuple(steps)


def conversation(item: Chain, rng: random.Random) -> Messages:
    """The question, and the answer after its reasoning inline, as open-r1's traces are kept.

    Example:
        >>> conversation((7, (("-", 3), ("+", 4), ("-", 6))), random.Random(0))[1]["content"]
        '<think>\\n7 - 3 = 4\\n4 + 4 = 8\\n8 - 6 = 2\\n</think>\\n\\n2'
    """
    value, steps = item
    expression = f"{value}" + "".join(f" {op} {n}" for op, n in steps)
    lines = []
    for op, n in steps:
        after = value + n if op == "+" else value - n
        lines.append(f"{value} {op} {n} = {after}")
        value = after
    reasoning = "\n".join(lines)
    return [
        {"role": "user", "content": rng.choice(_QUESTIONS).format(expression)},
        {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{value}"},
    ]


def splits() -> tuple[list[Messages], list[Messages], list[Messages]]:
    """The teacher's corpus, the students' train split and the held-out rows (validation, then
    test): the held-out chains are in neither of the others."""
    rng = random.Random(SEED)
    held_out: dict[Chain, None] = {}
    while len(held_out) < HELD_OUT_ROWS:
        held_out[chain(rng)] = None

    def seen(n: int) -> list[Messages]:
        rows = []
        while len(rows) < n:
            if (item := chain(rng)) not in held_out:
                rows.append(conversation(item, rng))
        return rows

    corpus, train = seen(CORPUS_ROWS), seen(TRAIN_ROWS)
    return corpus, train, [conversation(item, rng) for item in held_out]


def write_demo_data(folder: str | Path) -> None:
    """Write ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` (a ``messages`` field per
    row) into ``folder``: what ``studies/data/sums`` ships."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _, train, held_out = splits()
    for name, rows in (
        ("train.jsonl", train),
        ("validation.jsonl", held_out[:VALIDATION_ROWS]),
        ("test.jsonl", held_out[VALIDATION_ROWS:]),
    ):
        (folder / name).write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))


def models_root() -> Path:
    """Where the reasoning demo's teacher and student (with the tokenizer) are kept."""
    return cache_dir() / "demo" / f"reasoning-v{DEMO_VERSION}"


def build_models(folders: dict[str, Path]) -> None:
    """Train the teacher on the corpus, and save it with an untrained student."""
    console = Console(stderr=True)
    corpus, _, held_out = splits()
    tokenizer = build_tokenizer(corpus, qwen3=True)
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(0)
    student = Qwen3ForCausalLM(config(len(tokenizer), STUDENT_SHAPE, **ids))
    teacher = Qwen3ForCausalLM(config(len(tokenizer), TEACHER_SHAPE, **ids))
    console.print(
        f"building the reasoning demo's teacher ({parameters(teacher):,} parameters) in "
        f"{folders['teacher'].parent}: one-time, a few minutes"
    )
    train_and_save(
        folders,
        teacher,
        student,
        tokenizer,
        corpus,
        held_out,
        settings=TEACHER_TRAINING,
        console=console,
    )
