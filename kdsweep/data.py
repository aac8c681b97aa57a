"""Rows to batches: loading (hub id or local file), guanaco turns, tokens with label masks, batches.

The flow is ``load_texts`` -> ``tokenize`` -> ``make_batches``. Labels follow the Hugging Face
convention: ``labels[i] == input_ids[i]`` where token ``i`` is scored and -100 elsewhere, unshifted
(the loss predicts ``labels[i + 1]`` from position ``i``). What is scored is decided by character
positions, never by token ids: Qwen pads with its EOS token, and a real EOS must stay scored.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from kdsweep.config import DataConfig
from kdsweep.errors import UsageError
from kdsweep.losses import IGNORE_INDEX  # the label of positions the loss skips (padding, prompts)

HUMAN, ASSISTANT = "human", "assistant"

_MARKERS = {HUMAN: "### Human:", ASSISTANT: "### Assistant:"}
_MARKER_PATTERN = re.compile(r"###\s*(Human|Assistant):")
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_MEGA_BATCH = 50  # group_by_length sorts within chunks of this many batches, as HF's LengthGroupedSampler


# ---------------------------------------------------------------------------------------------
# Loading


def load_texts(data: DataConfig, split: str, *, base_dir: str = ".") -> list[str]:
    """The ``data.text_field`` column of one split, in the dataset's order.

    ``data.dataset`` is a hub id, or a local ``.jsonl``/``.json``/``.parquet``/``.csv`` file (its
    rows are the split ``train``), or a folder of such files (``train.jsonl`` and ``test.jsonl``
    become the splits ``train`` and ``test``). A relative path is looked up in ``base_dir`` (the
    study file's folder) first, then in the current folder. ``split`` may slice: ``train[:500]``.

    Raises:
        UsageError: one line naming the dataset, split or field and the fix.
    """
    source = _Source.find(data.dataset, base_dir=base_dir)
    rows = source.load(split, key=_split_key(data, split))
    return _text_column(rows, data, split)


_NOT_FOUND = "was found neither as a local file or folder nor on the Hugging Face hub"
_LOCAL_KINDS = "a .jsonl, .json, .parquet or .csv file, or a folder of them"


@dataclass(frozen=True)
class _Source:
    """How ``datasets.load_dataset`` reaches a dataset, and how messages name it."""

    name: str  # as the study file gives it
    args: tuple[str, ...]
    kwargs: dict[str, str]
    kind: str  # "file", "folder" or "hub"

    @classmethod
    def find(cls, name: str, *, base_dir: str) -> _Source:
        path = _local_path(name, base_dir=base_dir)
        if path is None:
            return cls(name, (name,), {}, "hub")
        if path.is_dir():
            return cls(name, (str(path),), {}, "folder")
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise UsageError(f"data.dataset: cannot read {name!r}: use {_LOCAL_KINDS}")
        if path.stat().st_size == 0:  # datasets fails on an empty file with a bare StopIteration
            raise UsageError(f"data.dataset: {name!r} is empty; point it at a file with rows")
        return cls(name, (builder,), {"data_files": str(path)}, "file")

    def load(self, split: str, *, key: str) -> Any:
        try:
            return datasets.load_dataset(*self.args, split=split, **self.kwargs)
        except ValueError as exc:  # an unknown split, a malformed slice, a slice without rows
            raise self._split_problem(split, key=key, error=exc) from None
        except (ConnectionError, FileNotFoundError) as exc:  # FileNotFoundError: DatasetNotFoundError too
            raise self._not_found(exc) from None
        except datasets.exceptions.DatasetGenerationError as exc:
            cause = _one_line(exc.__cause__ or exc)
            raise UsageError(f"data.dataset: {self.name!r} could not be read ({cause}); check its format") from None

    def split_names(self) -> list[str]:
        try:
            return list(datasets.load_dataset(*self.args, **self.kwargs))
        except Exception:  # only words an error message; the error being reported is the original one
            return []

    def _split_problem(self, split: str, *, key: str, error: ValueError) -> UsageError:
        available = self.split_names()
        base = split.split("[")[0].strip()
        if available and base not in available:
            fix = "use one of them" if key == "split" else f"set {key} to one of them"
            if self.kind == "file":
                fix += " (a single file holds one split, 'train': slice it, e.g. train[:90%] and train[90%:])"
            return UsageError(
                f"{key}: dataset {self.name!r} has no split {base!r} (available: {', '.join(available)}); {fix}"
            )
        return UsageError(
            f"{key}: cannot take {split!r} from dataset {self.name!r} ({_one_line(error)}); "
            "give a split name with an optional slice that selects rows, e.g. train[:500] or train[10%:]"
        )

    def _not_found(self, error: Exception) -> UsageError:
        if self.kind != "hub":
            return UsageError(f"data.dataset: {self.name!r} holds no data ({_one_line(error)}); use {_LOCAL_KINDS}")
        if isinstance(error, ConnectionError) and datasets.config.HF_HUB_OFFLINE:
            fix = "offline mode is on (HF_HUB_OFFLINE) and no copy is cached: run once with network access"
        elif isinstance(error, ConnectionError):
            fix = "check the name and the network, or set HF_HUB_OFFLINE=1 to use a copy cached earlier"
        else:
            fix = "check the name (owner/name), or log in (hf auth login) for a gated dataset"
        return UsageError(f"data.dataset: {self.name!r} {_NOT_FOUND} ({_one_line(error)}); {fix}, or use {_LOCAL_KINDS}")


def _local_path(name: str, *, base_dir: str) -> Path | None:
    """The local file or folder ``name`` names, None for a hub id; a missing local path is an error."""
    path = Path(name).expanduser()
    beside_study = Path(base_dir) / path
    if not path.is_absolute() and beside_study.exists():
        return beside_study
    if path.exists():
        return path
    # A hub id is "name" or "owner/name"; anything else that does not exist is a mistyped path.
    if path.is_absolute() or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1 \
            or path.suffix.lower() in _BUILDERS:
        raise UsageError(
            f"data.dataset: no such file or folder {name!r} (looked in {base_dir!r} and the current folder); "
            "fix the path (a relative path starts from the study file's folder)"
        )
    return None


def _split_key(data: DataConfig, split: str) -> str:
    """The study key that chose ``split``, for messages."""
    if split == data.train_split:
        return "data.train_split"
    return "data.eval_split" if split == data.eval_split else "split"


def _text_column(rows: Any, data: DataConfig, split: str) -> list[str]:
    field = data.text_field
    if field not in rows.column_names:
        raise UsageError(
            f"data.text_field: dataset {data.dataset!r} ({split}) has no column {field!r} "
            f"(columns: {', '.join(rows.column_names)}); set data.text_field to one of them"
        )
    if len(rows) == 0:
        key = _split_key(data, split)
        raise UsageError(f"{key}: {split!r} of dataset {data.dataset!r} has no rows; choose a split or slice with rows")
    texts = list(rows[field])
    for i, text in enumerate(texts):
        if text is None:
            raise UsageError(
                f"data.text_field: row {i} of dataset {data.dataset!r} ({split}) has no {field!r}; "
                "remove such rows or choose another field"
            )
    return [text if isinstance(text, str) else str(text) for text in texts]


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 200 else text[:197] + "..."


# ---------------------------------------------------------------------------------------------
# Guanaco turns


def parse_guanaco(text: str) -> list[tuple[str, str]]:
    """Split ``### Human: ... ### Assistant: ...`` text into ``(speaker, content)`` turns.

    Speakers are ``"human"`` and ``"assistant"``; contents are stripped and empty turns left
    out. Text without any marker is one assistant turn, so plain-text rows are scored whole. Text
    before the first marker is context: a human turn, not scored.

    Example:
        >>> parse_guanaco("### Human: Hi?### Assistant: Hello. ### Human: Bye")
        [('human', 'Hi?'), ('assistant', 'Hello.'), ('human', 'Bye')]
        >>> parse_guanaco("  just text ")
        [('assistant', 'just text')]
    """
    before, *rest = _MARKER_PATTERN.split(text)
    if not rest:
        return [(ASSISTANT, before.strip())] if before.strip() else []
    turns = [(HUMAN, before.strip())] if before.strip() else []
    for speaker, content in zip(rest[::2], rest[1::2]):
        if content.strip():
            turns.append((speaker.lower(), content.strip()))
    return turns


def _render(text: str) -> tuple[str, list[tuple[int, int]]]:
    """The text the model sees and the character spans of the assistant's contents.

    Guanaco rows keep their markers, as in the data; a row without markers stays as it is, all
    of it an answer.
    """
    if not _MARKER_PATTERN.search(text):
        plain = text.strip()
        return plain, [(0, len(plain))] if plain else []
    rendered, spans = "", []
    for speaker, content in parse_guanaco(text):
        rendered += _MARKERS[speaker] + " "
        if speaker == ASSISTANT:
            spans.append((len(rendered), len(rendered) + len(content)))
        rendered += content
    return rendered, spans


def answer_text(generated: str) -> str:
    """The answer in generated text: up to the next turn's marker, stripped."""
    return _MARKER_PATTERN.split(generated, maxsplit=1)[0].strip()


# ---------------------------------------------------------------------------------------------
# Tokens and labels


@dataclass(frozen=True)
class TokenizedSplit:
    """Token ids and aligned labels, one tuple per example, at most ``max_length`` long."""

    input_ids: tuple[tuple[int, ...], ...]
    labels: tuple[tuple[int, ...], ...]  # input id where scored, else -100; unshifted
    dropped: int = 0  # rows left out because no token of theirs would be scored
    # Rows that end with an answer: input_ids[:prompt_length] is the conversation up to it, the
    # model's cue to answer; 0 for other rows (and () when not recorded).
    prompt_lengths: tuple[int, ...] = ()
    answers: tuple[str, ...] = ()  # the final answer's text, "" for rows without one

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
        """The tokens before the example's final answer (empty when it has none)."""
        length = self.prompt_lengths[example] if self.prompt_lengths else 0
        return self.input_ids[example][:length]

    def answered(self) -> list[int]:
        """The examples that end with an answer, in order."""
        return [e for e, length in enumerate(self.prompt_lengths) if length]


def tokenize(texts: list[str], tokenizer: Any, *, max_length: int, assistant_only: bool) -> TokenizedSplit:
    """Guanaco rows -> token ids and labels, truncated to ``max_length`` tokens.

    Each row is rendered as its turns with the ``### Human:`` / ``### Assistant:`` markers (a row
    without markers as it is, all of it an answer), and the tokenizer's EOS token is appended.
    With ``assistant_only``, the tokens of the assistant's contents are scored, plus the final EOS
    when the assistant speaks last (the model must learn to stop); markers and human turns get
    -100. Without it every token is scored.

    The whole row is tokenized at once and tokens are mapped to characters through the offsets of a
    fast tokenizer, so the ids are exactly those the model sees for the text (tokenizing segment by
    segment would change merges at the boundaries); a token that covers any answer character is
    scored. Special tokens the tokenizer adds (a BOS) have no characters and are not scored.
    Rows with no scored token at positions >= 1 (none left after truncation, or no answer) would
    add nothing to a loss and are dropped; ``TokenizedSplit.dropped`` counts them.

    A row whose last turn is the assistant's (and survives truncation) also records its prompt,
    the tokens wholly before that answer: a prefix of its ids, so generating from it continues
    exactly the token sequence the model is trained on.
    """
    _check_tokenizer(tokenizer)
    rendered = [_render(text) for text in texts]
    encoded = tokenizer([text for text, _ in rendered], return_offsets_mapping=True, add_special_tokens=True)
    input_ids, labels, prompt_lengths, answers = [], [], [], []
    for (text, spans), ids, offsets in zip(rendered, encoded["input_ids"], encoded["offset_mapping"]):
        ends_answered = bool(spans and spans[-1][1] == len(text))  # the assistant speaks last
        final_answer = ends_answered and spans[-1][0] > 0
        scored = [not assistant_only or _covers(offset, spans) for offset in offsets]
        scored.append(not assistant_only or ends_answered)  # EOS is scored after a final answer
        ids = [*ids, tokenizer.eos_token_id][:max_length]
        row_labels = [i if s else IGNORE_INDEX for i, s in zip(ids, scored)]
        if count_scored(row_labels):
            prompt = sum(end <= spans[-1][0] for _, end in offsets) if final_answer else 0
            keeps_answer = 0 < prompt < len(ids)
            input_ids.append(tuple(ids))
            labels.append(tuple(row_labels))
            prompt_lengths.append(prompt if keeps_answer else 0)
            answers.append(text[spans[-1][0]:] if keeps_answer else "")
    return TokenizedSplit(
        tuple(input_ids), tuple(labels), dropped=len(texts) - len(input_ids),
        prompt_lengths=tuple(prompt_lengths), answers=tuple(answers),
    )


def _check_tokenizer(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(
            "the tokenizer is not a fast (Rust) tokenizer, needed to map answers to tokens; "
            "load one with AutoTokenizer.from_pretrained(...)"
        )
    if tokenizer.eos_token_id is None:
        raise UsageError("the tokenizer has no EOS token; set one (tokenizer.eos_token) so rows can end")


def _covers(offset: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    start, end = offset
    return any(start < span_end and end > span_start for span_start, span_end in spans)


def count_scored(labels: tuple[int, ...] | list[int]) -> int:
    """Scored labels that a shifted loss predicts (positions >= 1)."""
    # Position 0 is never predicted: nothing comes before it.
    return sum(label != IGNORE_INDEX for label in labels[1:])


# ---------------------------------------------------------------------------------------------
# Batches


@dataclass(frozen=True)
class Batch:
    """Right-padded tensors, all ``[B, S]`` int64 except ``example_ids`` ``[B]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor  # 1 on real tokens, 0 on padding
    labels: torch.Tensor  # -100 on padding and unscored tokens
    example_ids: torch.Tensor  # each row's index in the TokenizedSplit (the teacher cache's key)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens. On a GPU, reading it waits for the device."""
        return int(self.attention_mask.sum())

    @property
    def num_scored_tokens(self) -> int:
        """Tokens a shifted loss predicts: labels != -100 at positions >= 1."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def make_batches(
    split: TokenizedSplit, *, batch_size: int, pad_id: int, shuffle_seed: int | None, group_by_length: bool
) -> list[Batch]:
    """Cut ``split`` into right-padded batches; the same arguments give the same batches.

    ``shuffle_seed=None`` keeps the split's order (evaluation); an integer shuffles it with that
    seed (training: pass seed + epoch for successive epochs). ``group_by_length`` sorts rows by
    length within chunks of 50 batches and, when shuffling, shuffles the batches, so little compute
    goes to padding while the order still changes with the seed. ``pad_id`` fills ``input_ids``
    only; nothing is ever masked by it.
    """
    lengths = [len(ids) for ids in split.input_ids]
    order = _batch_order(lengths, batch_size=batch_size, shuffle_seed=shuffle_seed, group_by_length=group_by_length)
    return [collate(split, rows, pad_id=pad_id) for rows in order]


def _batch_order(
    lengths: list[int], *, batch_size: int, shuffle_seed: int | None, group_by_length: bool
) -> list[list[int]]:
    """The example indices of each batch."""
    rng = random.Random(shuffle_seed)
    indices = list(range(len(lengths)))
    if shuffle_seed is not None:
        rng.shuffle(indices)
    if group_by_length:
        indices = _longest_first_within_chunks(indices, lengths, chunk=batch_size * _MEGA_BATCH)
    batches = [indices[start:start + batch_size] for start in range(0, len(indices), batch_size)]
    if group_by_length and shuffle_seed is not None and batches:
        rng.shuffle(batches)
        # The longest batch goes first, so a batch that does not fit in memory fails at step 1.
        longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
        batches.insert(0, batches.pop(longest))
    return batches


def _longest_first_within_chunks(indices: list[int], lengths: list[int], *, chunk: int) -> list[int]:
    # Sorting within chunks rather than globally keeps some of the shuffle's randomness.
    chunks = [indices[start:start + chunk] for start in range(0, len(indices), chunk)]
    return [i for part in chunks for i in sorted(part, key=lambda i: -lengths[i])]


def collate(split: TokenizedSplit, rows: list[int], *, pad_id: int) -> Batch:
    """The examples ``rows`` of ``split`` as one right-padded batch."""
    width = max(len(split.input_ids[i]) for i in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, i in enumerate(rows):
        n = len(split.input_ids[i])
        input_ids[row, :n] = torch.tensor(split.input_ids[i], dtype=torch.long)
        labels[row, :n] = torch.tensor(split.labels[i], dtype=torch.long)
        attention_mask[row, :n] = 1
    return Batch(input_ids, attention_mask, labels, torch.tensor(rows, dtype=torch.long))


def padding_share(batches: list[Batch]) -> float:
    """Padded positions / all positions the batches make a model compute."""
    total = sum(batch.input_ids.numel() for batch in batches)
    return (total - sum(batch.num_tokens for batch in batches)) / total if total else 0.0
