"""One trial's training, as the objective runs it: a fresh student distilled with the trial's
parameters from the study's teacher, ending at the checkpoint ``train.select`` chooses.

:meth:`TrialRunner.prepare` makes what a study's trials share, once per worker: the inputs
(``inputs``), the teacher (``teacher``), the validation set with the teacher's targets on it,
and the test set. The objective receives the runner and calls it once per trial; a test gives it
another runner.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdsweep.data import Batch, TokenizedSplit, make_batches
from kdsweep.distill import clock, lora, models, train
from kdsweep.distill.evaluate import (
    Answers,
    EvalSet,
    TestSet,
    accuracy,
    evaluate_student,
    score_test,
)
from kdsweep.distill.loss import DistillSettings
from kdsweep.errors import UsageError
from kdsweep.names import Metric
from kdsweep.prepare.inputs import Inputs, read_inputs
from kdsweep.prepare.teacher import StudyTeacher
from kdsweep.progress import SweepProgress
from kdsweep.study import space
from kdsweep.study.config import StudyConfig
from kdsweep.study.measures import ACCURACY_MEASURES


@dataclass(frozen=True, kw_only=True)
class TrialRunner:
    """What a study's trials share, and the training of one trial."""

    study: StudyConfig
    inputs: Inputs
    teacher: StudyTeacher
    eval_set: EvalSet  # the validation split, with the teacher's targets
    test_set: TestSet | None = None  # data.test_split: scored for the finalists only
    # what preparing took, the teacher's caches aside (their build is counted on its own)
    seconds: float = 0.0

    @classmethod
    def prepare(cls, study: StudyConfig, *, progress: SweepProgress) -> TrialRunner:
        """Read and check every input, then make the teacher (its cache, built once per study, or
        its weights, loaded once per worker), the validation set and the test set."""
        started = time.perf_counter()
        if study.train.threads:
            torch.set_num_threads(study.train.threads)
        inputs = read_inputs(study, progress)
        teacher = StudyTeacher.prepare(study=study, inputs=inputs, progress=progress)
        eval_set = teacher.eval_set(_batches(study, inputs, inputs.eval_split))
        if study.eval.accuracy:
            answers = _answers(study, inputs.eval_split, inputs, study.data.eval_split, progress)
            eval_set = dataclasses.replace(eval_set, answers=answers)
        test_set = None
        if inputs.test_split is not None:
            answers = None
            if study.eval.accuracy:
                split = inputs.test_split
                answers = _answers(study, split, inputs, study.data.test_split, progress)
            test_set = TestSet(_batches(study, inputs, inputs.test_split), answers)
        seconds = time.perf_counter() - started - teacher.built_seconds
        return cls(
            study=study,
            inputs=inputs,
            teacher=teacher,
            eval_set=eval_set,
            test_set=test_set,
            seconds=seconds,
        )

    @property
    def device(self) -> torch.device:
        return self.inputs.device

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.inputs.tokenizer

    def __call__(
        self,
        params: dict,
        hooks: train.TrialHooks | None = None,
        *,
        seed: int | None = None,
        batch: tuple[int, int] | None = None,
    ) -> train.DistillResult:
        """One trial: a fresh student distilled with ``params`` (the declared search space), with
        the study's training seed or ``seed``, and its micro-batch and accumulation or ``batch``
        (an out-of-memory retry's).

        The student ends at the checkpoint ``train.select`` chooses, where accuracy is measured
        (and, with ``hooks.scores_test``, the test split scored): ``DistillResult.after`` holds
        what was measured there. ``hooks`` hear the trial as it trains (``train.TrialHooks``).
        """
        hooks = hooks or train.TrialHooks()
        settings = self.settings(params, seed=seed, batch=batch)
        student = self.new_student(params, seed=settings.train.seed)
        hooks.built(sum(p.numel() for p in student.parameters() if p.requires_grad))
        result = train.distill(student, settings, self.training_data, self.teacher, hooks)
        after = self.measure(student, result.final_eval, on_test=hooks.scores_test)
        hooks.trained(student)
        return dataclasses.replace(result, final_eval=result.final_eval | after, after=after)

    def settings(
        self, params: dict, *, seed: int | None = None, batch: tuple[int, int] | None = None
    ) -> DistillSettings:
        """What a trial with ``params`` trains with: its parameters as the loop takes them (a
        LoRA trial's learning rate scaled), the study's fixed settings, and its seed and batch."""
        fixed = self.study.train
        if seed is not None:
            fixed = dataclasses.replace(fixed, seed=seed)
        if batch is not None:
            fixed = dataclasses.replace(fixed, batch_size=batch[0], grad_accum_steps=batch[1])
        values = space.settings(params)
        rank = values.pop("lora_rank")
        values["learning_rate"] = self.study.student.lora.learning_rate(
            values["learning_rate"], rank
        )
        return DistillSettings(
            **values,
            train=fixed,
            group_by_length=self.study.data.group_by_length,
            objective=self.study.primary_objective,
        )

    @property
    def training_data(self) -> train.TrainingData:
        return train.TrainingData(
            self.inputs.train_split, self.inputs.vocab, self.tokenizer.pad_token_id, self.evaluate
        )

    def new_student(self, params: dict, *, seed: int) -> PreTrainedModel:
        """A fresh student in the form ``params`` give it: whole, or with a LoRA adapter of its
        ``lora_rank`` (whose random start is drawn from ``seed``)."""
        student = models.load_model(
            "student",
            self.inputs.student,
            self.device,
            attention=self.study.train.attn_implementation,
        )
        torch.manual_seed(seed)
        return lora.adapt(student, params.get("lora_rank", 0), self.study.student.lora)

    def measure(self, student: PreTrainedModel, measured: dict, *, on_test: bool) -> dict:
        """What is measured at the trial's final checkpoint: accuracy on the validation split
        (unless an evaluation already did), and the test split for a finalist."""
        with clock.part(clock.EVAL):
            return self._measure(student, measured, on_test=on_test)

    def _measure(self, student: PreTrainedModel, measured: dict, *, on_test: bool) -> dict:
        found = {}
        if self.eval_set.answers is not None and Metric.EXACT_MATCH not in measured:
            found |= accuracy(student, self.eval_set.answers)
        if on_test and self.test_set is not None:
            found |= score_test(student, self.test_set, self.inputs.vocab)
        return found

    def evaluate(self, student: PreTrainedModel, step: int) -> dict[str, float]:
        """A trial's evaluation at ``step`` on the validation split; accuracy too when the study
        decodes answers at every evaluation (an accuracy objective needs it to select and
        prune); otherwise accuracy waits for the final checkpoint (``measure``)."""
        return evaluate_student(
            student,
            self.eval_set,
            self.inputs.vocab,
            chunk_tokens=self.study.train.loss_chunk_tokens,
            with_accuracy=self.study.accuracy_every_eval,
        )

    def topk_mass(self, params: dict) -> float | None:
        """The teacher's probability mass the trial's top_k keeps (None: it runs online)."""
        return self.teacher.mass(params["top_k"])


def _batches(study: StudyConfig, inputs: Inputs, split: TokenizedSplit) -> list[Batch]:
    """A held-out split in batches, in its order (grouped by length)."""
    return make_batches(
        split,
        batch_size=study.train.eval_batch_size,
        pad_id=inputs.tokenizer.pad_token_id,
        shuffle_seed=None,
        group_by_length=True,
    )


def _answers(
    study: StudyConfig, split: TokenizedSplit, inputs: Inputs, name: str, progress: SweepProgress
) -> Answers | None:
    """A held-out split's rows whose final answers are decoded; None, with a warning, when no row
    ends with one (accuracy is then off there: there is nothing to ask)."""
    if split.answered():
        return Answers.of(split, inputs.tokenizer, study.eval)
    wanted = [o for o in study.objectives if o in ACCURACY_MEASURES]
    if wanted and name == study.data.eval_split:
        raise UsageError(
            f"objective: {wanted[0]} needs eval rows that end with an answer, and no row of "
            f"{name!r} does; choose another objective or eval split"
        )
    progress.message(
        f"warning: eval.accuracy: no row of {name!r} ends with an assistant turn, so there is "
        "no answer to decode; accuracy is off there"
    )
    return None
