"""Loading, guanaco parsing, label masks and batching, on local files and the demo tokenizer."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from kdsweep.data import (
    IGNORE_INDEX,
    TokenizedSplit,
    load_split,
    make_batches,
    padding_share,
    parse_guanaco,
    read_rows,
    tokenize,
)
from kdsweep.errors import UsageError
from kdsweep.prepare import demo_models
from kdsweep.study.config import DataConfig

from conftest import guanaco_rows

pytestmark = pytest.mark.usefixtures("datasets_cache")


@pytest.fixture(scope="module")
def tokenizer(demo_tokenizer):
    return demo_tokenizer


@pytest.fixture(scope="module")
def demo_split(tokenizer) -> TokenizedSplit:
    return tokenize(guanaco_rows(400, seed=5), tokenizer, max_length=64, assistant_only=True)


def load_texts(data: DataConfig, split: str, *, base_dir: str = ".") -> list:
    return read_rows(load_split(data, split, base_dir=base_dir), data, split=split).rows


def scored_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])


# --- guanaco turns ---------------------------------------------------------------------------


def test_parse_guanaco_multi_turn_in_order():
    text = "### Human: What is 2 + 2?### Assistant: 4.### Human: And times 3?### Assistant: 12."
    assert parse_guanaco(text) == [
        ("human", "What is 2 + 2?"),
        ("assistant", "4."),
        ("human", "And times 3?"),
        ("assistant", "12."),
    ]


def test_parse_guanaco_strips_whitespace_and_drops_empty_turns():
    text = "  ### Human:\n  Hi there \n\n### Assistant:   Hello!\n ### Human:   "
    assert parse_guanaco(text) == [("human", "Hi there"), ("assistant", "Hello!")]


def test_parse_guanaco_without_markers_is_one_answer():
    assert parse_guanaco("  plain text row\n") == [("assistant", "plain text row")]
    assert parse_guanaco("   ") == []


def test_parse_guanaco_text_before_the_first_marker_is_context():
    assert parse_guanaco("Be brief.### Human: Hi### Assistant: Yo") == [
        ("human", "Be brief."),
        ("human", "Hi"),
        ("assistant", "Yo"),
    ]


# --- tokenize ----------------------------------------------------------------------------------


def test_only_answers_and_final_eos_are_scored(tokenizer):
    text = "### Human: What is 12 + 30?### Assistant: The answer is 42."
    split = tokenize([text], tokenizer, max_length=64, assistant_only=True)
    ids, labels = split.input_ids[0], split.labels[0]
    assert scored_text(tokenizer, ids, labels).strip() == "The answer is 42.<|endoftext|>"
    # the markers stay in what the model sees
    assert tokenizer.decode(ids) == text + "<|endoftext|>"
    assert all(label in (i, IGNORE_INDEX) for i, label in zip(ids, labels))


def test_eos_is_scored_although_pad_equals_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the Qwen case
    split = tokenize(
        ["### Human: Hi?### Assistant: Hello."], tokenizer, max_length=64, assistant_only=True
    )
    assert split.input_ids[0][-1] == tokenizer.eos_token_id
    assert split.labels[0][-1] == tokenizer.eos_token_id


def test_multi_turn_scores_every_answer_and_no_question(tokenizer):
    text = "### Human: What is 2 + 2?### Assistant: 4.### Human: And times 3?### Assistant: 12."
    split = tokenize([text], tokenizer, max_length=64, assistant_only=True)
    scored = scored_text(tokenizer, split.input_ids[0], split.labels[0])
    assert "4" in scored and "12." in scored and scored.endswith("<|endoftext|>")
    assert "What" not in scored and "times" not in scored and "Human" not in scored


def test_eos_after_a_final_human_turn_is_not_scored(tokenizer):
    text = "### Human: What is 2 + 2?### Assistant: 4.### Human: Thanks!"
    split = tokenize([text], tokenizer, max_length=64, assistant_only=True)
    assert split.labels[0][-1] == IGNORE_INDEX
    assert scored_text(tokenizer, split.input_ids[0], split.labels[0]).strip().startswith("4")


def test_without_assistant_only_everything_is_scored(tokenizer):
    texts = ["### Human: What is 2 + 2?### Assistant: 4.", "plain text"]
    split = tokenize(texts, tokenizer, max_length=64, assistant_only=False)
    assert split.labels == split.input_ids
    assert split.num_scored_tokens == sum(len(ids) - 1 for ids in split.input_ids)


def test_plain_rows_are_kept_as_they_are_and_scored_whole(tokenizer):
    split = tokenize(["  plain text row "], tokenizer, max_length=64, assistant_only=True)
    assert tokenizer.decode(split.input_ids[0]) == "plain text row<|endoftext|>"
    assert split.labels[0] == split.input_ids[0]


def test_truncation_and_rows_without_scored_tokens_are_dropped(tokenizer):
    prompt = "### Human: Tell me a spice.### Assistant:"
    cut = len(tokenizer(prompt)["input_ids"]) + 5  # five tokens into the answer
    long_answer = prompt + " pepper" * 20
    long_prompt = "### Human:" + " Tell me a spice." * 20 + "### Assistant: pepper"
    texts = [long_answer, long_prompt, "### Human: no answer"]
    split = tokenize(texts, tokenizer, max_length=cut, assistant_only=True)
    assert len(split) == 1 and split.dropped == 2
    assert len(split.input_ids[0]) == cut == len(split.labels[0])
    # cut inside the answer: the last kept token is scored
    assert split.labels[0][-1] != IGNORE_INDEX


def test_num_scored_tokens_skips_position_zero(tokenizer):
    split = tokenize(["ab"], tokenizer, max_length=64, assistant_only=True)
    assert split.labels[0][0] != IGNORE_INDEX  # scored, but nothing predicts it
    assert split.num_scored_tokens == len(split.input_ids[0]) - 1


def test_a_bos_added_by_the_tokenizer_is_kept_and_not_scored(tokenizer):
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.add_special_tokens(["<s>"])
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)]),
        ]
    )
    llama_like = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|endoftext|>"
    )
    split = tokenize(
        ["### Human: Tell me a spice.### Assistant: pepper"],
        llama_like,
        max_length=64,
        assistant_only=True,
    )
    assert split.input_ids[0][0] == bos and split.labels[0][0] == IGNORE_INDEX
    assert scored_text(llama_like, split.input_ids[0], split.labels[0]) == " pepper<|endoftext|>"


def test_tokenize_needs_a_fast_tokenizer():
    class Slow:
        is_fast = False

    with pytest.raises(UsageError, match="fast"):
        tokenize(["x"], Slow(), max_length=8, assistant_only=True)


# --- batches -----------------------------------------------------------------------------------


def batch_kwargs(**overrides):
    return {
        "batch_size": 8,
        "pad_id": demo_models.EOS_TOKEN_ID,
        "shuffle_seed": 0,
        "group_by_length": True,
    } | overrides


def test_make_batches_is_deterministic(demo_split):
    first = make_batches(demo_split, **batch_kwargs())
    second = make_batches(demo_split, **batch_kwargs())
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.example_ids, b.example_ids)


@pytest.mark.parametrize("group_by_length", [False, True])
@pytest.mark.parametrize("shuffle_seed", [None, 3])
def test_batches_hold_every_example_once_and_never_score_padding(
    demo_split, group_by_length, shuffle_seed
):
    batches = make_batches(
        demo_split, **batch_kwargs(shuffle_seed=shuffle_seed, group_by_length=group_by_length)
    )
    seen = torch.cat([b.example_ids for b in batches]).tolist()
    assert sorted(seen) == list(range(len(demo_split)))
    for batch in batches:
        assert (
            batch.input_ids.dtype
            == batch.labels.dtype
            == batch.attention_mask.dtype
            == torch.int64
        )
        padding = batch.attention_mask == 0
        assert (batch.labels[padding] == IGNORE_INDEX).all()
        assert (batch.input_ids[padding] == demo_models.EOS_TOKEN_ID).all()
        for row, example in enumerate(batch.example_ids.tolist()):
            n = len(demo_split.input_ids[example])
            assert batch.input_ids[row, :n].tolist() == list(demo_split.input_ids[example])
            assert batch.labels[row, :n].tolist() == list(demo_split.labels[example])
            assert batch.attention_mask[row].sum() == n  # right padding
    assert sum(b.num_scored_tokens for b in batches) == demo_split.num_scored_tokens
    assert sum(b.num_tokens for b in batches) == sum(len(ids) for ids in demo_split.input_ids)


def test_without_a_seed_the_split_order_is_kept(demo_split):
    batches = make_batches(demo_split, **batch_kwargs(shuffle_seed=None, group_by_length=False))
    assert torch.cat([b.example_ids for b in batches]).tolist() == list(range(len(demo_split)))
    # the last batch may be short
    assert len(batches[-1].example_ids) == (len(demo_split) % 8 or 8)


@pytest.mark.parametrize("group_by_length", [False, True])
def test_seeds_give_different_orders(demo_split, group_by_length):
    def order(seed):
        batches = make_batches(
            demo_split, **batch_kwargs(shuffle_seed=seed, group_by_length=group_by_length)
        )
        return torch.cat([b.example_ids for b in batches]).tolist()

    assert order(0) != order(1)


def test_group_by_length_cuts_padding(demo_split):
    plain = padding_share(make_batches(demo_split, **batch_kwargs(group_by_length=False)))
    grouped = padding_share(make_batches(demo_split, **batch_kwargs(group_by_length=True)))
    assert grouped < plain / 3
    assert 0.0 <= grouped < plain < 1.0


def test_grouped_training_batches_start_with_the_longest(demo_split):
    batches = make_batches(demo_split, **batch_kwargs())
    assert batches[0].input_ids.shape[1] == max(len(ids) for ids in demo_split.input_ids)


def test_batch_to_moves_every_tensor(demo_split):
    batch = make_batches(demo_split, **batch_kwargs())[0]
    moved = batch.to("cpu")
    assert torch.equal(moved.labels, batch.labels) and moved.example_ids.device.type == "cpu"


# --- load_texts --------------------------------------------------------------------------------

ROWS = ["### Human: a?### Assistant: A.", "### Human: b?### Assistant: B.", "plain c", "plain d"]


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def test_load_jsonl_file_and_slice(tmp_path):
    write_jsonl(tmp_path / "rows.jsonl", ROWS)
    data = DataConfig(dataset=str(tmp_path / "rows.jsonl"))
    assert load_texts(data, "train") == ROWS
    assert load_texts(data, "train[:3]") == ROWS[:3]


def test_relative_path_is_taken_from_base_dir(tmp_path):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "rows.jsonl", ROWS)
    assert (
        load_texts(DataConfig(dataset="data/rows.jsonl"), "train", base_dir=str(tmp_path)) == ROWS
    )


def test_load_csv_and_parquet(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"body": ROWS, "n": range(len(ROWS))})
    frame.to_csv(tmp_path / "rows.csv", index=False)
    frame.to_parquet(tmp_path / "rows.parquet")
    for name in ("rows.csv", "rows.parquet"):
        data = DataConfig(dataset=str(tmp_path / name), text_field="body")
        assert load_texts(data, "train") == ROWS


def test_load_folder_splits(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "test.jsonl", ROWS[:2])
    data = DataConfig(dataset=str(tmp_path))
    assert load_texts(data, "train") == ROWS
    assert load_texts(data, "test") == ROWS[:2]


def test_missing_local_file(tmp_path):
    data = DataConfig(dataset="nowhere/rows.jsonl")
    with pytest.raises(
        UsageError,
        match=r"data\.dataset: no such file or folder 'nowhere/rows.jsonl'.*fix the path",
    ):
        load_texts(data, "train", base_dir=str(tmp_path))


def test_unknown_split_lists_the_available_ones(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "test.jsonl", ROWS)
    data = DataConfig(dataset=str(tmp_path), eval_split="validation")
    with pytest.raises(
        UsageError,
        match=r"data\.eval_split: .*no split 'validation' \(available: train, test\); set "
        r"data\.eval_split",
    ):
        load_texts(data, "validation")


def test_single_file_has_only_a_train_split(tmp_path):
    data = DataConfig(dataset=str(write_jsonl(tmp_path / "rows.jsonl", ROWS)))
    with pytest.raises(UsageError, match=r"no split 'test' \(available: train\).*slice it"):
        load_texts(data, "test")


def test_slice_without_rows(tmp_path):
    data = DataConfig(
        dataset=str(write_jsonl(tmp_path / "rows.jsonl", ROWS)), train_split="train[:0]"
    )
    with pytest.raises(
        UsageError, match=r"data\.train_split: cannot take 'train\[:0\]'.*selects rows"
    ):
        load_texts(data, "train[:0]")


def test_missing_text_field_lists_the_columns(tmp_path):
    data = DataConfig(dataset=str(write_jsonl(tmp_path / "rows.jsonl", ROWS, field="content")))
    with pytest.raises(
        UsageError,
        match=r"data\.text_field: .*no column 'text' \(columns: content, id\), nor the columns "
        r"conversations .*; set data\.text_field",
    ):
        load_texts(data, "train")


def test_empty_and_unsupported_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "rows.txt").write_text("x\n")
    with pytest.raises(UsageError, match="is empty"):
        load_texts(DataConfig(dataset=str(tmp_path / "empty.jsonl")), "train")
    with pytest.raises(
        UsageError, match=r"cannot read .*use a \.jsonl, \.json, \.parquet or \.csv file"
    ):
        load_texts(DataConfig(dataset=str(tmp_path / "rows.txt")), "train")


@pytest.mark.parametrize(
    ("offline", "fix"), [(True, "offline mode is on"), (False, "set HF_HUB_OFFLINE=1")]
)
def test_unreachable_hub_dataset(monkeypatch, tmp_path, offline, fix):
    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/rows' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", offline)
    found_nowhere = (
        "'someone/rows' was found neither as a local file or folder nor on the Hugging Face hub"
    )
    with pytest.raises(UsageError, match=rf"{found_nowhere} .*{fix}.*or use a \.jsonl"):
        load_texts(DataConfig(dataset="someone/rows"), "train", base_dir=str(tmp_path))
