"""What ``kdsweep check`` reads of a study's data before anything trains: the first rows of each
split, rendered through the chat template and tokenized, by the tokenizers alone (no weights).

It reads what it can reach without the hub: local files and model folders, and hub datasets and
tokenizers when online or already cached. What it cannot reach, it says why and reads nothing;
a problem in what it read (a row the template refuses, reasoning it cannot place, a teacher that
tokenizes differently) is the :class:`UsageError` ``kdsweep run`` would raise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from huggingface_hub.errors import LocalEntryNotFoundError

from kdsweep.data import IGNORE_INDEX, AnswerCounts, TokenizedSplit
from kdsweep.errors import UsageError, first_line
from kdsweep.prepare import demo
from kdsweep.prepare.inputs import read_inputs
from kdsweep.progress import SweepProgress
from kdsweep.study.config import StudyConfig

PREVIEW_ROWS = 64  # each split's first rows, read
SHOWN = 40  # characters shown of a prompt's end and an answer's beginning


@dataclass(frozen=True)
class SplitPreview:
    """One split's first rows, as the trials would read them."""

    split: str  # as the study names it
    rows: int  # read (a row per answer, with data.each_turn_as_last)
    kept: int  # ... with a scored token within data.max_length
    scored_tokens: int
    counts: AnswerCounts
    # The first row that ends with an answer (when the split's prompts are recorded): the end of
    # the prompt accuracy decodes from, and the beginning of the answer scored after it.
    prompt_end: str | None = None
    answer_start: str | None = None


@dataclass(frozen=True)
class Preview:
    splits: list[SplitPreview]
    unread: str | None = None  # why nothing was read


def preview(study: StudyConfig, progress: SweepProgress) -> Preview:
    """Each split's first :data:`PREVIEW_ROWS` rows, rendered and tokenized as the trials would
    read them; or why they could not be read from here."""
    unbuilt = [
        m.name
        for m in (study.teacher, study.student)
        if demo.is_demo(m.name) and not demo.built(m.name)
    ]
    if unbuilt:
        return Preview(
            [],
            f"{unbuilt[0]} is not built yet, and its tokenizer with it: `kdsweep run` builds the "
            "demo's models on first use (a few minutes) and reads the data",
        )
    try:
        inputs = read_inputs(study, progress, first_rows=PREVIEW_ROWS)
    except UsageError as exc:
        if not _unreachable(exc):
            raise
        return Preview(
            [],
            f"{first_line(exc)}; `kdsweep run` reads it where the hub can be reached "
            "(HF_HUB_OFFLINE=1 saves the attempt)",
        )
    data = study.data
    named = {data.train_split: inputs.train_split, data.eval_split: inputs.eval_split}
    if data.test_split:
        named[data.test_split] = inputs.test_split
    return Preview([_split(name, split, inputs.tokenizer) for name, split in named.items()])


def _split(name: str, split: TokenizedSplit, tokenizer) -> SplitPreview:
    found = SplitPreview(
        name, len(split) + split.dropped, len(split), split.num_scored_tokens, split.counts
    )
    answered = split.answered()
    if not answered:
        return found
    row = answered[0]
    prompt, ids, labels = split.prompt(row), split.input_ids[row], split.labels[row]
    after = len(prompt) if ids[: len(prompt)] == prompt else len(ids)
    answer = [i for i, label in zip(ids[after:], labels[after:]) if label != IGNORE_INDEX]
    return dataclasses.replace(
        found,
        prompt_end=tokenizer.decode(prompt)[-SHOWN:],
        answer_start=tokenizer.decode(answer)[:SHOWN] if answer else None,
    )


def _unreachable(error: BaseException) -> bool:
    """Whether ``error`` comes of the hub being out of reach (offline, or a model or dataset not
    cached): the errors raised while it was handled are chained to it."""
    while error is not None:
        if isinstance(error, (ConnectionError, LocalEntryNotFoundError)):
            return True
        error = error.__cause__ or error.__context__
    return False
