"""Tokenized rows to right-padded batches, grouped by length so little compute goes to padding."""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kdsweep.data.tokens import TokenizedSplit
from kdsweep.losses import IGNORE_INDEX

# group_by_length sorts within chunks of this many batches, as HF's LengthGroupedSampler does.
_MEGA_BATCH = 50


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
    split: TokenizedSplit,
    *,
    batch_size: int,
    pad_id: int,
    shuffle_seed: int | None,
    group_by_length: bool,
) -> list[Batch]:
    """Cut ``split`` into right-padded batches; the same arguments give the same batches.

    ``shuffle_seed=None`` keeps the split's order (evaluation); an integer shuffles it with that
    seed (training: pass seed + epoch for successive epochs). ``group_by_length`` sorts rows by
    length within chunks of 50 batches and, when shuffling, shuffles the batches, so little compute
    goes to padding while the order still changes with the seed. ``pad_id`` fills ``input_ids``
    only; nothing is ever masked by it.
    """
    lengths = [len(ids) for ids in split.input_ids]
    order = _batch_order(
        lengths, batch_size=batch_size, shuffle_seed=shuffle_seed, group_by_length=group_by_length
    )
    return [collate(split, rows, pad_id=pad_id) for rows in order]


def training_order(
    split: TokenizedSplit, *, batch_size: int, seed: int, group_by_length: bool
) -> Iterator[list[int]]:
    """The example indices of each micro-batch of a training stream, epoch after epoch, each
    epoch in its own order (seeded with ``seed + epoch``): every trial with these settings sees
    the same stream, and a resumed one can skip what it already trained on."""
    lengths = [len(ids) for ids in split.input_ids]
    for epoch in itertools.count():
        yield from _batch_order(
            lengths,
            batch_size=batch_size,
            shuffle_seed=seed + epoch,
            group_by_length=group_by_length,
        )


def rows_read(
    split: TokenizedSplit, *, batch_size: int, micro_batches: int, seed: int, group_by_length: bool
) -> set[int]:
    """The examples the first ``micro_batches`` micro-batches of a training stream hold."""
    order = training_order(
        split, batch_size=batch_size, seed=seed, group_by_length=group_by_length
    )
    read: set[int] = set()
    for rows in itertools.islice(order, micro_batches):
        read.update(rows)
        if len(read) == len(split):
            break  # every row: the rest of the stream adds none
    return read


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
    batches = [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]
    if group_by_length and shuffle_seed is not None and batches:
        rng.shuffle(batches)
        # The longest batch goes first, so a batch that does not fit in memory fails at step 1.
        longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
        batches.insert(0, batches.pop(longest))
    return batches


def _longest_first_within_chunks(
    indices: list[int], lengths: list[int], *, chunk: int
) -> list[int]:
    # Sorting within chunks rather than globally keeps some of the shuffle's randomness.
    chunks = [indices[start : start + chunk] for start in range(0, len(indices), chunk)]
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
