"""What a study's trials share, prepared once per worker: tokenizer, data, teacher, eval set.

Preparing reads and checks every input (models, vocabularies, data) before the sweep writes
anything, so a missing model or dataset stops the run with one line and nothing half-written.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from transformers import PreTrainedTokenizerBase

from kdsweep import models, train
from kdsweep.config import StudyConfig
from kdsweep.data import TokenizedSplit, load_texts, make_batches, padding_share, tokenize
from kdsweep.errors import UsageError
from kdsweep.evaluate import EvalSet, evaluate_student, prepare_eval_set, score
from kdsweep.progress import SweepProgress
from kdsweep.sweep import top_k_of
from kdsweep.teacher import OnlineTeacher
from kdsweep.tracking import StudyTracker


@dataclass
class Workspace:
    study: StudyConfig
    device: torch.device
    tokenizer: PreTrainedTokenizerBase
    vocab: models.Vocabulary
    train_split: TokenizedSplit
    eval_set: EvalSet
    teacher: OnlineTeacher
    progress: SweepProgress

    def distill(self, params: dict, *, on_log, on_eval) -> train.DistillResult:
        """One trial: a fresh student distilled with ``params`` (alpha, temperature, top_k, lr)."""
        student = models.load_model("student", self.study, self.device)
        settings = train.DistillSettings(
            alpha=float(params["alpha"]),
            temperature=float(params["temperature"]),
            top_k=top_k_of(params),
            learning_rate=float(params["learning_rate"]),
            train=self.study.train,
            group_by_length=self.study.data.group_by_length,
        )
        return train.distill(
            student,
            self.train_split,
            self.teacher,
            settings,
            vocab=self.vocab,
            pad_id=self.tokenizer.pad_token_id,
            evaluate=partial(
                evaluate_student, eval_set=self.eval_set, vocab=self.vocab, chunk_tokens=self.study.train.loss_chunk_tokens
            ),
            on_log=on_log,
            on_eval=on_eval,
        )

    def references(self, optuna_study) -> dict[str, float]:
        """Teacher and untrained-student perplexity: computed once per study, kept with it."""
        attrs = optuna_study.user_attrs
        if "student_ppl_untrained" not in attrs:
            self.progress.message("scoring the untrained student")
            student = models.load_model("student", self.study, self.device)
            untrained = score(student, self.eval_set.batches, self.vocab).perplexity
            values = {
                "teacher_ppl": self.eval_set.teacher_ppl,
                "student_ppl_untrained": untrained,
                "train_rows": len(self.train_split),
                "eval_rows": sum(len(b.example_ids) for b in self.eval_set.batches),
                "train_scored_tokens": self.train_split.num_scored_tokens,
                "eval_scored_tokens": self.eval_set.num_tokens,
                "train_padding_share": padding_share(self._train_batches()),
                "vocab_size": self.vocab.size,
                "vocab_padded": self.vocab.padded,
            }
            for key, value in values.items():
                optuna_study.set_user_attr(key, value)
            optuna_study.set_user_attr("config", self.study.to_dict())
            optuna_study.set_user_attr("fingerprint", self.study.fingerprint())
        return {k: float(optuna_study.user_attrs[k]) for k in ("teacher_ppl", "student_ppl_untrained")}

    def attach_tracking(self, optuna_study) -> StudyTracker:
        tracker = StudyTracker(self.study)
        tracker.attach(optuna_study, references=self.references(optuna_study))
        return tracker

    def _train_batches(self):
        return make_batches(
            self.train_split,
            batch_size=self.study.train.batch_size,
            pad_id=self.tokenizer.pad_token_id,
            shuffle_seed=self.study.train.seed,
            group_by_length=self.study.data.group_by_length,
        )


def prepare(study: StudyConfig, *, progress: SweepProgress) -> Workspace:
    device = models.resolve_device(study.train.device)
    progress.message(f"loading tokenizer and data for {study.name!r} on {device}")
    tokenizer = models.load_tokenizer(study)
    vocab = models.check_vocabularies(study, tokenizer)
    train_split = _tokenized(study, study.data.train_split, tokenizer)
    eval_split = _tokenized(study, study.data.eval_split, tokenizer)
    progress.message(f"loading the teacher {study.teacher.name}")
    teacher = OnlineTeacher(models.load_model("teacher", study, device), vocab)
    eval_batches = make_batches(
        eval_split,
        batch_size=study.train.eval_batch_size,
        pad_id=tokenizer.pad_token_id,
        shuffle_seed=None,
        group_by_length=True,
    )
    progress.message("scoring the teacher on the eval tokens")
    eval_set = prepare_eval_set(teacher, eval_batches, chunk_tokens=study.train.loss_chunk_tokens)
    return Workspace(study, device, tokenizer, vocab, train_split, eval_set, teacher, progress)


def _tokenized(study: StudyConfig, split: str, tokenizer) -> TokenizedSplit:
    texts = load_texts(study.data, split, base_dir=study.base_dir)
    tokens = tokenize(texts, tokenizer, max_length=study.data.max_length, assistant_only=study.data.assistant_only)
    if len(tokens) == 0:
        raise UsageError(
            f"data split {split!r} of {study.data.dataset} has no row with a scored token; "
            "check data.text_field and data.assistant_only"
        )
    return tokens
