"""One trial's training, as the objective runs it: a fresh student distilled with the trial's
parameters from the study's teacher, evaluated as the study asks.

:meth:`TrialRunner.prepare` makes what a study's trials share, once per worker: the inputs
(``inputs``), the teacher (``study_teacher``) and the eval set with the teacher's targets on it.
The objective receives the runner and calls it once per trial; a test gives it another runner.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdsweep import models, space, train
from kdsweep.config import StudyConfig
from kdsweep.errors import UsageError
from kdsweep.evaluate import Answers, EvalSet, evaluate_student
from kdsweep.inputs import Inputs, read_inputs
from kdsweep.objectives import ACCURACY_OBJECTIVES
from kdsweep.progress import SweepProgress
from kdsweep.study_teacher import StudyTeacher, eval_batches


@dataclass(frozen=True, kw_only=True)
class TrialRunner:
    """What a study's trials share, and the training of one trial."""

    study: StudyConfig
    inputs: Inputs
    teacher: StudyTeacher
    eval_set: EvalSet

    @classmethod
    def prepare(cls, study: StudyConfig, *, progress: SweepProgress) -> TrialRunner:
        """Read and check every input, then make the teacher (its cache, built once per study, or
        its weights, loaded once per worker) and the eval set."""
        if study.train.threads:
            torch.set_num_threads(study.train.threads)
        inputs = read_inputs(study, progress)
        teacher = StudyTeacher.prepare(study=study, inputs=inputs, progress=progress)
        eval_set = teacher.eval_set(eval_batches(study, inputs))
        if study.eval.accuracy:
            eval_set = dataclasses.replace(eval_set, answers=_answers(study, inputs, progress))
        return cls(study=study, inputs=inputs, teacher=teacher, eval_set=eval_set)

    @property
    def device(self) -> torch.device:
        return self.inputs.device

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.inputs.tokenizer

    def __call__(
        self,
        params: dict,
        *,
        seed: int | None = None,
        batch: tuple[int, int] | None = None,
        on_log,
        on_eval,
        on_trained=None,
    ) -> train.DistillResult:
        """One trial: a fresh student distilled with ``params`` (the declared search space), with
        the study's training seed or ``seed``, and its micro-batch and accumulation or ``batch``.
        ``on_trained(student)``, if given, sees the trained student (``save_best`` saves it)."""
        student = models.load_model("student", self.inputs.student, self.device)
        fixed = (
            self.study.train if seed is None else dataclasses.replace(self.study.train, seed=seed)
        )
        if batch is not None:
            fixed = dataclasses.replace(fixed, batch_size=batch[0], grad_accum_steps=batch[1])
        settings = train.DistillSettings(
            **space.settings(params), train=fixed, group_by_length=self.study.data.group_by_length
        )
        result = train.distill(
            student,
            self.inputs.train_split,
            self.teacher,
            settings,
            vocab=self.inputs.vocab,
            pad_id=self.tokenizer.pad_token_id,
            evaluate=self.evaluate,
            on_log=on_log,
            on_eval=on_eval,
            on_policy=self.on_policy() if settings.lmbda > 0 else None,
        )
        if on_trained is not None:
            on_trained(student)
        return result

    def on_policy(self) -> train.OnPolicy:
        """What a trial's on-policy steps need: the teacher run online, the prompts, how to
        sample."""
        cfg = self.study.train
        return train.OnPolicy(
            self.teacher.online("score on-policy completions"),
            self.inputs.train_split,
            temperature=cfg.generation_temperature,
            max_new_tokens=cfg.generation_max_new_tokens,
            pad_id=self.tokenizer.pad_token_id,
            eos_id=self.inputs.train_split.stop_id,
        )

    def evaluate(self, student: PreTrainedModel, step: int) -> dict[str, float]:
        """A trial's evaluation at ``step``: accuracy too at the last step, or at every one when
        the study asks (an accuracy objective needs it for pruning)."""
        with_accuracy = self.study.accuracy_every_eval or step == self.study.train.max_steps
        return evaluate_student(
            student,
            self.eval_set,
            self.inputs.vocab,
            chunk_tokens=self.study.train.loss_chunk_tokens,
            with_accuracy=with_accuracy,
        )

    def topk_mass(self, params: dict) -> float | None:
        """The teacher's probability mass the trial's top_k keeps (None: the teacher runs
        online)."""
        return self.teacher.mass(params["top_k"])


def _answers(study: StudyConfig, inputs: Inputs, progress: SweepProgress) -> Answers | None:
    """The eval rows whose final answers are decoded; None, with a warning, when no row ends with
    one (accuracy is then off: there is nothing to ask)."""
    if inputs.eval_split.answered():
        return Answers.of(inputs.eval_split, inputs.tokenizer, study.eval)
    if study.objective in ACCURACY_OBJECTIVES:
        raise UsageError(
            f"objective: {study.objective} needs eval rows that end with an answer, and no row "
            f"of {study.data.eval_split!r} "
            "does; choose another objective or eval split"
        )
    progress.message(
        f"warning: eval.accuracy: no row of {study.data.eval_split!r} ends with an assistant "
        "turn, so there is no answer "
        "to decode; accuracy is off"
    )
    return None
