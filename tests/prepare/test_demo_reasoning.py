"""The reasoning demo: its chains and their traces, the shipped files, held-out chains nobody
trains on, and rows rendered through Qwen3's template in thinking mode."""

from __future__ import annotations

import json
import random
import re

import pytest

from kdsweep.data import ChatTemplate, tokenize
from kdsweep.errors import UsageError
from kdsweep.prepare import demo, demo_models, demo_reasoning

from conftest import ROOT

SHIPPED = ROOT / "studies" / "data" / "sums"
_STEP = re.compile(r"(\d) ([+-]) (\d) = (\d)")
_CHAIN = re.compile(r"\d( [+-] \d)+")


@pytest.fixture(scope="module")
def splits():
    return demo_reasoning.splits()


def test_every_step_is_a_digit_fact_and_the_answer_its_last_result(splits):
    corpus, train, held_out = splits
    for messages in corpus[:2000] + train + held_out:
        question, answer = messages[0]["content"], messages[1]["content"]
        reasoning, result = answer.removeprefix("<think>\n").split("\n</think>\n\n")
        steps = [_STEP.fullmatch(line).groups() for line in reasoning.split("\n")]
        assert len(steps) == demo_reasoning.STEPS
        for (a, op, b, c), after in zip(steps, [s[0] for s in steps[1:]] + [result]):
            assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(after)
        expression = f"{steps[0][0]}" + "".join(f" {op} {b}" for _, op, b, _ in steps)
        assert expression in question


def chain_of(messages: list[dict]) -> str:
    return _CHAIN.search(messages[0]["content"]).group(0)


def test_held_out_chains_are_in_neither_the_corpus_nor_the_train_split(splits):
    corpus, train, held_out = splits
    chains = {chain_of(m) for m in held_out}
    assert len(chains) == len(held_out) == demo_reasoning.HELD_OUT_ROWS
    assert not chains & {chain_of(m) for m in corpus + train}


def test_the_shipped_files_are_the_generated_rows(splits):
    _, train, held_out = splits
    shipped = {
        name: [json.loads(line)["messages"] for line in (SHIPPED / f"{name}.jsonl").open()]
        for name in ("train", "validation", "test")
    }
    assert shipped["train"] == train
    assert shipped["validation"] + shipped["test"] == held_out
    assert len(shipped["validation"]) == demo_reasoning.VALIDATION_ROWS


def test_rows_render_through_qwen3s_template_in_thinking_mode(splits):
    """The think block is scored with the answer; the prompt stops where Qwen3 starts to write
    it; the example's chain, by hand."""
    corpus, train, _ = splits
    tokenizer = demo_models.build_tokenizer(corpus[:2000], qwen3=True)
    row = demo_reasoning.conversation((7, (("-", 3), ("+", 4), ("-", 6))), random.Random(0))
    split = tokenize(
        demo_models.conversations([row]),
        tokenizer,
        max_length=64,
        assistant_only=True,
        chat=ChatTemplate(tokenizer, tokenizer.chat_template),
    )
    scored = [i for i, label in zip(split.input_ids[0], split.labels[0]) if label == i]
    assert (
        tokenizer.decode(scored)
        == "<think>\n7 - 3 = 4\n4 + 4 = 8\n8 - 6 = 2\n</think>\n\n2<|im_end|>"
    )
    assert tokenizer.decode(split.prompt(0)).endswith("<|im_start|>assistant\n")
    assert split.answers == ("2",)
    longest = tokenize(
        demo_models.conversations(train),
        tokenizer,
        max_length=64,
        assistant_only=True,
        chat=ChatTemplate(tokenizer, tokenizer.chat_template),
    )
    assert longest.dropped == 0 and max(map(len, longest.input_ids)) < 64


def test_a_study_names_the_models_and_an_unknown_demo_model_is_refused():
    assert demo.is_demo("demo:reasoning-teacher") and not demo.built("demo:reasoning-student")
    with pytest.raises(UsageError, match="unknown demo model 'demo:reasoner'; use demo:teacher"):
        demo.location("demo:reasoner")
