"""The loss of one batch: the student's hidden states at the batch's scored positions, made into
logits block by block against the teacher's targets there (``losses.distill_loss_from_hidden``).

What a step of a trial trains on, off-policy (``train``) and on the student's own completions
(``on_policy``) alike. Only scored positions go through the output layer: the prompt's logits
are never built.

A step's loss is the mean over all the tokens it scores, whichever of its micro-batches each came
in: the loss API gives each micro-batch's means, and each weighs its share of the step's tokens
(``token_shares``), so ``grad_accum_steps`` micro-batches give the gradient of one batch of them
all. That is transformers' accumulation since 4.46 (``num_items_in_batch``, which TRL divides
by); an even average of the micro-batches' means would weigh a micro-batch of short answers as
much as one of long answers, and batches grouped by length differ by design.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedModel

from kdsweep.data import Batch
from kdsweep.distill.models import Vocabulary, hidden_states, output_weight
from kdsweep.distill.targets import TeacherTargets, scored_positions
from kdsweep.losses import LossResult, distill_loss_from_hidden
from kdsweep.study.config import TrainConfig


@dataclass(frozen=True)
class DistillSettings:
    """Everything one run needs to know: the sampled hyperparameters and the fixed settings."""

    alpha: float
    temperature: float
    top_k: int | None  # None: the teacher's whole vocabulary
    learning_rate: float
    train: TrainConfig
    beta: float = 0.0  # the divergence: 0 forward KL, 1 reverse KL (generalized JSD between)
    lmbda: float = 0.0  # the share of steps on the student's own generations (on-policy)
    group_by_length: bool = True
    # train.select "best": the measure whose best evaluation the student ends at
    objective: str = "student_ppl"


def batch_loss(
    student: PreTrainedModel,
    batch: Batch,
    targets: TeacherTargets | None,
    settings: DistillSettings,
    vocab: Vocabulary,
) -> LossResult:
    """The distillation loss of one batch, on its scored positions (no teacher targets: the
    cross-entropy alone)."""
    kept = scored_positions(batch.labels)
    hidden = hidden_states(student, batch.input_ids, batch.attention_mask)[:, :-1][kept]
    teacher = targets.as_loss_kwargs() if targets is not None else {}
    return distill_loss_from_hidden(
        hidden,
        output_weight(student, vocab),
        batch.labels[:, 1:][kept],
        **teacher,
        alpha=settings.alpha if targets is not None else 0.0,
        temperature=settings.temperature,
        beta=settings.beta,
        chunk_tokens=settings.train.loss_chunk_tokens,
    )


def token_shares(batches: Sequence[Batch]) -> list[float]:
    """Each batch's share of the tokens they all score. Count them on the CPU: on a GPU, counting
    waits for the device."""
    counts = [batch.num_scored_tokens for batch in batches]
    total = sum(counts) or 1  # no token scored: every share is 0
    return [count / total for count in counts]


def weighed(result: LossResult, share: float) -> LossResult:
    """One micro-batch's means, as its part of the step's means: its ``share`` of their tokens."""
    return LossResult(*(term * share for term in (result.loss, result.kl, result.ce)))
