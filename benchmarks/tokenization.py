"""Tokenization speed: conversations through the chat template against the same rows as text.

Run by hand from the repository root::

    python benchmarks/tokenization.py               # 20,000 demo conversations, best of 3
    python benchmarks/tokenization.py --rows 2000   # a smoke run

What it measures: ``kdsweep.data.tokenize`` (render, one tokenizer call per split, labels from
the answers' characters) on the same generated demo conversations: as guanaco text rows
(``### Human: ...### Assistant: ...``), the plain path, and as ``messages`` rows through the demo
tokenizer's ChatML template (every assistant turn scored with its ``<|im_end|>``), both as a
train split is read (no prompts: only on-policy steps need them) and as an eval split is (the
generation prompt of each last answer, rendered and tokenized, for accuracy). Reported: rows per
second of each (the best of ``--repeats`` runs: the least disturbed by the rest of the machine)
and the ratio to the plain path. Goal: each chat path at least 0.5x the plain one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kdsweep.data import ChatTemplate, Conversation, tokenize  # noqa: E402
from kdsweep.prepare import demo, demo_models  # noqa: E402

GOAL = 0.5


def rows_per_second(
    rows: list, tokenizer, *, chat: ChatTemplate | None, with_prompts: bool, repeats: int
) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        tokenize(
            rows,
            tokenizer,
            max_length=64,
            assistant_only=True,
            chat=chat,
            with_prompts=with_prompts,
        )
        best = min(best, time.perf_counter() - started)
    return len(rows) / best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    conversations = demo.generate_conversations(args.rows, seed=0)
    tokenizer = demo_models.build_tokenizer(conversations[:2000])
    chat_rows = [Conversation(tuple((m["role"], m["content"]) for m in c)) for c in conversations]
    markers = {"user": "### Human: ", "assistant": "### Assistant: "}  # guanaco's
    text_rows = ["".join(markers[m["role"]] + m["content"] for m in c) for c in conversations]
    chat = ChatTemplate(tokenizer, tokenizer.chat_template)
    paths = {
        "text (guanaco markers)": (text_rows, None, False),
        "messages, as a train split": (chat_rows, chat, False),
        "messages, with prompts (eval)": (chat_rows, chat, True),
    }
    speeds = {
        name: rows_per_second(
            rows, tokenizer, chat=template, with_prompts=prompts, repeats=args.repeats
        )
        for name, (rows, template, prompts) in paths.items()
    }
    plain = speeds["text (guanaco markers)"]
    print(f"{args.rows:,} demo rows, best of {args.repeats}")
    print(f"{'path':<32} {'rows/s':>10} {'/ text':>8}")
    for name, speed in speeds.items():
        ratio = speed / plain
        verdict = (
            ""
            if name.startswith("text")
            else f"  goal >= {GOAL}: {'met' if ratio >= GOAL else 'NOT met'}"
        )
        print(f"{name:<32} {speed:>10,.0f} {ratio:>8.2f}{verdict}")
    return speeds


if __name__ == "__main__":
    main()
