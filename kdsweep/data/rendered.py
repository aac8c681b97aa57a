"""A row as the model sees it: the text, and which of its characters are answers."""

from __future__ import annotations

from dataclasses import dataclass

from kdsweep.data.reasoning import AnswerCounts
from kdsweep.errors import UsageError


@dataclass(frozen=True)
class Rendered:
    """One row's text and the character spans that are scored (answers, each with the token that
    ends it). What is scored is decided by characters, never by token ids: Qwen pads with its EOS
    token, and a real EOS must stay scored."""

    text: str
    spans: tuple[tuple[int, int], ...]  # in order, not overlapping
    answer: str = ""  # the final answer, when the row ends with one: what accuracy compares with
    answer_start: int | None = None  # where that answer's generation begins in ``text``
    # Chat rows: the conversation before the final answer, rendered with the template's generation
    # prompt (what a served model is given). Text rows: None, the prompt is the tokens before it.
    prompt: str | None = None
    # The prompt's text after its last added token (the generation prompt's "assistant\n"), the
    # same for every row with these roles; None when there is none. See tokens._prompt_ids.
    prompt_tail: str | None = None
    counts: AnswerCounts = AnswerCounts()  # chat rows: its answers, and their reasoning


class RowError(UsageError):
    """A row that cannot be read or rendered: its index in the rows given, the field, and what
    is wrong with the fix. The caller names the split and the row's number in it."""

    def __init__(self, index: int, field: str, detail: str):
        self.index, self.field, self.detail = index, field, detail
        super().__init__(f"row {index}: {field}: {detail}")
