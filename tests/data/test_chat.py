"""Conversational data: the row formats, rendering through the chat template, exactly which tokens
are scored (counted by hand), the prompts accuracy decodes from, and every bad input through the
command line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from kdsweep.cli import main
from kdsweep.data import (
    IGNORE_INDEX,
    ChatTemplate,
    Completion,
    Conversation,
    RowError,
    load_split,
    read_rows,
    tokenize,
)
from kdsweep.errors import UsageError
from kdsweep.prepare import demo_models
from kdsweep.study.config import DataConfig

from conftest import conversations, write_tiny_study

EOT = demo_models.TURN_END


pytestmark = pytest.mark.usefixtures("datasets_cache")


@pytest.fixture(scope="module")
def tokenizer(demo_tokenizer):
    return demo_tokenizer


@pytest.fixture(scope="module")
def chat(tokenizer):
    return ChatTemplate(tokenizer, tokenizer.chat_template)


def conversation(*turns: tuple[str, str], scored_from: int = 0) -> Conversation:
    return Conversation(tuple(turns), scored_from=scored_from)


def scored(tokenizer, split, row: int = 0) -> list[str]:
    """The scored tokens of a row, as token strings."""
    return [
        tokenizer.convert_ids_to_tokens(i)
        for i, label in zip(split.input_ids[row], split.labels[row])
        if label != IGNORE_INDEX
    ]


# --- what is scored, counted by hand -----------------------------------------------------------


def test_multi_turn_with_a_system_turn_scores_each_answer_and_its_end_of_turn(tokenizer, chat):
    """By hand: "apple" and "blue" are one token each in the demo vocabulary, and each answer
    ends with one <|im_end|>: 4 scored tokens. The system and user turns, the role headers and
    the newline after each <|im_end|> are never scored."""
    row = conversation(
        ("system", "Answer with one word."),
        ("user", "Name a fruit."),
        ("assistant", "apple"),
        ("user", "And a colour?"),
        ("assistant", "blue"),
    )
    split = tokenize([row], tokenizer, max_length=128, assistant_only=True, chat=chat)
    assert scored(tokenizer, split) == ["apple", EOT, "blue", EOT]
    assert split.num_scored_tokens == 4
    assert tokenizer.decode(split.input_ids[0]) == tokenizer.apply_chat_template(
        row.messages(), tokenize=False
    )
    assert split.stop_id == tokenizer.convert_tokens_to_ids(EOT)


def test_cjk_and_emoji_answers_are_scored_byte_by_byte(tokenizer, chat):
    """By hand: the demo vocabulary has no merges outside ASCII, so each byte is a token: two CJK
    characters of 3 bytes and an emoji of 4 are 10 tokens, plus the end-of-turn: 11."""
    row = conversation(("user", "Say hello in Chinese."), ("assistant", "你好🙂"))
    split = tokenize([row], tokenizer, max_length=128, assistant_only=True, chat=chat)
    assert split.num_scored_tokens == 3 + 3 + 4 + 1
    assert (
        tokenizer.decode(
            [i for i, label in zip(split.input_ids[0], split.labels[0]) if label != IGNORE_INDEX]
        )
        == "你好🙂" + EOT
    )


def test_a_truncation_inside_an_answer_keeps_the_answers_first_tokens(tokenizer, chat):
    messages = [("user", "Name four colours."), ("assistant", "apple cream a berry fruit")]
    prompt = tokenizer.apply_chat_template(
        conversation(*messages[:1]).messages(), tokenize=False, add_generation_prompt=True
    )
    cut = len(tokenizer(prompt)["input_ids"]) + 3
    split = tokenize(
        [conversation(*messages)], tokenizer, max_length=cut, assistant_only=True, chat=chat
    )
    assert len(split.input_ids[0]) == cut
    # by hand: the first three words, no end-of-turn
    assert scored(tokenizer, split) == [
        "apple",
        "Ġcream",
        "Ġa",
    ]
    assert split.answered() == [0]  # the answer began before the cut: it is still asked for


def test_a_template_that_writes_a_bos_gets_one_and_it_is_not_scored(tokenizer):
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.add_special_tokens(["<s>"])
    with_bos = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[demo_models.TURN_START, EOT],
        chat_template="{{- bos_token }}" + demo_models.CHAT_TEMPLATE,
    )
    row = conversation(("user", "Name a fruit."), ("assistant", "apple"))
    split = tokenize(
        [row],
        with_bos,
        max_length=64,
        assistant_only=True,
        chat=ChatTemplate(with_bos, with_bos.chat_template),
    )
    bos = with_bos.convert_tokens_to_ids("<s>")
    assert split.input_ids[0][0] == bos and split.input_ids[0].count(bos) == 1
    assert split.labels[0][0] == IGNORE_INDEX
    assert scored(with_bos, split) == ["apple", EOT]
    assert split.prompt(0)[0] == bos and split.prompt(0).count(bos) == 1


def test_a_template_that_trims_contents_is_followed(tokenizer):
    trimming = demo_models.CHAT_TEMPLATE.replace("message['content']", "message['content'] | trim")
    row = conversation(("user", "  Name a fruit. "), ("assistant", "  apple \n"))
    split = tokenize(
        [row],
        tokenizer,
        max_length=64,
        assistant_only=True,
        chat=ChatTemplate(tokenizer, trimming),
    )
    assert scored(tokenizer, split) == ["apple", EOT]


def test_a_template_whose_own_text_depends_on_the_content_is_refused(tokenizer):
    """Text the template writes between turns that a content's words change (a note after an
    excited turn) cannot be told from the turns; text next to a content is taken as the
    content's."""
    moody = demo_models.CHAT_TEMPLATE.replace(
        "'<|im_end|>' + '\\n'",
        "'<|im_end|>' + '\\n' + ('(excited)\\n' if '!' in message['content'] else '')",
    )
    assert moody != demo_models.CHAT_TEMPLATE
    row = conversation(("user", "Name a fruit!"), ("assistant", "apple"))
    with pytest.raises(RowError, match="changes with their contents"):
        tokenize(
            [row],
            tokenizer,
            max_length=64,
            assistant_only=True,
            chat=ChatTemplate(tokenizer, moody),
        )


def test_without_assistant_only_every_token_is_scored(tokenizer, chat):
    split = tokenize(
        [conversation(("user", "Hi"), ("assistant", "hello"))],
        tokenizer,
        max_length=64,
        assistant_only=False,
        chat=chat,
    )
    assert split.labels[0] == split.input_ids[0]


def test_prompt_completion_scores_the_completion_only(tokenizer, chat):
    """A conversational prompt's own assistant turn is context: only the completion is scored."""
    row = conversation(
        ("user", "Name a fruit."),
        ("assistant", "apple"),
        ("user", "And a colour?"),
        ("assistant", "blue"),
        scored_from=3,
    )
    split = tokenize([row], tokenizer, max_length=64, assistant_only=True, chat=chat)
    assert scored(tokenizer, split) == ["blue", EOT]
    plain = tokenize([Completion("2 + 2 =", " 4")], tokenizer, max_length=64, assistant_only=True)
    # joined as TRL joins it
    assert tokenizer.decode(plain.input_ids[0]) == "2 + 2 = 4<|endoftext|>"
    assert (
        tokenizer.decode(
            [i for i, label in zip(plain.input_ids[0], plain.labels[0]) if label != IGNORE_INDEX]
        )
        == " 4<|endoftext|>"
    )


def test_the_prompt_is_the_conversation_with_the_generation_prompt(tokenizer, chat):
    row = conversation(
        ("user", "Name a fruit."),
        ("assistant", "apple"),
        ("user", "And a colour?"),
        ("assistant", "blue"),
    )
    split = tokenize([row], tokenizer, max_length=64, assistant_only=True, chat=chat)
    expected = tokenizer.apply_chat_template(
        row.messages(-1), tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(split.prompt(0)) == expected
    assert expected.endswith("<|im_start|>assistant\n")
    assert split.answers == ("blue",)
    ends_with_user = tokenize(
        [conversation(("user", "Hi"), ("assistant", "hello"), ("user", "Bye"))],
        tokenizer,
        max_length=64,
        assistant_only=True,
        chat=chat,
    )
    assert ends_with_user.answered() == []


@pytest.mark.parametrize("template", ["plain", "trimming", "with a bos"])
def test_every_prompt_is_its_generation_prompt_tokenized(tokenizer, template):
    """Prompts are assembled from the row's own tokens where that is exact; whichever way, each
    equals the template's generation prompt tokenized on its own."""
    source = {
        "plain": demo_models.CHAT_TEMPLATE,
        "trimming": demo_models.CHAT_TEMPLATE.replace(
            "message['content']", "message['content'] | trim"
        ),
        "with a bos": "{{- eos_token }}" + demo_models.CHAT_TEMPLATE,
    }[template]
    rows = conversations(150, seed=4) + [
        conversation(("user", "Hi"), ("assistant", "\n\n  spaced out")),
        conversation(
            ("system", "Be brief."),
            ("user", "Hi!"),
            ("assistant", "a"),
            ("user", "  padded  "),
            ("assistant", " b"),
        ),
        conversation(("user", "你好"), ("assistant", "🙂 ok")),
    ]
    split = tokenize(
        rows, tokenizer, max_length=128, assistant_only=True, chat=ChatTemplate(tokenizer, source)
    )
    assert len(split) == len(rows) and split.answered() == list(range(len(rows)))
    for e, row in enumerate(rows):
        text = tokenizer.apply_chat_template(
            row.messages(-1), tokenize=False, add_generation_prompt=True, chat_template=source
        )
        assert split.prompt(e) == tuple(tokenizer(text, add_special_tokens=False)["input_ids"]), (
            template,
            e,
        )


def test_chat_template_kwargs_reach_the_template(tokenizer):
    thinking = demo_models.CHAT_TEMPLATE.replace(
        "{{- '<|im_start|>assistant\\n' }}",
        "{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and not "
        "enable_thinking %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}",
    )
    row = conversation(("user", "Name a fruit."), ("assistant", "apple"))
    split = tokenize(
        [row],
        tokenizer,
        max_length=64,
        assistant_only=True,
        chat=ChatTemplate(tokenizer, thinking, {"enable_thinking": False}),
    )
    assert tokenizer.decode(split.prompt(0)).endswith("<think>\n\n</think>\n\n")


# --- formats -----------------------------------------------------------------------------------


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read(path: Path, **data) -> object:
    config = DataConfig(dataset=str(path), **data)
    return read_rows(load_split(config, "train"), config, split="train")


MESSAGES = [
    {"role": "user", "content": "Name a fruit."},
    {"role": "assistant", "content": "apple"},
]


def test_auto_reads_messages_prompt_completion_sharegpt_and_text(tmp_path):
    as_messages = read(write_rows(tmp_path / "m.jsonl", [{"messages": MESSAGES}]))
    assert as_messages.format == "messages" and as_messages.rows == [
        conversation(("user", "Name a fruit."), ("assistant", "apple"))
    ]

    pc = read(
        write_rows(tmp_path / "pc.jsonl", [{"prompt": MESSAGES[:1], "completion": MESSAGES[1:]}])
    )
    assert pc.format == "prompt_completion" and pc.rows == [
        conversation(*as_messages.rows[0].turns, scored_from=1)
    ]
    plain = read(write_rows(tmp_path / "plain.jsonl", [{"prompt": "2 + 2 =", "completion": " 4"}]))
    assert plain.rows == [Completion("2 + 2 =", " 4")]

    turns = [{"from": "human", "value": "Name a fruit."}, {"from": "gpt", "value": "apple"}]
    sharegpt = read(
        write_rows(tmp_path / "s.jsonl", [{"conversations": turns, "system": "Be brief."}])
    )
    assert sharegpt.format == "sharegpt"
    assert sharegpt.rows == [
        conversation(("system", "Be brief."), ("user", "Name a fruit."), ("assistant", "apple"))
    ]

    text = read(write_rows(tmp_path / "t.jsonl", [{"text": "### Human: Hi### Assistant: Hello"}]))
    assert text.format == "text" and text.rows == ["### Human: Hi### Assistant: Hello"]


def test_column_names_can_be_overridden(tmp_path):
    rows = read(
        write_rows(tmp_path / "m.jsonl", [{"dialogue": MESSAGES}]),
        format="messages",
        messages_field="dialogue",
    )
    assert rows.rows[0].roles == ("user", "assistant")
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    rows = read(
        write_rows(tmp_path / "s.jsonl", [{"chat": turns}]),
        format="sharegpt",
        conversations_field="chat",
    )
    assert rows.rows[0].turns == (("user", "Hi"), ("assistant", "Hello"))


def test_conversations_without_an_answer_are_left_out_and_counted(tmp_path):
    rows = read(
        write_rows(
            tmp_path / "m.jsonl",
            [{"messages": MESSAGES}, {"messages": MESSAGES[:1]}, {"messages": MESSAGES}],
        )
    )
    assert rows.numbers == [0, 2] and rows.skipped == 1
    with pytest.raises(UsageError, match=r"no row .* has an assistant turn .*all 1 were left out"):
        read(write_rows(tmp_path / "none.jsonl", [{"messages": MESSAGES[:1]}]))


# --- bad input through the command line: one line, exit 2, nothing written -----------------------

BAD_ROWS = {
    "no role": (
        [{"messages": MESSAGES}, {"messages": [{"content": "Hi"}, MESSAGES[1]]}],
        r"row 1 of .*messages\[0\]: has no 'role'",
    ),
    "no content": (
        [{"messages": [MESSAGES[0], {"role": "assistant"}]}],
        r"row 0 of .*messages\[1\]: has no 'content'",
    ),
    "unknown role": (
        [{"messages": [{"role": "tool", "content": "{}"}, MESSAGES[1]]}],
        r"messages\[0\]: has the unknown role 'tool'; use one of system, user, assistant",
    ),
    "empty": (
        [{"messages": MESSAGES}, {"messages": []}],
        r"row 1 of .*: messages: is an empty conversation",
    ),
    "no answer anywhere": ([{"messages": MESSAGES[:1]}], r"no row of .* has an assistant turn"),
}


def error_lines(capsys) -> list[str]:
    """What kdsweep said went wrong (progress lines aside)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("kdsweep:")]


def run_on(
    tmp_path: Path, tiny_models, rows: list[dict], *overrides: str, models: dict | None = None
) -> tuple[int, str]:
    data = tmp_path / "data"
    write_rows(data / "train.jsonl", rows)
    write_rows(data / "test.jsonl", rows)
    study = write_tiny_study(tmp_path, models or tiny_models, data)
    code = main(["run", str(study), *(a for o in overrides for a in ("--set", o))])
    return code, study


@pytest.mark.parametrize("case", BAD_ROWS)
def test_a_bad_row_is_one_line_naming_it(case, tmp_path, tiny_models, capsys):
    rows, message = BAD_ROWS[case]
    code, _ = run_on(tmp_path, tiny_models, rows)
    errors = error_lines(capsys)
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith("kdsweep: data.train_split: ") and re.search(message, errors[0]), (
        errors
    )
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("rows", "overrides", "message"),
    [
        (
            [{"text": "### Human: Hi### Assistant: Hello"}],
            ["data.format=messages"],
            r"data.format: messages reads the column 'messages' \(data.messages_field\), which "
            r".* does not have \(columns: text\)",
        ),
        (
            [{"messages": MESSAGES}],
            ["data.format=text", "data.text_field=messages"],
            r"data.text_field: column 'messages' .* holds lists \(conversations\), not text; set "
            r"data.format",
        ),
        (
            [{"messages": MESSAGES}],
            ["data.format=prompt_completion"],
            r"data.format: prompt_completion reads the column 'prompt'",
        ),
    ],
)
def test_a_format_that_does_not_match_the_columns(
    rows, overrides, message, tmp_path, tiny_models, capsys
):
    code, _ = run_on(tmp_path, tiny_models, rows, *overrides)
    errors = error_lines(capsys)
    assert code == 2 and len(errors) == 1 and re.search(message, errors[0]), errors
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


def test_conversations_need_a_chat_template(tmp_path, tiny_models, capsys):
    models = {}
    for role, folder in tiny_models.items():
        models[role] = tmp_path / role
        shutil.copytree(folder, models[role])
        (models[role] / "chat_template.jinja").unlink()
    code, study = run_on(tmp_path, tiny_models, [{"messages": MESSAGES}], models=models)
    errors = error_lines(capsys)
    assert code == 2 and len(errors) == 1
    assert "data.chat_template: the student's tokenizer has no chat template" in errors[0]
    assert not (tmp_path / "optuna.db").exists()
    # The study's own template (a file beside the study) is the fix.
    (tmp_path / "chatml.jinja").write_text(demo_models.CHAT_TEMPLATE)
    assert (
        main(
            [
                "run",
                str(study),
                "--set",
                "data.chat_template=chatml.jinja",
                "--n-trials",
                "1",
                "--no-report",
            ]
        )
        == 0
    )


def test_teacher_and_student_must_render_alike(tmp_path, tiny_models, capsys):
    """A teacher whose template adds a default system turn sees other tokens: exit 2, naming
    the row and the first token that differs, as each tokenizer reads it."""
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_models["teacher"], teacher)
    (teacher / "chat_template.jinja").write_text(
        "{{- '<|im_start|>system\\nBe kind.<|im_end|>\\n' }}" + demo_models.CHAT_TEMPLATE
    )
    code, _ = run_on(
        tmp_path,
        tiny_models,
        [{"messages": MESSAGES}],
        models={"teacher": teacher, "student": tiny_models["student"]},
    )
    errors = error_lines(capsys)
    assert code == 2 and len(errors) == 1, errors
    err = errors[0]
    assert (
        "row 0 of" in err and "teacher and student tokenize it differently from token 1 on" in err
    )
    # 'system' is s-y-st-em to the tiny tokenizer
    assert "the student has 'user'" in err and "the teacher 's'" in err
    assert not (tmp_path / "optuna.db").exists()
