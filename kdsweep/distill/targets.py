"""The teacher's targets for a batch, and the teacher run online to make them.

A trial distills from a *teacher signal* (:class:`TeacherSignal`): for the scored positions of a
batch (row-major, as ``scored_positions`` selects them), either the teacher's logits over the
shared vocabulary or its K largest logits and their ids. :class:`OnlineTeacher` runs the frozen
model; ``prepare.teacher_cache.CachedTeacher`` reads what it wrote once;
``prepare.teacher.StudyTeacher`` chooses between them for a study.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedModel

from kdsweep.data import Batch
from kdsweep.distill.models import Vocabulary, hidden_states, output_weight
from kdsweep.losses import IGNORE_INDEX

# The teacher's fp32 logits of one chunk of positions while its cache rows are written: 256 MiB is
# 441 positions at Qwen3's vocabulary, long enough for the matmul and small beside the teacher.
_TOP_K_CHUNK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class TeacherTargets:
    """What the loss compares the student with, for N scored positions."""

    logits: torch.Tensor | None = None  # [N, V] the whole shared vocabulary
    values: torch.Tensor | None = None  # [N, K] the K largest raw logits
    indices: torch.Tensor | None = None  # [N, K] their vocabulary ids

    def as_loss_kwargs(self) -> dict:
        if self.logits is not None:
            return {"teacher_logits": self.logits}
        return {"teacher_values": self.values, "teacher_indices": self.indices}


class TeacherSignal(Protocol):
    """What a trial distills from: ``OnlineTeacher``, or the study's teacher
    (``prepare.teacher.StudyTeacher``), which reads its cache when it has one."""

    def targets(self, batch: Batch, *, top_k: int | None) -> TeacherTargets:
        """The teacher's logits (top_k None: all of them) at the batch's scored positions."""

    def online(self, why: str = "") -> OnlineTeacher:
        """The teacher run online: on-policy steps score tokens no cache holds."""


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """``[B, S-1]`` mask of the positions whose next token is scored (position i predicts i+1)."""
    return labels[:, 1:] != IGNORE_INDEX


@dataclass(frozen=True)
class TopKRows:
    """The teacher's summary of N scored positions, as the cache stores it."""

    values: torch.Tensor  # [N, K] fp32, largest first
    indices: torch.Tensor  # [N, K] int64
    lse: torch.Tensor  # [N] fp32 log-sum-exp over the shared vocabulary
    nll: torch.Tensor  # [N] fp32 -log p(label)


class OnlineTeacher:
    """Runs the frozen teacher on each batch. Loaded once per worker and kept across trials."""

    def __init__(self, model: PreTrainedModel, vocab: Vocabulary):
        self.model = model
        self.vocab = vocab
        self.tokens_processed = 0  # real (unpadded) tokens the teacher has run on

    def online(self, why: str = "") -> OnlineTeacher:
        return self

    @torch.no_grad()
    def targets(self, batch: Batch, *, top_k: int | None) -> TeacherTargets:
        hidden = hidden_states(self.model, batch.input_ids, batch.attention_mask)
        kept = hidden[:, :-1][scored_positions(batch.labels)]
        # Only scored positions go through the output layer: the prompt's logits are never needed.
        logits = kept @ output_weight(self.model, self.vocab).T
        self.tokens_processed += int(batch.attention_mask.sum())
        if top_k is None or top_k >= self.vocab.size:
            return TeacherTargets(logits=logits)
        values, indices = torch.topk(logits, top_k, dim=-1)
        return TeacherTargets(values=values, indices=indices)

    @torch.no_grad()
    def top_k_rows(self, batch: Batch, k: int, *, chunk_tokens: int | None) -> TopKRows:
        """The cache's rows for a batch. The output layer runs in fp32, as the students' loss does,
        so the stored logits, lse and NLL are as exact as the teacher's hidden states allow.
        ``chunk_tokens`` positions at a time (None: as many as fit `_TOP_K_CHUNK_BYTES`)."""
        kept = scored_positions(batch.labels)
        hidden = hidden_states(self.model, batch.input_ids, batch.attention_mask)[:, :-1][kept]
        labels = batch.labels[:, 1:][kept]
        weight = output_weight(self.model, self.vocab).float()
        chunk = chunk_tokens or max(1, _TOP_K_CHUNK_BYTES // (4 * weight.shape[0]))
        chunks = zip(hidden.split(chunk), labels.split(chunk))
        parts = [_summarise(h.float() @ weight.T, y, k) for h, y in chunks]  # [chunk, V] at a time
        self.tokens_processed += int(batch.attention_mask.sum())
        # Every row of a TokenizedSplit has a scored token: a batch has at least one chunk.
        return TopKRows(*(torch.cat(column) for column in zip(*parts)))


def _summarise(logits: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    lse = torch.logsumexp(logits, dim=-1)
    nll = lse - logits.gather(-1, labels[:, None]).squeeze(-1)
    values, indices = torch.topk(logits, k, dim=-1)
    return values, indices, lse, nll
