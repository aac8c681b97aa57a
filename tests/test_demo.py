"""The embedded demo: generated data, the shipped files, the tokenizer and the model sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, Qwen3ForCausalLM

from kdsweep import demo, paths
from kdsweep.data import parse_guanaco

SHIPPED = Path(__file__).resolve().parents[1] / "studies" / "data" / "arithmetic"


@pytest.fixture(scope="module")
def train_rows() -> list[str]:
    return [json.loads(line)["text"] for line in (SHIPPED / "train.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer(train_rows):
    return demo.build_tokenizer(train_rows)


def test_generator_is_deterministic():
    assert demo.generate_rows(50, seed=3) == demo.generate_rows(50, seed=3)
    assert demo.generate_rows(50, seed=3) != demo.generate_rows(50, seed=4)


def test_rows_are_guanaco_exchanges_with_varied_answers():
    rows = demo.generate_rows(500, seed=0)
    for row in rows:
        turns = parse_guanaco(row)
        assert [speaker for speaker, _ in turns] == ["human", "assistant"] * (len(turns) // 2)
    assert any(len(parse_guanaco(row)) == 4 for row in rows)  # some follow-up questions
    answers = {parse_guanaco(row)[1][1].split()[0].isdigit() for row in rows}
    assert answers == {True, False}  # several phrasings of an answer


def test_shipped_files_are_what_the_generator_writes(tmp_path):
    demo.write_demo_data(tmp_path)
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / name).read_text() == (SHIPPED / name).read_text(), f"regenerate {SHIPPED / name}"


def test_test_rows_are_not_training_rows(train_rows):
    test_rows = [json.loads(line)["text"] for line in (SHIPPED / "test.jsonl").read_text().splitlines()]
    assert len(train_rows) == demo.TRAIN_ROWS and len(test_rows) == demo.TEST_ROWS
    assert not set(test_rows) & set(train_rows)
    assert len(set(test_rows)) == len(test_rows)


def test_tokenizer_is_small_qwen_like_and_short_on_rows(tokenizer, train_rows):
    assert tokenizer.is_fast and len(tokenizer) <= 512
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == demo.EOS_TOKEN_ID
    assert tokenizer.bos_token is None
    lengths = [len(ids) for ids in tokenizer(train_rows)["input_ids"]]
    assert max(lengths) <= 60 and sum(lengths) / len(lengths) < 40
    text = "### Human: Ünïcode & emoji 🙂?### Assistant: fine."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # bytes: nothing is unknown


def test_tokenizer_is_deterministic(tokenizer, train_rows):
    again = demo.build_tokenizer(train_rows)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_tokenizer_round_trips_through_a_folder(tokenizer, train_rows, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.is_fast
    assert loaded(train_rows[:20])["input_ids"] == tokenizer(train_rows[:20])["input_ids"]
    assert (loaded.eos_token_id, loaded.pad_token_id, len(loaded)) == (
        tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer))


def count_parameters(config) -> int:
    return sum(p.numel() for p in Qwen3ForCausalLM(config).parameters())


def test_model_sizes_and_settings(tokenizer):
    vocab_size = len(tokenizer)
    teacher, student = demo.teacher_config(vocab_size), demo.student_config(vocab_size)
    assert 1.6e6 < count_parameters(teacher) < 2.0e6
    assert 50e3 < count_parameters(student) < 65e3
    for config in (teacher, student):
        assert config.vocab_size == vocab_size and config.tie_word_embeddings
        assert config.eos_token_id == config.pad_token_id == tokenizer.eos_token_id
        assert config.max_position_embeddings >= 256


def test_cache_folders(monkeypatch, tmp_path):
    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path))
    assert paths.cache_dir() == tmp_path
    assert demo.demo_dir() == tmp_path / "demo"
    monkeypatch.delenv("KDSWEEP_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert paths.cache_dir() == Path.home() / ".cache" / "kdsweep"
