"""On-policy steps (GKD; TRL's ``lmbda``): the student trains on its own completions.

With probability ``lmbda`` an optimizer step trains on the student's own sampled completions of
its rows' prompts, which the teacher scores online (they are new: no cache holds them); the
divergence is taken on the generated tokens only, while the cross-entropy keeps the rows'
reference answers. The other steps read the teacher's targets as usual (the cache, typically).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from transformers import PreTrainedModel

from kdsweep.data import Batch, TokenizedSplit, collate
from kdsweep.distill.generation import generate
from kdsweep.distill.loss import DistillSettings, batch_loss
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

    def loss(
        self,
        student: PreTrainedModel,
        batch: Batch,
        settings: DistillSettings,
        vocab: Vocabulary,
        *,
        autocast,
    ) -> LossResult:
        """``alpha * D(teacher || student on its own completions) + (1 - alpha) * CE(references)``.

        Rows without a final answer (no prompt to complete) take part in the cross-entropy only;
        a micro-batch of such rows has no divergence term, and its CE keeps its weight.
        """
        with autocast():
            reference = batch_loss(student, batch, None, settings, vocab)  # CE on the answers
        completions = self.complete(student, batch)
        if completions is None:
            return dataclasses.replace(reference, loss=(1 - settings.alpha) * reference.loss)
        targets = self.teacher.targets(completions, top_k=settings.top_k)
        with autocast():
            divergence = batch_loss(
                student, completions, targets, dataclasses.replace(settings, alpha=1.0), vocab
            )
        loss = settings.alpha * divergence.loss + (1 - settings.alpha) * reference.loss
        return LossResult(loss=loss, kl=divergence.kl, ce=reference.ce)

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
