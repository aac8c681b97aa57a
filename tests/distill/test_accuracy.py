"""Task accuracy: prompts cut before the final answer, batched greedy decoding with left padding,
exact match and ROUGE-L, and the metrics a study logs."""

from __future__ import annotations

import random

import pytest
import torch
from rouge_score import rouge_scorer
from transformers import Qwen3Config, Qwen3ForCausalLM

from kdsweep.data import answer_text, tokenize
from kdsweep.distill.answers import exact_match, rouge_l
from kdsweep.distill.evaluate import Answers, accuracy
from kdsweep.distill.generation import generate
from kdsweep.study.config import EvalConfig

from conftest import guanaco_rows


@pytest.fixture(scope="module")
def tokenizer(demo_tokenizer):
    return demo_tokenizer


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=True,
        max_position_embeddings=128,
    )
    return Qwen3ForCausalLM(config).eval()


def test_prompts_end_where_the_final_answer_begins(tokenizer):
    rows = [
        "### Human: What is 2 + 3?### Assistant: The answer is 5.",
        "### Human: What is 7 * 6?### Assistant: 42",
        # ends with the human: no answer to ask for
        "### Human: Hi### Assistant: Hello.### Human: Bye",
        "plain text without turns",  # no prompt at all
    ]
    split = tokenize(rows, tokenizer, max_length=64, assistant_only=True)
    assert split.answered() == [0, 1]
    assert tokenizer.decode(split.prompt(0)).rstrip() == "### Human: What is 2 + 3?### Assistant:"
    assert split.answers[:2] == ("The answer is 5.", "42")
    for e in (0, 1):  # the prompt is a prefix of the row's own tokens, and the answer is not in it
        assert split.input_ids[e][: len(split.prompt(e))] == split.prompt(e)
        assert split.answers[e] not in tokenizer.decode(split.prompt(e))
        assert (
            tokenizer.decode(
                split.input_ids[e][len(split.prompt(e)) :], skip_special_tokens=True
            ).strip()
            == split.answers[e]
        )
    assert split.prompt(2) == () and split.prompt(3) == ()


def test_a_truncated_answer_is_not_asked_for(tokenizer):
    row = "### Human: What is 12 * 11?### Assistant: The answer is 132."
    full = tokenize([row], tokenizer, max_length=64, assistant_only=True)
    cut = tokenize([row], tokenizer, max_length=len(full.prompt(0)), assistant_only=False)
    assert full.answered() == [0] and cut.answered() == []


def test_batched_left_padded_decoding_equals_one_prompt_at_a_time(model, tokenizer):
    split = tokenize(guanaco_rows(40, seed=5), tokenizer, max_length=64, assistant_only=True)
    prompts = [split.prompt(e) for e in split.answered()]
    assert len({len(p) for p in prompts}) > 3  # lengths differ: batches need padding
    batched = generate(model, prompts, pad_id=0, eos_id=0, max_new_tokens=8, batch_size=16)
    alone = [
        generate(model, [p], pad_id=0, eos_id=0, max_new_tokens=8, batch_size=1)[0]
        for p in prompts
    ]
    assert batched == alone
    assert all(len(tokens) <= 8 for tokens in batched)


def test_generation_stops_at_eos_and_keeps_it(model, tokenizer):
    prompts = [tuple(tokenizer("### Human: What is 1 + 1?### Assistant:")["input_ids"])]
    # the first greedy token
    eos = generate(model, prompts, pad_id=0, eos_id=0, max_new_tokens=20, batch_size=1)[0][0]
    stopped = generate(model, prompts, pad_id=0, eos_id=eos, max_new_tokens=20, batch_size=1)[0]
    assert stopped == [eos]


def test_exact_match_normalises_whitespace_only():
    assert exact_match("  The answer\n is  5. ", "The answer is 5.")
    assert not exact_match("the answer is 5.", "The answer is 5.")
    assert not exact_match("The answer is 5", "The answer is 5.")


@pytest.mark.parametrize("seed", range(5))
def test_rouge_l_equals_the_rouge_score_package(seed):
    rng = random.Random(seed)
    words = ["The", "cat", "sat", "on", "the", "mat,", "and", "5", "dogs", "ran!", "away"]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for _ in range(50):
        prediction = " ".join(rng.choices(words, k=rng.randint(0, 9)))
        reference = " ".join(rng.choices(words, k=rng.randint(1, 9)))
        expected = scorer.score(reference, prediction)["rougeL"].fmeasure
        assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12), (
            prediction,
            reference,
        )


def test_the_answer_stops_at_the_next_turn():
    assert answer_text(" 7 * 9 = 63.### Human: and 8?") == "7 * 9 = 63."
    assert answer_text("The answer is 5.") == "The answer is 5."


def test_accuracy_scores_what_the_model_says(model, tokenizer, monkeypatch):
    """Exact match and ROUGE-L are the means over rows of what greedy decoding produced."""
    split = tokenize(
        ["### Human: a?### Assistant: yes it is", "### Human: b?### Assistant: no"],
        tokenizer,
        max_length=64,
        assistant_only=True,
    )
    answers = Answers.of(
        split, tokenizer, EvalConfig(accuracy=True, max_new_tokens=8, batch_size=2)
    )
    said = {answers.prompts[0]: " yes it is", answers.prompts[1]: " yes"}

    def fake_generate(model, prompts, **kwargs):
        return [tokenizer(said[tuple(p)])["input_ids"] + [tokenizer.eos_token_id] for p in prompts]

    monkeypatch.setattr("kdsweep.distill.evaluate.generate", fake_generate)
    scores = accuracy(model, answers)
    assert scores["exact_match"] == pytest.approx(0.5)
    assert scores["rouge_l"] == pytest.approx((1.0 + 0.0) / 2)


def test_max_rows_caps_the_rows_decoded(tokenizer):
    split = tokenize(guanaco_rows(30, seed=2), tokenizer, max_length=64, assistant_only=True)
    answers = Answers.of(split, tokenizer, EvalConfig(accuracy=True, max_rows=7))
    assert len(answers.prompts) == len(answers.references) == 7
    assert answers.references == [split.answers[e] for e in split.answered()[:7]]
