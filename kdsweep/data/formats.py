"""The shapes rows come in, as TRL and the Hugging Face hub define them, read into three kinds.

``data.format`` names the shape, or ``auto`` (the default) decides by the columns, as TRL does:

- ``messages``: a list of ``{role, content}`` turns (conversational);
- ``prompt_completion``: ``prompt`` and ``completion``, both strings or both lists of turns;
- ``sharegpt``: ``conversations`` of ``{from, value}`` turns (LLaMA-Factory, Axolotl), ``human``
  read as ``user`` and ``gpt`` as ``assistant``, with an optional ``system`` column;
- ``text``: ``data.text_field``, guanaco's ``### Human:`` / ``### Assistant:`` text or plain text.

Every row becomes a ``str`` (text), a :class:`Completion` (plain prompt-completion) or a
:class:`Conversation` (the rest, rendered through a chat template). An assistant turn's reasoning
(a reasoning key, or ``<think>...</think>`` in its content: ``reasoning``) is kept apart from its
answer. A malformed row is one :class:`UsageError` naming the study key, the row, the field and
the fix; a conversation without an assistant turn is left out and counted, since it has nothing
to learn from. With ``data.each_turn_as_last``, a conversation becomes one row per answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import datasets

from kdsweep.data.reasoning import REASONING_KEYS, split_reasoning
from kdsweep.data.rendered import RowError
from kdsweep.data.sources import split_key
from kdsweep.errors import UsageError
from kdsweep.study.config import DATA_FORMATS, DataConfig

AUTO, TEXT, MESSAGES, PROMPT_COMPLETION, SHAREGPT = DATA_FORMATS
SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
ROLES = (SYSTEM, USER, ASSISTANT)
SHAREGPT_ROLES = {"human": USER, "gpt": ASSISTANT, "system": SYSTEM}
SHAREGPT_SYSTEM_COLUMN = "system"  # LLaMA-Factory's: the conversation's system prompt


@dataclass(frozen=True)
class Completion:
    """A plain-text prompt-completion row, joined as TRL joins it: ``prompt + completion``."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class Conversation:
    """Turns of ``(role, content)``, each assistant turn's reasoning apart from its content; the
    assistant's turns from ``scored_from`` on are answers (a prompt-completion row's prompt comes
    before it and is never scored)."""

    turns: tuple[tuple[str, str], ...]
    scored_from: int = 0
    reasoning: tuple[str, ...] = ()  # each turn's ("" for none); () for none at all
    # Derived once: every rendering step reads them.
    roles: tuple[str, ...] = field(init=False, repr=False, compare=False)
    # the turns that are answers
    answers: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        roles = tuple(role for role, _ in self.turns)
        object.__setattr__(self, "roles", roles)
        object.__setattr__(self, "reasoning", self.reasoning or ("",) * len(roles))
        object.__setattr__(
            self,
            "answers",
            tuple(
                i for i, role in enumerate(roles) if role == ASSISTANT and i >= self.scored_from
            ),
        )

    def messages(self, end: int | None = None) -> list[dict[str, str]]:
        """The turns before ``end`` as chat-template messages, reasoning under every key a
        template may read it from."""
        return [
            {"role": role, "content": content}
            | dict.fromkeys(REASONING_KEYS if reasoning else (), reasoning)
            for (role, content), reasoning in zip(self.turns[:end], self.reasoning)
        ]

    def shape(self, end: int | None = None) -> tuple[tuple[str, bool], ...]:
        """Each turn's role and whether it has reasoning, before ``end``: all a chat template
        writes around the contents depends on."""
        return tuple(zip(self.roles[:end], (bool(r) for r in self.reasoning[:end])))

    def part(self, turn: int, reasoning: bool) -> str:
        """A turn's content, or its reasoning."""
        return self.reasoning[turn] if reasoning else self.turns[turn][1]

    def without_reasoning(self) -> Conversation:
        return Conversation(self.turns, self.scored_from)

    def each_answer(self) -> list[Conversation]:
        """One conversation per answer: the turns up to it, it alone scored."""
        return [
            Conversation(self.turns[: a + 1], a, self.reasoning[: a + 1]) for a in self.answers
        ]

    @property
    def ends_with_answer(self) -> bool:
        return bool(self.answers) and self.answers[-1] == len(self.turns) - 1


Row = str | Completion | Conversation


@dataclass(frozen=True)
class Rows:
    """One split's rows, read; ``numbers[i]`` is row i's index in the split (for messages)."""

    format: str
    rows: list[Row]
    numbers: list[int]
    place: Place  # the study key, dataset and split they come from
    skipped: int = 0  # conversations left out: no assistant turn

    def error(self, problem: RowError) -> UsageError:
        """A problem with ``rows[problem.index]``, as one line naming the split and the row's
        number."""
        return self.place.row(self.numbers[problem.index]).problem(problem.field, problem.detail)

    @property
    def conversational(self) -> bool:
        return isinstance(self.rows[0], Conversation)


def read_rows(dataset: datasets.Dataset, data: DataConfig, *, split: str) -> Rows:
    """The split's rows in ``data.format`` (or the one its columns show, for ``auto``)."""
    where = Place(split_key(data, split), data.dataset, split)
    fmt, column = resolve_format(dataset, data, where)
    if fmt == TEXT:
        return Rows(fmt, _texts(dataset, column, where), list(range(len(dataset))), where)
    if fmt == PROMPT_COMPLETION:
        pairs = zip(dataset[data.prompt_field], dataset[data.completion_field])
        rows = [
            _prompt_completion(prompt, completion, data, where.row(n))
            for n, (prompt, completion) in enumerate(pairs)
        ]
    else:
        keys = ("from", "value") if fmt == SHAREGPT else ("role", "content")
        systems = _sharegpt_systems(dataset) if fmt == SHAREGPT else None
        rows = [
            _conversation(
                turns, column, keys, where.row(n), system=systems[n] if systems else None
            )
            for n, turns in enumerate(dataset[column])
        ]
    read = _without_unanswered(fmt, rows, where)
    return _each_answer(read) if data.each_turn_as_last else read


def resolve_format(dataset: datasets.Dataset, data: DataConfig, where: Place) -> tuple[str, str]:
    """(format, the column it reads): ``data.format``, or for ``auto`` the one the columns show."""
    columns = dataset.column_names
    fmt = data.format
    if fmt == AUTO:
        if data.messages_field in columns:
            return MESSAGES, data.messages_field
        if data.prompt_field in columns and data.completion_field in columns:
            return PROMPT_COMPLETION, data.prompt_field
        if data.conversations_field in columns:
            first = _first_turn(dataset[data.conversations_field])
            return (
                MESSAGES if isinstance(first, dict) and "role" in first else SHAREGPT
            ), data.conversations_field
        fmt = TEXT
    needed = {
        TEXT: [("data.text_field", data.text_field)],
        MESSAGES: [("data.messages_field", data.messages_field)],
        SHAREGPT: [("data.conversations_field", data.conversations_field)],
        PROMPT_COMPLETION: [
            ("data.prompt_field", data.prompt_field),
            ("data.completion_field", data.completion_field),
        ],
    }[fmt]
    for key, column in needed:
        if column in columns:
            continue
        listed = f"(columns: {', '.join(columns)})"
        if data.format == AUTO:
            conversational = (
                f"{data.messages_field!r}, {data.prompt_field!r} + "
                f"{data.completion_field!r}, {data.conversations_field!r}"
            )
            raise UsageError(
                f"{key}: dataset {where.dataset!r} ({where.split}) has no column {column!r} "
                f"{listed}, nor the columns "
                f"conversations are read from ({conversational}); set {key}, or the field of "
                "your conversations "
                "(data.messages_field, ...), to one of them"
            )
        raise UsageError(
            f"data.format: {fmt} reads the column {column!r} ({key}), which dataset "
            f"{where.dataset!r} ({where.split}) "
            f"does not have {listed}; set data.format: auto to decide by the columns, or {key} "
            "to one of them"
        )
    if fmt == TEXT:
        _check_text_column(dataset, data.text_field, where)
    return fmt, needed[0][1]


# ---------------------------------------------------------------------------------------------
# Reading one row


@dataclass(frozen=True)
class Place:
    """Which study key, dataset and split a row comes from, and its number: for messages."""

    key: str
    dataset: str
    split: str
    number: int | None = None

    def row(self, number: int) -> Place:
        return Place(self.key, self.dataset, self.split, number)

    def problem(self, field: str, text: str) -> UsageError:
        return UsageError(
            f"{self.key}: row {self.number} of {self.dataset!r} ({self.split}): {field}: {text}"
        )


def _texts(dataset: datasets.Dataset, column: str, where: Place) -> list[str]:
    texts = list(dataset[column])
    for n, text in enumerate(texts):
        if text is None:
            raise where.row(n).problem(
                column, "has no text; remove such rows or choose another data.text_field"
            )
    return [text if isinstance(text, str) else str(text) for text in texts]


def _check_text_column(dataset: datasets.Dataset, column: str, where: Place) -> None:
    """A column of conversations (lists) or records (dicts) is not text: say which format reads
    it."""
    feature = dataset.features[column]
    first = dataset[0][column]
    if isinstance(
        feature, (datasets.List, datasets.LargeList, datasets.Sequence, dict)
    ) or isinstance(first, (list, dict)):
        kind = (
            "lists (conversations)"
            if isinstance(first, list) or not isinstance(feature, dict)
            else "records"
        )
        raise UsageError(
            f"data.text_field: column {column!r} of {where.dataset!r} ({where.split}) holds "
            f"{kind}, not text; "
            "set data.format to messages, sharegpt or prompt_completion (or auto) to read "
            "conversations, "
            "or data.text_field to a column of text"
        )


def _conversation(
    turns: Any, column: str, keys: tuple[str, str], where: Place, *, system: str | None
) -> Conversation:
    role_key, content_key = keys
    if not isinstance(turns, list):
        raise where.problem(
            column, f"must be a list of {{{role_key}, {content_key}}} turns, got {_kind(turns)}"
        )
    if not turns:
        raise where.problem(column, "is an empty conversation; remove the row or give it turns")
    parsed = [_turn(turn, f"{column}[{i}]", keys, where) for i, turn in enumerate(turns)]
    if system:
        parsed.insert(0, (SYSTEM, system, ""))
    return _conversation_of(parsed)


def _conversation_of(turns: list[tuple[str, str, str]], scored_from: int = 0) -> Conversation:
    return Conversation(
        tuple((role, content) for role, content, _ in turns),
        scored_from,
        tuple(reasoning for _, _, reasoning in turns),
    )


def _turn(turn: Any, field: str, keys: tuple[str, str], where: Place) -> tuple[str, str, str]:
    """``(role, content, reasoning)``: an assistant turn's reasoning apart from its answer."""
    role_key, content_key = keys
    roles = SHAREGPT_ROLES if role_key == "from" else {role: role for role in ROLES}
    if not isinstance(turn, dict):
        raise where.problem(
            field, f"must be a {{{role_key}, {content_key}}} mapping, got {_kind(turn)}"
        )
    role, content = turn.get(role_key), turn.get(content_key)
    if role is None:
        raise where.problem(
            field, f"has no {role_key!r}; give every turn one of {', '.join(roles)}"
        )
    if role not in roles:
        raise where.problem(
            field, f"has the unknown {role_key} {role!r}; use one of {', '.join(roles)}"
        )
    if not isinstance(content, str):
        what = (
            f"has no {content_key!r}"
            if content is None
            else f"{content_key!r} must be text, got {_kind(content)}"
        )
        raise where.problem(field, f"{what}; give every turn its text")
    if roles[role] != ASSISTANT:
        return roles[role], content, ""
    reasoning, answer = _reasoning_and_answer(turn, content, field, where)
    return ASSISTANT, answer, reasoning


def _reasoning_and_answer(turn: dict, content: str, field: str, where: Place) -> tuple[str, str]:
    """``(reasoning, answer)`` of an assistant turn: a reasoning key's text, or the content's
    inline think block; both at once is ambiguous."""
    keyed = [(key, turn[key]) for key in REASONING_KEYS if turn.get(key)]
    inline, answer = split_reasoning(content)
    if not keyed:
        return inline, answer
    key, reasoning = keyed[0]
    if not isinstance(reasoning, str):
        raise where.problem(f"{field}.{key}", f"must be text, got {_kind(reasoning)}")
    if inline or answer != content:
        raise where.problem(
            field,
            f"has reasoning both in {key!r} and inline in its content (<think>...</think>); "
            "keep one of them",
        )
    return reasoning, content


def _prompt_completion(
    prompt: Any, completion: Any, data: DataConfig, where: Place
) -> Completion | Conversation:
    if isinstance(prompt, str) and isinstance(completion, str):
        return Completion(prompt, completion)
    fields = (data.prompt_field, data.completion_field)
    if isinstance(prompt, list) and isinstance(completion, list):
        keys = ("role", "content")
        head = [_turn(t, f"{fields[0]}[{i}]", keys, where) for i, t in enumerate(prompt)]
        tail = [_turn(t, f"{fields[1]}[{i}]", keys, where) for i, t in enumerate(completion)]
        if not tail:
            raise where.problem(
                fields[1], "is an empty list of turns; give the completion its assistant turn"
            )
        return _conversation_of(head + tail, scored_from=len(head))
    raise where.problem(
        f"{fields[0]}/{fields[1]}",
        f"are {_kind(prompt)} and {_kind(completion)}; give both as text or both as lists of "
        f"{{role, content}} turns",
    )


def _sharegpt_systems(dataset: datasets.Dataset) -> list[str | None] | None:
    if SHAREGPT_SYSTEM_COLUMN not in dataset.column_names:
        return None
    return [
        value if isinstance(value, str) and value else None
        for value in dataset[SHAREGPT_SYSTEM_COLUMN]
    ]


def _without_unanswered(fmt: str, rows: list[Completion | Conversation], where: Place) -> Rows:
    kept = [
        (n, row) for n, row in enumerate(rows) if not isinstance(row, Conversation) or row.answers
    ]
    if not kept:
        raise UsageError(
            f"{where.key}: no row of {where.dataset!r} ({where.split}) has an assistant turn to "
            "learn from "
            f"(all {len(rows)} were left out); give the conversations assistant turns, or choose "
            "another split"
        )
    return Rows(
        fmt, [row for _, row in kept], [n for n, _ in kept], where, skipped=len(rows) - len(kept)
    )


def _each_answer(read: Rows) -> Rows:
    """``data.each_turn_as_last``: a row per answer, each numbered as the row it comes from."""
    pairs = [
        (n, part)
        for n, row in zip(read.numbers, read.rows)
        for part in (row.each_answer() if isinstance(row, Conversation) else [row])
    ]
    return dataclasses.replace(read, rows=[row for _, row in pairs], numbers=[n for n, _ in pairs])


def _first_turn(column: Iterable) -> Any:
    for turns in column:
        if isinstance(turns, list) and turns:
            return turns[0]
    return None


def _kind(value: Any) -> str:
    return {str: "text", list: "a list", dict: "a mapping", type(None): "nothing"}.get(
        type(value), type(value).__name__
    )
