"""The teacher signal a trial distills from: the teacher run online, or its on-disk top-K cache.

Both give, for the scored positions of a batch (row-major, as ``scored_positions`` selects them),
either the teacher's logits over the shared vocabulary or its K largest logits and their ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from kdsweep.data import Batch
from kdsweep.models import Vocabulary, hidden_states, output_weight


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


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """``[B, S-1]`` mask of the positions whose next token is scored (position i predicts i+1)."""
    return labels[:, 1:] != -100


class OnlineTeacher:
    """Runs the frozen teacher on each batch. Loaded once per worker and kept across trials."""

    def __init__(self, model: PreTrainedModel, vocab: Vocabulary):
        self.model = model
        self.vocab = vocab
        self.tokens_processed = 0

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
