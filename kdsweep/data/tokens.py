"""Rows to token ids and labels, in one tokenizer call per split.

Labels follow the Hugging Face convention: ``labels[i] == input_ids[i]`` where token ``i`` is
scored and -100 elsewhere, unshifted (the loss predicts ``labels[i + 1]`` from position ``i``).
A token is scored when it covers a character of an answer (``Rendered.spans``): the whole row is
tokenized at once and tokens are mapped to characters through a fast tokenizer's offsets, so the
ids are exactly those the model sees for the text (tokenizing piece by piece would change merges
at the boundaries). Rows go to the Rust tokenizer (``tokenizer.backend_tokenizer``) in one batch:
the same ids as calling the tokenizer, without its conversion of every row to Python lists.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from kdsweep.data.chat import PROMPT_CHECKS, ChatTemplate
from kdsweep.data.formats import Completion, Conversation, Row
from kdsweep.data.reasoning import AnswerCounts
from kdsweep.data.rendered import Rendered, RowError
from kdsweep.data.text import render_completion, render_text
from kdsweep.errors import UsageError
from kdsweep.losses import IGNORE_INDEX  # the label of positions the loss skips (padding, prompts)


@dataclass(frozen=True)
class TokenizedSplit:
    """Token ids and aligned labels, one tuple per example, at most ``max_length`` long."""

    input_ids: tuple[tuple[int, ...], ...]
    labels: tuple[tuple[int, ...], ...]  # input id where scored, else -100; unshifted
    dropped: int = 0  # rows left out because no token of theirs would be scored
    # Rows that end with an answer: the tokens the model is given to produce it (empty for other
    # rows; () when not recorded), and the answer's text ("" for other rows).
    prompts: tuple[tuple[int, ...], ...] = ()
    answers: tuple[str, ...] = ()
    # the token an answer ends with: the chat template's end-of-turn, or EOS
    stop_id: int | None = None
    counts: AnswerCounts = AnswerCounts()  # the conversations' answers, and their reasoning

    def __post_init__(self) -> None:
        shapes_match = len(self.input_ids) == len(self.labels) and all(
            len(ids) == len(labels) for ids, labels in zip(self.input_ids, self.labels)
        )
        if not shapes_match:
            raise ValueError("input_ids and labels must have the same shapes")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_scored_tokens(self) -> int:
        """Tokens a shifted loss predicts: scored labels at positions >= 1."""
        return sum(count_scored(labels) for labels in self.labels)

    def prompt(self, example: int) -> tuple[int, ...]:
        """The tokens the model is given to produce the example's final answer (empty when
        none)."""
        return self.prompts[example] if self.prompts else ()

    def answered(self) -> list[int]:
        """The examples that end with an answer, in order."""
        return [e for e, prompt in enumerate(self.prompts) if prompt]


def render(
    rows: list[Row], tokenizer: Any, *, chat: ChatTemplate | None = None, with_prompts: bool = True
) -> list[Rendered]:
    """Each row as the model sees it: text rows with their EOS, conversations through ``chat``
    (with their generation prompts, unless ``with_prompts`` is false)."""
    _check_tokenizer(tokenizer)
    conversations = [i for i, row in enumerate(rows) if isinstance(row, Conversation)]
    rendered: dict[int, Rendered] = {}
    if conversations:
        if chat is None:
            raise ValueError("conversational rows need a ChatTemplate to render them")
        try:
            rendered = dict(
                zip(
                    conversations,
                    chat.render([rows[i] for i in conversations], with_prompts=with_prompts),
                )
            )
        except RowError as exc:  # its index among the conversations, as the caller's row
            raise RowError(conversations[exc.index], exc.field, exc.detail) from None
    eos = tokenizer.eos_token
    for i, row in enumerate(rows):
        if isinstance(row, Completion):
            rendered[i] = render_completion(row, eos)
        elif isinstance(row, str):
            rendered[i] = render_text(row, eos)
    return [rendered[i] for i in range(len(rows))]


def tokenize(
    rows: list[Row],
    tokenizer: Any,
    *,
    max_length: int,
    assistant_only: bool,
    chat: ChatTemplate | None = None,
    with_prompts: bool = True,
) -> TokenizedSplit:
    """Rows -> token ids and labels, truncated to ``max_length`` tokens.

    With ``assistant_only``, the answers are scored (each with the token that ends it: EOS, or the
    chat template's end-of-turn) and nothing else; without it every token is. Special tokens the
    tokenizer adds to text rows (a BOS) have no characters and are never scored; a chat template
    writes its own. Rows with no scored token at positions >= 1 (none left after truncation, or no
    answer) would add nothing to a loss and are dropped; ``TokenizedSplit.dropped`` counts them.

    With ``with_prompts``, a row that ends with an answer that survives truncation also records
    its prompt: for a conversation, the template's generation prompt tokenized (what a served
    model is given); for a text row, its tokens wholly before the answer, so generating continues
    exactly the token sequence the model is trained on. Only accuracy (the eval split) and
    on-policy steps (the train split) read them.
    """
    rendered = render(rows, tokenizer, chat=chat, with_prompts=with_prompts)
    texts = [r.text for r in rendered]
    # A chat template writes its own special tokens (a BOS among them); text rows get the
    # tokenizer's.
    conversational = chat is not None and any(isinstance(row, Conversation) for row in rows)
    encodings = tokenizer.backend_tokenizer.encode_batch(
        texts, add_special_tokens=not conversational
    )
    chat_prompts = (
        _prompt_ids(rendered, encodings, tokenizer) if conversational and with_prompts else {}
    )
    input_ids, labels, prompts, answers = [], [], [], []
    for row, (r, encoding) in enumerate(zip(rendered, encodings)):
        ids, offsets = encoding.ids[:max_length], encoding.offsets[:max_length]
        scored = _scored(offsets, r.spans) if assistant_only else [True] * len(ids)
        row_labels = [i if s else IGNORE_INDEX for i, s in zip(ids, scored)]
        if not count_scored(row_labels):
            continue
        # Tokens wholly before the answer (offsets are in order, their ends too).
        before = (
            bisect.bisect_right(offsets, r.answer_start, key=_end)
            if with_prompts and r.answer_start is not None
            else 0
        )
        keeps_answer = 0 < before < len(ids)  # the answer's first token survived truncation
        input_ids.append(tuple(ids))
        labels.append(tuple(row_labels))
        prompts.append(tuple(chat_prompts.get(row, ids[:before])) if keeps_answer else ())
        answers.append(r.answer if keeps_answer else "")
    stop_id = (
        chat.end_of_turn_id
        if conversational and chat.end_of_turn_id is not None
        else tokenizer.eos_token_id
    )
    return TokenizedSplit(
        tuple(input_ids),
        tuple(labels),
        dropped=len(rows) - len(input_ids),
        prompts=tuple(prompts),
        answers=tuple(answers),
        stop_id=stop_id,
        counts=sum((r.counts for r in rendered), AnswerCounts()),
    )


def _start(offset: tuple[int, int]) -> int:
    return offset[0]


def _end(offset: tuple[int, int]) -> int:
    return offset[1]


def _prompt_ids(rendered: list[Rendered], encodings: list, tokenizer: Any) -> dict[int, list[int]]:
    """The chat rows' generation prompts, tokenized.

    A tokenizer splits text at its added tokens (``<|im_start|>``, ...) before anything else and
    tokenizes the pieces apart. So a prompt that is its row's text up to an added token is that
    text's tokens up to there, then the tokens of the rest: the generation prompt's own tail
    (``assistant\n``), the same for every row, tokenized once. The first ``PROMPT_CHECKS`` prompts
    made so are also tokenized whole, and one that differs (a tokenizer whose pieces are not
    independent) has every prompt tokenized whole.
    """
    backend = tokenizer.backend_tokenizer
    assembled, whole, tails = {}, [], {}
    for row, (r, encoding) in enumerate(zip(rendered, encodings)):
        if r.prompt is None:
            continue
        head = (
            len(r.prompt) - len(r.prompt_tail)
            if r.prompt_tail is not None and r.prompt.endswith(r.prompt_tail)
            else 0
        )
        tokens = bisect.bisect_right(encoding.offsets, head, key=_end) if head else 0
        if tokens and encoding.offsets[tokens - 1][1] == head and r.text[:head] == r.prompt[:head]:
            if r.prompt_tail not in tails:
                tails[r.prompt_tail] = backend.encode(r.prompt_tail, add_special_tokens=False).ids
            assembled[row] = encoding.ids[:tokens] + tails[r.prompt_tail]
        else:
            whole.append(row)
    checked = list(assembled)[:PROMPT_CHECKS]
    for row, encoding in zip(
        checked,
        backend.encode_batch_fast(
            [rendered[row].prompt for row in checked], add_special_tokens=False
        ),
    ):
        if encoding.ids != assembled[row]:
            whole, assembled = [row for row, r in enumerate(rendered) if r.prompt is not None], {}
            break
    encoded = (
        backend.encode_batch_fast(
            [rendered[row].prompt for row in whole], add_special_tokens=False
        )
        if whole
        else []
    )
    return assembled | {row: encoding.ids for row, encoding in zip(whole, encoded)}


def _scored(offsets: list[tuple[int, int]], spans: tuple[tuple[int, int], ...]) -> list[bool]:
    """Whether each token covers a character of a span. Offsets are in order (starts and ends
    alike), so each span's tokens are found by bisection; a token without characters (a BOS the
    tokenizer adds) is never scored."""
    scored = [False] * len(offsets)
    for start, end in spans:
        # the first token ending after the span starts
        first = bisect.bisect_right(offsets, start, key=_end)
        # the first token starting at or after its end
        last = bisect.bisect_left(offsets, end, key=_start)
        for i in range(first, last):
            scored[i] = offsets[i][0] < offsets[i][1]
    return scored


def _check_tokenizer(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(
            "the tokenizer is not a fast (Rust) tokenizer, needed to map answers to tokens; "
            "load one with AutoTokenizer.from_pretrained(...)"
        )
    if tokenizer.eos_token_id is None:
        raise UsageError(
            "the tokenizer has no EOS token; set one (tokenizer.eos_token) so rows can end"
        )


def count_scored(labels: tuple[int, ...] | list[int]) -> int:
    """Scored labels that a shifted loss predicts (positions >= 1)."""
    # Position 0 is never predicted: nothing comes before it.
    return sum(label != IGNORE_INDEX for label in labels[1:])


def first_difference(ours: list[int], theirs: list[int]) -> int | None:
    """The first position where two token sequences differ (one ending counts), or None."""
    for position, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return position
    return None if len(ours) == len(theirs) else min(len(ours), len(theirs))
