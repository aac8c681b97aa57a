"""The embedded demo: generated conversations, the shipped files, the held-out rows, the
tokenizer and the model sizes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoTokenizer, Qwen3ForCausalLM

from kdsweep import paths
from kdsweep.prepare import demo, demo_models, demo_reasoning

from conftest import ROOT

SHIPPED = ROOT / "studies" / "data" / "picks"


def shipped(name: str) -> list[list[dict]]:
    return [
        json.loads(line)["messages"]
        for line in (SHIPPED / f"{name}.jsonl").read_text().splitlines()
    ]


def exchanges(messages: list[dict]) -> list[tuple[str, str]]:
    """(question, answer) pairs of a demo conversation."""
    return [(q["content"], a["content"]) for q, a in zip(messages[::2], messages[1::2])]


@pytest.fixture(scope="module")
def splits():
    return demo.splits()


@pytest.fixture(scope="module")
def tokenizer(splits):
    corpus, _, _ = splits
    return demo_models.build_tokenizer(corpus)


def test_generator_is_deterministic():
    assert demo.generate_conversations(50, seed=3) == demo.generate_conversations(50, seed=3)
    assert demo.generate_conversations(50, seed=3) != demo.generate_conversations(50, seed=4)


def test_rows_ask_for_a_member_of_a_category_and_answer_with_one():
    for messages in demo.generate_conversations(500, seed=0):
        assert [m["role"] for m in messages] == ["user", "assistant"] * demo.TURNS
        for question, answer in exchanges(messages):
            category = max(
                (c for c in demo.CATEGORIES if question.rstrip(".?").endswith(f" {c}")), key=len
            )
            assert answer in demo.answers(category)


def test_answers_are_several_and_the_popular_ones_more_likely():
    """A question has several right answers; the first-listed is the most frequent one."""
    fruit = Counter(
        answer
        for messages in demo.generate_conversations(20_000, seed=5)
        for question, answer in exchanges(messages)
        if question.endswith(" fruit.") or question.endswith(" fruit?")
    )
    assert len(fruit) == len(demo.answers("fruit")) >= 4
    assert fruit.most_common(1)[0][0] == demo.answers("fruit")[0]
    assert fruit["apple"] > 2 * fruit["banana"] * 0.8  # weights 1 and 1/2


def test_shipped_files_are_what_the_generator_writes(tmp_path):
    demo.write_demo_data(tmp_path)
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl"):
        assert (tmp_path / name).read_text() == (SHIPPED / name).read_text(), (
            f"regenerate {SHIPPED / name}"
        )


def test_held_out_rows_are_in_neither_the_corpus_nor_the_train_split(splits):
    corpus, train, test = splits
    assert (len(train), len(test)) == (demo.TRAIN_ROWS, demo.HELD_OUT_ROWS)
    assert (len(shipped("train")), len(shipped("validation")), len(shipped("test"))) == (
        demo.TRAIN_ROWS,
        demo.VALIDATION_ROWS,
        demo.TEST_ROWS,
    )
    assert shipped("validation") + shipped("test") == test  # held out: first half, second half
    assert len(corpus) > 19_900  # the 20,000 generated, less the few equal to a held-out row
    keys = {
        name: {json.dumps(c) for c in rows}
        for name, rows in (("corpus", corpus), ("train", train), ("test", test))
    }
    assert len(keys["test"]) == len(test)
    assert not keys["test"] & keys["corpus"] and not keys["test"] & keys["train"]


def test_the_teacher_knows_answers_the_students_data_never_shows(splits):
    """What makes distillation worth it here: many right answers are in the teacher's corpus and
    not in the 200 rows the students train on."""
    corpus, train, _ = splits

    def answers_of(rows):
        return {answer for messages in rows for _, answer in exchanges(messages)}

    assert len(answers_of(corpus)) > 1.5 * len(answers_of(train))
    assert answers_of(train) <= answers_of(corpus)


def test_tokenizer_is_qwen_like_and_answers_are_single_tokens(tokenizer, splits):
    assert tokenizer.is_fast and len(tokenizer) <= demo_models.MAX_VOCAB_SIZE
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == demo_models.EOS_TOKEN_ID
    assert tokenizer.bos_token is None
    _, train, test = splits
    lengths = [
        len(ids) for ids in tokenizer([demo_models.chatml(c) for c in train + test])["input_ids"]
    ]
    assert max(lengths) <= 48
    # Words are one token, or two ("ice cream"); numbers are read digit by digit, as Qwen reads
    # them.
    words = [a for c in demo.CATEGORIES for a in demo.answers(c) if not a.isdigit()]
    multi = [a for a in words if len(tokenizer(a)["input_ids"]) > 2]
    assert len(multi) <= 3, multi
    text = "<|im_start|>user\nÜnïcode & emoji 🙂?<|im_end|>\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # bytes: nothing is unknown


def test_tokenizer_has_qwens_chat_template_and_turn_tokens(tokenizer, splits):
    """ChatML, as Qwen writes it: <|im_start|> and <|im_end|> are special tokens, one id each,
    and the template renders a conversation as demo_models.chatml does."""
    _, train, _ = splits
    for token in (demo_models.TURN_START, demo_models.TURN_END):
        assert tokenizer.added_tokens_decoder[tokenizer.convert_tokens_to_ids(token)].special
        assert len(tokenizer(token)["input_ids"]) == 1
    assert tokenizer.apply_chat_template(train[0], tokenize=False) == demo_models.chatml(train[0])
    prompt = tokenizer.apply_chat_template(
        train[0][:1], tokenize=False, add_generation_prompt=True
    )
    assert prompt == demo_models.chatml(train[0][:1]) + "<|im_start|>assistant\n"


def test_tokenizer_round_trips_through_a_folder(tokenizer, tmp_path):
    rows = [demo_models.chatml(c) for c in shipped("train")[:20]]
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.is_fast
    assert loaded(rows)["input_ids"] == tokenizer(rows)["input_ids"]
    assert (loaded.eos_token_id, loaded.pad_token_id, len(loaded)) == (
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        len(tokenizer),
    )
    assert loaded.chat_template == tokenizer.chat_template


def count_parameters(config) -> int:
    return sum(p.numel() for p in Qwen3ForCausalLM(config).parameters())


def test_model_sizes_and_settings(tokenizer):
    vocab_size = len(tokenizer)
    teacher, student = (
        demo_models.teacher_config(vocab_size),
        demo_models.student_config(vocab_size),
    )
    assert 0.55e6 < count_parameters(teacher) < 0.8e6
    assert 60e3 < count_parameters(student) < 100e3
    for config in (teacher, student):
        assert config.vocab_size == vocab_size and config.tie_word_embeddings
        assert config.eos_token_id == config.pad_token_id == tokenizer.eos_token_id
        assert config.max_position_embeddings >= 64


def test_cache_folders(monkeypatch, tmp_path):
    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path))
    assert paths.cache_dir() == tmp_path
    assert demo.demo_dir() == tmp_path / "demo"
    monkeypatch.delenv("KDSWEEP_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert paths.cache_dir() == Path.home() / ".cache" / "kdsweep"


def test_the_demo_models_are_built_once_by_kdsweeps_own_loop(monkeypatch, capsys):
    """The build on first use, at a fraction of its corpus and steps."""
    monkeypatch.setattr(demo, "CORPUS_ROWS", 400)
    monkeypatch.setattr(demo, "TEACHER_TRAINING", demo.TEACHER_TRAINING | {"max_steps": 4})
    folders = demo.ensure_models()
    err = capsys.readouterr().err
    assert "teacher step 4/4: loss" in err and "teacher step 4: held-out perplexity" in err
    teacher = Qwen3ForCausalLM.from_pretrained(folders["teacher"])
    assert teacher.config.hidden_size == demo.teacher_config(10).hidden_size
    assert (folders["student"] / "tokenizer.json").exists()
    assert demo.ensure_models() == folders  # built once


def test_the_reasoning_demo_models_are_built_once_by_kdsweeps_own_loop(monkeypatch, capsys):
    """As the demo's, at a fraction of its corpus and steps: a teacher with Qwen3's tokens."""
    monkeypatch.setattr(demo_reasoning, "CORPUS_ROWS", 400)
    steps = demo_reasoning.TEACHER_TRAINING | {"max_steps": 4, "eval_every": 4}
    monkeypatch.setattr(demo_reasoning, "TEACHER_TRAINING", steps)
    teacher = demo.location("demo:reasoning-teacher")
    err = capsys.readouterr().err
    assert "teacher step 4/4: loss" in err and "teacher step 4: held-out perplexity" in err
    assert Qwen3ForCausalLM.from_pretrained(teacher).config.num_hidden_layers
    student = demo.location("demo:reasoning-student")  # built with the teacher, not again
    assert "building" not in capsys.readouterr().err
    assert AutoTokenizer.from_pretrained(student).chat_template == (
        demo_models.QWEN3_CHAT_TEMPLATE
    )
