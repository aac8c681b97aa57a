"""Task accuracy: prompts cut before the final answer, batched greedy decoding with left padding,
exact match and ROUGE-L, and the metrics a study logs."""

from __future__ import annotations

import random

import pytest
import torch
from rouge_score import rouge_scorer
from transformers import Qwen3Config, Qwen3ForCausalLM

from kdsweep.data import answer_text, tokenize
from kdsweep.distill.answers import (
    exact_match,
    extract,
    generated_answer,
    matches,
    rouge_l,
    words,
)
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


# --- answers after their reasoning, extracted; ROUGE-L in any script ----------------------------


@pytest.mark.parametrize(
    ("language", "answer"),
    [("zh", "北京是中国的首都。"), ("ja", "東京タワーはとても高い。"), ("ko", "안녕하세요, 세계")],
)
def test_rouge_l_scores_identical_cjk_answers_1(language, answer):
    """rouge_score's default keeps [a-z0-9] runs only: identical CJK answers score 0 there."""
    default = rouge_scorer.RougeScorer(["rougeL"]).score(answer, answer)["rougeL"].fmeasure
    assert rouge_l(answer, answer) == 1.0 and default == 0.0


def test_rouge_l_counts_each_cjk_character_as_a_word():
    """By hand: 北京很好 against 北京不好: an LCS of 3 of 4 characters each, F = 0.75; Korean
    syllables and kana alike."""
    assert words("今天天气很好, GPT-4 works! 東京タワー 안녕") == [
        "今", "天", "天", "气", "很", "好", "gpt", "4", "works", "東", "京", "タ", "ワ", "ー",
        "안", "녕",
    ]  # fmt: skip
    assert rouge_l("北京很好", "北京不好") == pytest.approx(0.75)
    assert rouge_l("안녕하세요", "안녕히세요") == pytest.approx(0.8)


def test_an_answer_is_what_follows_its_reasoning():
    assert generated_answer("<think>\n2 + 2 = 4\n</think>\n\n4") == "4"
    assert exact_match(generated_answer("<think>\nx\n</think>\n\n4"), "4")
    assert generated_answer("4") == "4"  # no think block: non-thinking mode
    assert generated_answer("<think>\nstill thinking when cut") is None  # never closed


@pytest.mark.parametrize(
    ("pattern", "generated", "reference", "same"),
    [
        ("gsm8k", "so 1,600 in all.\n#### 1,600", "She sold 1600.\n#### 1600", True),
        ("gsm8k", "#### 16", "#### 1600", False),
        ("gsm8k", "no marker: 1600", "#### 1600", False),
        ("boxed", r"thus \boxed{\frac{1}{2}}.", r"\boxed{\frac{1}{2}}", True),
        ("boxed", r"\boxed{2} then \boxed{3}", r"\boxed{3}", True),  # the last one counts
        (r"The answer is (\d+)", "The answer is 12. The answer is 13", "The answer is 13", True),
        (r"\d+", "I say 42", "42", True),  # no group: the whole match
        ("whole", "42", "42 ", True),
        ("whole", "42", "The answer is 42", False),
    ],
)
def test_eval_answer_extracts_from_generation_and_reference_alike(
    pattern, generated, reference, same
):
    assert matches(generated, reference, pattern) is same


def test_extraction_finds_nothing_where_there_is_nothing():
    assert extract("no box here", "boxed") is None
    assert extract(r"\boxed{open", "boxed") is None
    assert not matches(None, "4")


def test_truncated_answers_and_reasoning_lengths_are_measured(monkeypatch, qwen3_tokenizer):
    """Three answers: one reasons then answers; one is cut while reasoning (max_new_tokens
    reached, its think block open); one answers without reasoning. By hand: reasoning tokens
    are those up to and including </think>, or all of a cut one."""
    tokenizer = qwen3_tokenizer
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    said = ["<think>\nred\n</think>\n\nblue", "<think>\nred red red", "blue"]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in said]
    generations = [ids[0] + [end], ids[1], ids[2] + [end]]
    prompts = [(1,), (2,), (3,)]
    answers = Answers(prompts, ["blue"] * 3, tokenizer, EvalConfig(max_new_tokens=8), end)
    monkeypatch.setattr(
        "kdsweep.distill.evaluate.generate", lambda model, p, **kwargs: generations
    )
    found = accuracy(None, answers)
    assert found["exact_match"] == pytest.approx(2 / 3)
    assert found["truncated_share"] == pytest.approx(1 / 3)
    think = tokenizer("<think>\nred\n</think>", add_special_tokens=False)["input_ids"]
    assert found["reasoning_tokens"] == pytest.approx((len(think) + len(ids[1]) + 0) / 3)
