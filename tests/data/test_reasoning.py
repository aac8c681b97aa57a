"""Reasoning through Qwen3's published chat template and a tokenizer with Qwen3's added tokens:
what is rendered, which tokens are scored (by hand), the prompt accuracy decodes from, in
thinking and non-thinking mode, with the reasoning under a key and inline, single- and
multi-turn, each conversation once or each turn as the last; and every refusal as one line."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from kdsweep.cli import main
from kdsweep.data import IGNORE_INDEX, ChatTemplate, load_split, read_rows, tokenize
from kdsweep.data.reasoning import AnswerCounts
from kdsweep.errors import UsageError
from kdsweep.prepare import demo_models
from kdsweep.study.config import DataConfig

from conftest import QWEN3_TEMPLATE, write_tiny_study

pytestmark = pytest.mark.usefixtures("datasets_cache")

START, END = "<|im_start|>", "<|im_end|>"
Q1, R1, A1 = "Name a fruit.", "One that grows on trees.", "apple"
Q2, R2, A2 = "And a colour?", "The sky has one.", "blue"
THINKING, NOT_THINKING = {}, {"enable_thinking": False}


def test_the_template_is_qwen3s_as_published(qwen3_tokenizer):
    """The fixture is the published text (TRL's qwen3.jinja, the hub's), the tokenizer's
    template is it, and <think> and </think> are single tokens that decoding keeps."""
    published = QWEN3_TEMPLATE.read_bytes()
    assert hashlib.md5(published).hexdigest() == "ae518d20e400c6e67716982491e5c37d"
    assert qwen3_tokenizer.chat_template == published.decode()
    flags = {t.content: t.special for t in qwen3_tokenizer.added_tokens_decoder.values()}
    assert flags == demo_models.QWEN3_ADDED_TOKENS and len(flags) == 26
    assert (qwen3_tokenizer.eos_token, qwen3_tokenizer.pad_token) == (END, "<|endoftext|>")
    ids = qwen3_tokenizer("<think>\nx\n</think>\n\ny" + END)["input_ids"]
    assert qwen3_tokenizer.convert_ids_to_tokens(ids)[0] == "<think>"
    assert qwen3_tokenizer.decode(ids, skip_special_tokens=True) == "<think>\nx\n</think>\n\ny"


def assistant(answer: str, reasoning: str, place: str) -> dict:
    if place == "key":
        return {"role": "assistant", "content": answer, "reasoning_content": reasoning}
    return {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{answer}"}


def conversation(place: str, *, turns: int = 2) -> list[dict]:
    exchanges = [(Q1, R1, A1), (Q2, R2, A2)][:turns]
    return [
        message
        for question, reasoning, answer in exchanges
        for message in ({"role": "user", "content": question}, assistant(answer, reasoning, place))
    ]


def write_rows(path: Path, rows: list[list[dict]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    return path


def tokenized(tmp_path, tokenizer, rows: list[list[dict]], **data):
    """The rows read from a file and tokenized as a study with ``data`` would."""
    config = DataConfig(dataset=str(write_rows(tmp_path / "rows.jsonl", rows)), **data)
    read = read_rows(load_split(config, "train"), config, split="train")
    chat = ChatTemplate.of(tokenizer, config, base_dir=".")
    return tokenize(read.rows, tokenizer, max_length=256, assistant_only=True, chat=chat)


def scored(tokenizer, split, row: int = 0) -> list[str]:
    """The scored text of a row, one piece per run of scored tokens."""
    pieces, run = [], []
    for token, label in zip(split.input_ids[row], split.labels[row]):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            pieces, run = pieces + [tokenizer.decode(run)], []
    return pieces + ([tokenizer.decode(run)] if run else [])


def turn(question: str, answer: str) -> str:
    return f"{START}user\n{question}{END}\n{START}assistant\n{answer}{END}\n"


def thought(reasoning: str, answer: str) -> str:
    return f"<think>\n{reasoning}\n</think>\n\n{answer}"


# --- thinking mode (Qwen3's default) -----------------------------------------------------------


@pytest.mark.parametrize("place", ["key", "inline"])
def test_thinking_mode_scores_the_think_block_with_the_answer(qwen3_tokenizer, tmp_path, place):
    """By hand: the template renders the last turn's reasoning and drops the first turn's (it
    keeps reasoning after the last user turn only). The model is prompted with
    '<|im_start|>assistant\\n' and generates the think block itself: it is scored, with the
    answer and its <|im_end|>. The first answer is scored as rendered, without its reasoning,
    and counted."""
    split = tokenized(tmp_path, qwen3_tokenizer, [conversation(place)])
    text = turn(Q1, A1) + turn(Q2, thought(R2, A2))
    assert qwen3_tokenizer.decode(split.input_ids[0]) == text
    assert scored(qwen3_tokenizer, split) == [A1 + END, thought(R2, A2) + END]
    assert (
        qwen3_tokenizer.decode(split.prompt(0))
        == turn(Q1, A1) + f"{START}user\n{Q2}{END}\n{START}assistant\n"
    )
    assert split.answers == (A2,)
    assert split.counts == AnswerCounts(
        answers=2, reasoned=2, trained=1, left_out=1, unlike_generation=1
    )
    tokens = [
        qwen3_tokenizer.convert_ids_to_tokens(i)
        for i, label in zip(split.input_ids[0], split.labels[0])
        if label != IGNORE_INDEX
    ]
    assert tokens.count("<think>") == tokens.count("</think>") == 1  # single added tokens, scored


@pytest.mark.parametrize("place", ["key", "inline"])
def test_each_turn_as_last_trains_every_answer_with_its_reasoning(
    qwen3_tokenizer, tmp_path, place
):
    """By hand: a row per answer, the conversation up to it: each answer is rendered as a last
    turn, with its reasoning, in the context it is generated in (earlier turns without theirs,
    as the template renders a conversation at inference)."""
    split = tokenized(tmp_path, qwen3_tokenizer, [conversation(place)], each_turn_as_last=True)
    assert [qwen3_tokenizer.decode(ids) for ids in split.input_ids] == [
        turn(Q1, thought(R1, A1)),
        turn(Q1, A1) + turn(Q2, thought(R2, A2)),
    ]
    assert [scored(qwen3_tokenizer, split, row) for row in (0, 1)] == [
        [thought(R1, A1) + END],
        [thought(R2, A2) + END],
    ]
    assert [qwen3_tokenizer.decode(split.prompt(row)) for row in (0, 1)] == [
        f"{START}user\n{Q1}{END}\n{START}assistant\n",
        turn(Q1, A1) + f"{START}user\n{Q2}{END}\n{START}assistant\n",
    ]
    assert split.answers == (A1, A2)
    assert split.counts == AnswerCounts(answers=2, reasoned=2, trained=2)


def test_a_single_turn_renders_the_same_either_way(qwen3_tokenizer, tmp_path):
    rows = [conversation("inline", turns=1)]
    for each in (False, True):
        split = tokenized(tmp_path, qwen3_tokenizer, rows, each_turn_as_last=each)
        assert qwen3_tokenizer.decode(split.input_ids[0]) == turn(Q1, thought(R1, A1))
        assert scored(qwen3_tokenizer, split) == [thought(R1, A1) + END]
        assert split.counts == AnswerCounts(answers=1, reasoned=1, trained=1)


def test_an_answer_without_reasoning_scores_its_empty_think_block(qwen3_tokenizer, tmp_path):
    """Thinking mode without reasoning (or with it stripped): the template writes an empty think
    block, which the model must generate before the answer."""
    plain = [[{"role": "user", "content": Q1}, {"role": "assistant", "content": A1}]]
    stripped = tokenized(
        tmp_path, qwen3_tokenizer, [conversation("key", turns=1)], reasoning="strip"
    )
    for split in (tokenized(tmp_path, qwen3_tokenizer, plain), stripped):
        assert scored(qwen3_tokenizer, split) == ["<think>\n\n</think>\n\n" + A1 + END]
    assert stripped.counts == AnswerCounts(answers=1, reasoned=1, stripped=1)


# --- non-thinking mode -------------------------------------------------------------------------


@pytest.mark.parametrize("each", [False, True])
def test_non_thinking_mode_scores_the_answers_after_the_prefilled_block(
    qwen3_tokenizer, tmp_path, each
):
    """enable_thinking: false prefills an empty think block in the prompt: the answers alone
    are scored, each with its <|im_end|>, and the prompt ends with the block."""
    split = tokenized(
        tmp_path,
        qwen3_tokenizer,
        [conversation("inline")],
        reasoning="strip",
        chat_template_kwargs=NOT_THINKING,
        each_turn_as_last=each,
    )
    pieces = [p for row in range(len(split)) for p in scored(qwen3_tokenizer, split, row)]
    assert pieces == [A1 + END, A2 + END]
    assert qwen3_tokenizer.decode(split.prompt(len(split) - 1)).endswith(
        f"{START}assistant\n<think>\n\n</think>\n\n"
    )
    # as one conversation, the first answer is scored without the block it is generated after
    assert split.counts.unlike_generation == (0 if each else 1)


@pytest.mark.parametrize("place", ["key", "inline"])
def test_reasoning_in_non_thinking_mode_is_refused(qwen3_tokenizer, tmp_path, place):
    """The prompt prefills an empty think block: the reasoning could never be generated."""
    with pytest.raises(
        UsageError,
        match=r"turn 1: has reasoning, and the generation prompt does not lead into it .* "
        r"set data.reasoning: strip",
    ):
        tokenized(
            tmp_path,
            qwen3_tokenizer,
            [conversation(place, turns=1)],
            chat_template_kwargs=NOT_THINKING,
        )


# --- a model that reproduces its training text -------------------------------------------------


def reproducing(split):
    """A stand-in for generation by a model that reproduces its training text: after each
    row's prompt, the rest of that row's text up to and including the stop token. The prompt
    must be the text the row was trained on, up to its final answer."""
    said = {}
    for row in split.answered():
        prompt, ids = split.prompt(row), split.input_ids[row]
        assert ids[: len(prompt)] == prompt
        said[prompt] = list(ids[len(prompt) :])

    def generate(model, prompts, *, eos_id, max_new_tokens, **_):
        rests = [said[tuple(prompt)] for prompt in prompts]
        return [rest[: rest.index(eos_id) + 1][:max_new_tokens] for rest in rests]

    return generate


# By hand, in the tokens of the tokenizer's merges: "<think>\nThe sky has one.\n</think>" is 14
# tokens, "<think>\nOne that grows on trees.\n</think>" 18, an empty block 4.
@pytest.mark.parametrize(
    ("data", "reasoning_tokens"),
    [
        ({}, (14 + 18) / 2),
        ({"each_turn_as_last": True}, (18 + 14 + 18) / 3),
        ({"reasoning": "strip"}, 4),
        ({"reasoning": "strip", "chat_template_kwargs": NOT_THINKING}, 0),
    ],
    ids=["thinking", "thinking, each turn as last", "thinking, stripped", "non-thinking"],
)
def test_a_model_that_reproduces_its_training_text_is_exactly_right(
    qwen3_tokenizer, tmp_path, monkeypatch, data, reasoning_tokens
):
    """Its answers are taken after their think block: exact match 1 in every mode."""
    from kdsweep.distill import evaluate
    from kdsweep.names import Metric
    from kdsweep.study.config import EvalConfig

    split = tokenized(
        tmp_path, qwen3_tokenizer, [conversation("inline"), conversation("key", turns=1)], **data
    )
    monkeypatch.setattr(evaluate, "generate", reproducing(split))
    found = evaluate.accuracy(
        None, evaluate.Answers.of(split, qwen3_tokenizer, EvalConfig(max_new_tokens=64))
    )
    assert found[Metric.EXACT_MATCH] == found[Metric.ROUGE_L] == 1.0
    assert found[Metric.TRUNCATED_SHARE] == 0.0
    assert found[Metric.REASONING_TOKENS] == pytest.approx(reasoning_tokens)


# --- refusals, one line each -------------------------------------------------------------------


def test_a_template_without_reasoning_is_refused_naming_the_fix(qwen3_tokenizer, tmp_path):
    with pytest.raises(
        UsageError,
        match=r"turn 1: has reasoning, and the chat template renders none .* "
        r"or data.reasoning: strip",
    ):
        tokenized(
            tmp_path,
            qwen3_tokenizer,
            [conversation("key", turns=1)],
            chat_template=demo_models.CHAT_TEMPLATE,
        )
    split = tokenized(
        tmp_path,
        qwen3_tokenizer,
        [conversation("key", turns=1)],
        chat_template=demo_models.CHAT_TEMPLATE,
        reasoning="strip",
    )
    assert scored(qwen3_tokenizer, split) == [A1 + END]


def test_reasoning_both_under_a_key_and_inline_is_refused(qwen3_tokenizer, tmp_path):
    both = {"role": "assistant", "content": thought(R1, A1), "reasoning": R1}
    with pytest.raises(
        UsageError, match=r"row 0 .*messages\[1\]: has reasoning both in 'reasoning' and inline"
    ):
        tokenized(tmp_path, qwen3_tokenizer, [[{"role": "user", "content": Q1}, both]])


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning", "thinking"])
def test_every_reasoning_key_is_read(qwen3_tokenizer, tmp_path, key):
    row = [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1, key: R1}]
    split = tokenized(tmp_path, qwen3_tokenizer, [row])
    assert scored(qwen3_tokenizer, split) == [thought(R1, A1) + END]


# --- the command line --------------------------------------------------------------------------


def reasoning_study(tmp_path, qwen3_models, *overrides: str) -> Path:
    rows = [conversation(place) for place in ("key", "inline")] * 8
    data = tmp_path / "data"
    write_rows(data / "train.jsonl", rows)
    write_rows(data / "test.jsonl", rows[:4])
    study = write_tiny_study(tmp_path, qwen3_models, data)
    text = study.read_text().replace("max_length: 48", "max_length: 96")
    study.write_text(text + "eval: {accuracy: true, max_rows: 4, max_new_tokens: 24}\n")
    return study


def test_check_reads_the_data_and_says_what_became_of_the_reasoning(
    tmp_path, qwen3_models, capsys
):
    study = reasoning_study(tmp_path, qwen3_models)
    assert main(["check", str(study)]) == 0
    out = capsys.readouterr().out
    assert re.search(
        r"data 'train': the first 16 rows read, 16 with scored tokens \(\d+\); 32 answers, 32 "
        r"with reasoning: 16 scored with it, 16 left out by the chat template",
        out,
    ), out
    assert "accuracy prompts end" in out and "'<think>\\n" in out
    assert not (tmp_path / "optuna.db").exists()  # nothing written
    assert main(["check", str(study), "--set", "data.each_turn_as_last=true"]) == 0
    assert "32 rows read, 32 with scored tokens" in capsys.readouterr().out
    # the teacher renders as the student does: its reasoning stripped too
    assert main(["check", str(study), "--set", "data.reasoning=strip"]) == 0
    assert "32 with reasoning: 0 scored with it, 32 stripped" in capsys.readouterr().out


def test_check_refuses_what_run_would_refuse_one_line(tmp_path, qwen3_models, capsys):
    study = reasoning_study(tmp_path, qwen3_models)
    assert (
        main(["check", str(study), "--set", "data.chat_template_kwargs={enable_thinking: false}"])
        == 2
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kdsweep:")]
    assert (
        len(errors) == 1
        and "data.train_split: row 0 of" in errors[0]
        and "turn 3: has reasoning" in errors[0]
    )


def test_a_run_trains_the_reasoning_and_says_what_it_left_out(
    tmp_path, qwen3_models, empty_tracking_store, capsys
):
    """A run on multi-turn reasoning rows: every trial logs its reasoning length and truncated
    share, the study keeps the teacher's and the train answers' counts, and the closing summary
    and the report say how much reasoning the template left out, and the fix."""
    from kdsweep.names import Metric, StudyAttr
    from kdsweep.store.storage import load_existing_study
    from kdsweep.study.reader import load_study

    from conftest import mlflow_runs

    shutil.copyfile(empty_tracking_store, tmp_path / "mlflow.db")
    study = reasoning_study(tmp_path, qwen3_models)
    assert main(["run", str(study), "--n-trials", "1"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the summary wraps at 80 columns
    assert (
        "reasoning (train split): 32 answers, 32 with reasoning: 16 scored with it, 16 left "
        "out by the chat template" in out
    )
    attrs = load_existing_study(load_study(study)).user_attrs
    assert attrs[StudyAttr.TRAIN_REASONING_LEFT_OUT] == 16
    assert attrs[StudyAttr.TRAIN_REASONING_TRAINED] == 16
    assert 0 <= attrs[StudyAttr.TEACHER_TRUNCATED_SHARE] <= 1
    _, parents, trials = mlflow_runs(study)
    assert parents[0].data.metrics[Metric.TRAIN_REASONING_LEFT_OUT] == 16
    assert parents[0].data.params["reasoning"] == "train"
    metrics = trials[0].data.metrics
    assert 0 <= metrics[Metric.TRUNCATED_SHARE] <= 1 and metrics[Metric.REASONING_TOKENS] >= 0
    report = (tmp_path / "reports" / "tiny.md").read_text()
    assert "- **Reasoning** (train split): 32 answers" in report
    assert "The reasoning of 16 train answers was not trained on" in report
