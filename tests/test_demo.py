"""The embedded demo: generated conversations, the shipped files, the held-out rows, the
tokenizer and the model sizes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoTokenizer, Qwen3ForCausalLM

from kdsweep import demo, paths
from kdsweep.data import parse_guanaco

SHIPPED = Path(__file__).resolve().parents[1] / "studies" / "data" / "picks"


def shipped(name: str) -> list[str]:
    return [json.loads(line)["text"] for line in (SHIPPED / f"{name}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def splits():
    return demo.splits()


@pytest.fixture(scope="module")
def tokenizer(splits):
    corpus, _, _ = splits
    return demo.build_tokenizer(corpus)


def test_generator_is_deterministic():
    assert demo.generate_rows(50, seed=3) == demo.generate_rows(50, seed=3)
    assert demo.generate_rows(50, seed=3) != demo.generate_rows(50, seed=4)


def test_rows_ask_for_a_member_of_a_category_and_answer_with_one():
    for row in demo.generate_rows(500, seed=0):
        turns = parse_guanaco(row)
        assert [speaker for speaker, _ in turns] == ["human", "assistant"] * demo.TURNS
        for (_, question), (_, answer) in zip(turns[::2], turns[1::2]):
            category = max((c for c in demo.CATEGORIES if question.rstrip(".?").endswith(f" {c}")), key=len)
            assert answer in demo.answers(category)


def test_answers_are_several_and_the_popular_ones_more_likely():
    """A question has several right answers; the first-listed is the most frequent one."""
    fruit = Counter(
        answer for row in demo.generate_rows(20_000, seed=5)
        for (_, question), (_, answer) in zip(parse_guanaco(row)[::2], parse_guanaco(row)[1::2])
        if question.endswith(" fruit.") or question.endswith(" fruit?")
    )
    assert len(fruit) == len(demo.answers("fruit")) >= 4
    assert fruit.most_common(1)[0][0] == demo.answers("fruit")[0]
    assert fruit["apple"] > 2 * fruit["banana"] * 0.8  # weights 1 and 1/2


def test_shipped_files_are_what_the_generator_writes(tmp_path):
    demo.write_demo_data(tmp_path)
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / name).read_text() == (SHIPPED / name).read_text(), f"regenerate {SHIPPED / name}"


def test_held_out_rows_are_in_neither_the_corpus_nor_the_train_split(splits):
    corpus, train, test = splits
    assert (len(train), len(test)) == (demo.TRAIN_ROWS, demo.TEST_ROWS) == (len(shipped("train")), len(shipped("test")))
    assert len(corpus) > 19_900  # the 20,000 generated, less the few equal to a held-out row
    assert len(set(test)) == len(test)
    assert not set(test) & set(corpus) and not set(test) & set(train)


def test_the_teacher_knows_answers_the_students_data_never_shows(splits):
    """What makes distillation worth it here: many right answers are in the teacher's corpus and
    not in the 200 rows the students train on."""
    corpus, train, _ = splits

    def answers_of(rows):
        return {answer for row in rows for _, answer in parse_guanaco(row)[1::2]}

    assert len(answers_of(corpus)) > 1.5 * len(answers_of(train))
    assert answers_of(train) <= answers_of(corpus)


def test_tokenizer_is_qwen_like_and_answers_are_single_tokens(tokenizer, splits):
    assert tokenizer.is_fast and len(tokenizer) <= demo.MAX_VOCAB_SIZE
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == demo.EOS_TOKEN_ID
    assert tokenizer.bos_token is None
    _, train, test = splits
    lengths = [len(ids) for ids in tokenizer(train + test)["input_ids"]]
    assert max(lengths) <= 40
    # Words are one token, or two (" ice cream"); numbers are read digit by digit, as Qwen reads them.
    words = [a for c in demo.CATEGORIES for a in demo.answers(c) if not a.isdigit()]
    multi = [a for a in words if len(tokenizer(" " + a)["input_ids"]) > 2]
    assert len(multi) <= 3, multi
    text = "### Human: Ünïcode & emoji 🙂?### Assistant: fine."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # bytes: nothing is unknown


def test_tokenizer_round_trips_through_a_folder(tokenizer, tmp_path):
    rows = shipped("train")[:20]
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.is_fast
    assert loaded(rows)["input_ids"] == tokenizer(rows)["input_ids"]
    assert (loaded.eos_token_id, loaded.pad_token_id, len(loaded)) == (tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer))


def count_parameters(config) -> int:
    return sum(p.numel() for p in Qwen3ForCausalLM(config).parameters())


def test_model_sizes_and_settings(tokenizer):
    vocab_size = len(tokenizer)
    teacher, student = demo.teacher_config(vocab_size), demo.student_config(vocab_size)
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
