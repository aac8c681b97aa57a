"""Evaluation on held-out tokens: token-weighted perplexity and KL to the teacher.

Perplexity is exp(total NLL / total scored tokens) over the whole eval set, so a long answer
weighs as many times as it has tokens; teacher and student are scored on the very same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from kdsweep.data import Batch
from kdsweep.losses import distill_loss_from_hidden
from kdsweep.models import Vocabulary, hidden_states, output_weight
from kdsweep.teacher import OnlineTeacher, TeacherTargets, scored_positions

# The eval KL at T=1 compares with the teacher's 256 most likely tokens (renormalised): for a
# trained LM they hold nearly all the mass, and they fit in memory for the whole eval set.
EVAL_TOP_K = 256


@dataclass(frozen=True)
class EvalSet:
    """The held-out batches, with the teacher's targets for them computed once per study."""

    batches: list[Batch]
    teacher_targets: list[TeacherTargets]
    teacher_ppl: float
    num_tokens: int


@dataclass(frozen=True)
class Scores:
    nll_sum: float
    kl_sum: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.tokens) if self.tokens else float("nan")

    @property
    def kl(self) -> float:
        return self.kl_sum / self.tokens if self.tokens else float("nan")


@torch.no_grad()
def score(
    model: PreTrainedModel,
    batches: list[Batch],
    vocab: Vocabulary,
    *,
    teacher_targets: list[TeacherTargets] | None = None,
    chunk_tokens: int = 1024,
) -> Scores:
    """Summed NLL (and KL at T=1 to the teacher's targets, when given) over all scored tokens."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    weight = output_weight(model, vocab)
    nll = kl = 0.0
    tokens = 0
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        kept = scored_positions(batch.labels)
        hidden = hidden_states(model, batch.input_ids, batch.attention_mask)[:, :-1][kept]
        targets = teacher_targets[i].as_loss_kwargs() if teacher_targets else {}
        result = distill_loss_from_hidden(
            hidden,
            weight,
            batch.labels[:, 1:][kept],
            **targets,
            alpha=1.0 if targets else 0.0,
            temperature=1.0,
            chunk_tokens=chunk_tokens,
        )
        count = int(kept.sum())
        nll += float(result.ce) * count
        kl += float(result.kl) * count
        tokens += count
    model.train(was_training)
    return Scores(nll_sum=nll, kl_sum=kl, tokens=tokens)


def prepare_eval_set(teacher: OnlineTeacher, batches: list[Batch], *, chunk_tokens: int) -> EvalSet:
    """Score the teacher once per study and keep its top tokens for the students' KL."""
    device = next(teacher.model.parameters()).device
    targets = [teacher.targets(batch.to(device), top_k=EVAL_TOP_K) for batch in batches]
    teacher_scores = score(teacher.model, batches, teacher.vocab, chunk_tokens=chunk_tokens)
    return EvalSet(
        batches=batches,
        teacher_targets=targets,
        teacher_ppl=teacher_scores.perplexity,
        num_tokens=teacher_scores.tokens,
    )


def evaluate_student(student: PreTrainedModel, eval_set: EvalSet, vocab: Vocabulary, *, chunk_tokens: int) -> dict[str, float]:
    """The eval metrics every trial logs: perplexities, their ratio and KL to the teacher."""
    scores = score(student, eval_set.batches, vocab, teacher_targets=eval_set.teacher_targets, chunk_tokens=chunk_tokens)
    return {
        "student_ppl": scores.perplexity,
        "teacher_ppl": eval_set.teacher_ppl,
        "ppl_ratio": scores.perplexity / eval_set.teacher_ppl,
        "kl_to_teacher": scores.kl,
    }
