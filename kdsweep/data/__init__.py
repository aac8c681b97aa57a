"""Rows to batches: read a split, render each row as the model sees it, tokenize, batch.

The flow is ``load_split`` -> ``read_rows`` (the row format: text, prompt-completion, messages,
ShareGPT; an assistant turn's reasoning kept apart) -> ``tokenize`` (text rows with their EOS,
conversations through a ``ChatTemplate``; labels from the answers' characters, each answer from
where its generation starts) -> ``make_batches``.
"""

from kdsweep.data.batches import (
    Batch,
    collate,
    make_batches,
    padding_share,
    rows_read,
    training_order,
)
from kdsweep.data.chat import ChatTemplate
from kdsweep.data.formats import Completion, Conversation, Row, Rows, read_rows
from kdsweep.data.reasoning import AnswerCounts, answer_after_reasoning, split_reasoning
from kdsweep.data.rendered import Rendered, RowError
from kdsweep.data.sources import load_split, split_key
from kdsweep.data.text import answer_text, parse_guanaco
from kdsweep.data.tokens import TokenizedSplit, count_scored, first_difference, render, tokenize
from kdsweep.losses import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "AnswerCounts",
    "Batch",
    "ChatTemplate",
    "Completion",
    "Conversation",
    "Rendered",
    "Row",
    "RowError",
    "Rows",
    "TokenizedSplit",
    "answer_after_reasoning",
    "answer_text",
    "collate",
    "count_scored",
    "first_difference",
    "load_split",
    "make_batches",
    "padding_share",
    "parse_guanaco",
    "read_rows",
    "render",
    "rows_read",
    "split_key",
    "split_reasoning",
    "tokenize",
    "training_order",
]
