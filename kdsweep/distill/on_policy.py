"""On-policy steps (GKD; TRL's ``lmbda``): the student trains on its own completions.

With probability ``lmbda`` an optimizer step trains on the student's own sampled completions of
its rows' prompts, which the teacher scores online (they are new: no cache holds them); the
divergence is taken on the generated tokens only, while the cross-entropy keeps the rows'
reference answers, each a mean over the whole step's tokens of its kind. The other steps read the
teacher's targets as usual (the cache, typically).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass

from transformers import PreTrainedModel

from kdsweep.data import Batch, TokenizedSplit, collate
from kdsweep.distill.generation import generate
from kdsweep.distill.loss import DistillSettings, batch_loss, token_shares, weighed
from kdsweep.distill.models import Vocabulary
from kdsweep.distill.targets import OnlineTeacher
from kdsweep.losses import IGNORE_INDEX, LossResult


@dataclass
class OnPolicy:
    """What an on-policy step needs: the teacher run online, the training rows' prompts, and how
    the student samples its completions; and what the steps have generated so far."""

    teacher: OnlineTeacher  # scores generated tokens
    split: TokenizedSplit  # the training rows, whose prompts the student completes
    temperature: float
    max_new_tokens: int
    pad_id: int
    eos_id: int
    generated_tokens: int = 0  # student tokens trained on, so far
    seconds: float = 0.0  # spent generating, so far
    batches: int = 0  # micro-batches completed by the student, so far

    def losses(
        self,
        student: PreTrainedModel,
        micro_batches: list[Batch],
        settings: DistillSettings,
        vocab: Vocabulary,
        *,
        autocast,
    ) -> Iterator[LossResult]:
        """Each micro-batch's part of an on-policy step's loss, ``alpha * D(teacher || student on
        its own completions) + (1 - alpha) * CE(references)``, made as the loop asks for it.

        Each term is a mean over the whole step, as the off-policy loss is: the divergence over
        all the tokens the step's completions hold, the cross-entropy over all its reference
        tokens (``loss.token_shares``). So the completions are sampled first, all of them (the
        student's weights do not change within a step), to count their tokens before the first
        part goes backward. Rows without a final answer (no prompt to complete) take part in the
        cross-entropy only; a step without a completion has no divergence term, and its
        cross-entropy keeps its weight, 1 - alpha.
        """
        device = next(student.parameters()).device
        batches = [batch.to(device) for batch in micro_batches]
        completions = [self.complete(student, batch) for batch in batches]
        divergence_shares = iter(token_shares([c for c in completions if c is not None]))
        alpha, divergence_only = settings.alpha, dataclasses.replace(settings, alpha=1.0)
        for batch, completion, share in zip(batches, completions, token_shares(micro_batches)):
            with autocast():  # the cross-entropy alone: its loss, which has the gradient
                reference = weighed(batch_loss(student, batch, None, settings, vocab), share)
            part = LossResult(loss=(1 - alpha) * reference.loss, kl=reference.kl, ce=reference.ce)
            if completion is not None:
                targets = self.teacher.targets(completion, top_k=settings.top_k)
                with autocast():  # the divergence alone
                    divergence = batch_loss(student, completion, targets, divergence_only, vocab)
                divergence = weighed(divergence, next(divergence_shares))
                part = LossResult(part.loss + alpha * divergence.loss, divergence.kl, part.ce)
            yield part

    def counters(self) -> dict:
        return {
            "generated_tokens": self.generated_tokens,
            "seconds": self.seconds,
            "batches": self.batches,
        }

    def restore(self, counters: dict) -> None:
        for name, value in counters.items():
            setattr(self, name, value)

    def complete(self, student: PreTrainedModel, batch: Batch) -> Batch | None:
        """The student's sampled completions of the batch's prompts, as a batch whose labels mark
        the generated tokens only (the prompt, and so the reference answer, is never scored)."""
        prompts = [prompt for e in batch.example_ids.tolist() if (prompt := self.split.prompt(e))]
        if not prompts:
            return None
        started = time.perf_counter()
        generated = generate(
            student,
            prompts,
            pad_id=self.pad_id,
            eos_id=self.eos_id,
            max_new_tokens=self.max_new_tokens,
            batch_size=len(prompts),
            temperature=self.temperature,
            vocab_size=self.teacher.vocab.size,
        )
        self.seconds += time.perf_counter() - started
        self.generated_tokens += sum(map(len, generated))
        self.batches += 1
        split = TokenizedSplit(
            tuple(tuple(p) + tuple(g) for p, g in zip(prompts, generated)),
            tuple((IGNORE_INDEX,) * len(p) + tuple(g) for p, g in zip(prompts, generated)),
        )
        return collate(split, list(range(len(prompts))), pad_id=self.pad_id).to(
            batch.input_ids.device
        )
