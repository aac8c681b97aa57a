"""What a study's trials share, prepared once per worker: tokenizer, data, teacher, eval set.

Preparing reads and checks every input (models, vocabularies, data) before the sweep writes
anything, so a missing model or dataset stops the run with one line and nothing half-written.

When every trial keeps only the teacher's top-k (``space.finite_top_ks``), the teacher runs once
per study: its top-K logits on the training tokens, and its top tokens and NLL on the eval tokens,
go to an on-disk cache (``teacher.py``) that every trial and every worker reads. A worker that
finds the caches never loads the teacher's weights. Otherwise the teacher is loaded once per
worker and runs online in every trial.
"""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from kdsweep import demo, models, space, train
from kdsweep.config import ModelConfig, StudyConfig
from kdsweep.data import TokenizedSplit, load_texts, make_batches, padding_share, tokenize
from kdsweep.errors import UsageError
from kdsweep.evaluate import EVAL_TOP_K, EvalSet, evaluate_student, prepare_eval_set, score
from kdsweep.names import StudyAttr
from kdsweep.paths import teacher_cache_dir
from kdsweep.progress import SweepProgress
from kdsweep.teacher import (
    CachedTeacher,
    CacheKey,
    OnlineTeacher,
    model_digest,
    open_or_build,
    split_digest,
    vocab_digest,
    write_cache,
)


@dataclass
class Workspace:
    study: StudyConfig
    teacher_spec: ModelConfig  # the study's models, named by where they load from
    student_spec: ModelConfig
    device: torch.device
    tokenizer: PreTrainedTokenizerBase
    vocab: models.Vocabulary
    train_split: TokenizedSplit
    eval_set: EvalSet
    teacher: OnlineTeacher | CachedTeacher
    progress: SweepProgress

    def distill(self, params: dict, *, on_log, on_eval, on_trained=None) -> train.DistillResult:
        """One trial: a fresh student distilled with ``params`` (alpha, temperature, top_k, lr).
        ``on_trained(student)``, if given, sees the trained student (``save_best`` saves it)."""
        student = models.load_model("student", self.student_spec, self.device)
        settings = train.DistillSettings(
            **space.settings(params), train=self.study.train, group_by_length=self.study.data.group_by_length
        )
        result = train.distill(
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
        if on_trained is not None:
            on_trained(student)
        return result

    def topk_mass(self, params: dict) -> float | None:
        """Mean teacher probability (T=1) over the training tokens that the trial's top_k keeps;
        None when the teacher runs online (its full distribution is never stored)."""
        top_k = space.BY_NAME["top_k"].setting(params["top_k"])
        if not isinstance(self.teacher, CachedTeacher) or top_k is None:
            return None
        return self.teacher.mass(top_k)

    def references(self) -> dict:
        """What every trial is compared with, and what the data holds: teacher and untrained
        student perplexity, sizes, padding share, top-k mass. Computed once per study (the sweep
        keeps them with the Optuna study, keyed by ``names.StudyAttr``)."""
        self.progress.message("scoring the untrained student")
        student = models.load_model("student", self.student_spec, self.device)
        values = {
            StudyAttr.TEACHER_PPL: self.eval_set.teacher_ppl,
            StudyAttr.UNTRAINED_PPL: score(student, self.eval_set.batches, self.vocab).perplexity,
            StudyAttr.TRAIN_ROWS: len(self.train_split),
            StudyAttr.EVAL_ROWS: sum(len(b.example_ids) for b in self.eval_set.batches),
            StudyAttr.TRAIN_SCORED_TOKENS: self.train_split.num_scored_tokens,
            StudyAttr.EVAL_SCORED_TOKENS: self.eval_set.num_tokens,
            StudyAttr.TRAIN_PADDING_SHARE: padding_share(self._train_batches()),
            StudyAttr.VOCAB_SIZE: self.vocab.size,
            StudyAttr.VOCAB_PADDED: self.vocab.padded,
        }
        if isinstance(self.teacher, CachedTeacher):
            # JSON keys are strings: {"20": 0.93, "50": 0.97}
            values[StudyAttr.TOPK_MASS] = {str(k): self.teacher.mass(k) for k in cached_top_ks(self.study)}
        return values

    def _train_batches(self):
        return make_batches(
            self.train_split,
            batch_size=self.study.train.batch_size,
            pad_id=self.tokenizer.pad_token_id,
            shuffle_seed=self.study.train.seed,
            group_by_length=self.study.data.group_by_length,
        )


def prepare(study: StudyConfig, *, progress: SweepProgress) -> Workspace:
    """Read and check every input, then make the teacher signal: its cache (built once per
    study) or the teacher itself, loaded once per worker."""
    inputs = _read_inputs(study, progress)
    eval_batches = make_batches(
        inputs.eval_split,
        batch_size=study.train.eval_batch_size,
        pad_id=inputs.tokenizer.pad_token_id,
        shuffle_seed=None,
        group_by_length=True,
    )
    if cached_top_ks(study):
        train_cache, eval_cache = _teacher_caches(study, inputs, progress)
        teacher = train_cache
        eval_set = _cached_eval_set(eval_cache, eval_batches, inputs.device)
    else:
        progress.message(f"loading the teacher {study.teacher.name}")
        teacher = OnlineTeacher(models.load_model("teacher", inputs.teacher, inputs.device), inputs.vocab)
        progress.message("scoring the teacher on the eval tokens")
        eval_set = prepare_eval_set(teacher, eval_batches, chunk_tokens=study.train.loss_chunk_tokens)
    return Workspace(
        study, inputs.teacher, inputs.student, inputs.device, inputs.tokenizer, inputs.vocab, inputs.train_split,
        eval_set, teacher, progress,
    )


def build_cache(study: StudyConfig) -> Path:
    """Build the teacher's top-K caches ahead of a many-worker launch (``kdsweep cache``);
    returns the training tokens' cache folder. Nothing is built twice."""
    if not cached_top_ks(study):
        reason = (
            "train.teacher_cache is false"
            if not study.train.teacher_cache
            else "search.top_k (or a baseline) uses 'all', the teacher's whole vocabulary, which the cache does not hold"
        )
        raise UsageError(f"no teacher cache to build: {reason}; every top_k must be a number for the teacher to run once")
    progress = SweepProgress()
    try:
        train_cache, _ = _teacher_caches(study, _read_inputs(study, progress), progress)
    finally:
        progress.close()
    return train_cache.folder


def cached_top_ks(study: StudyConfig) -> list[int]:
    """The top_k values trials may use when they all read the teacher cache, else []."""
    return space.finite_top_ks(study.search, study.baselines) if study.train.teacher_cache else []


def locate(spec: ModelConfig, study: StudyConfig) -> ModelConfig:
    """``spec`` named by where it loads from: the demo's models are built on first use, a
    relative folder is read from the study file's folder."""
    if spec.name.startswith(demo.PREFIX):
        return dataclasses.replace(spec, name=demo.location(spec.name))
    return dataclasses.replace(spec, name=study.resolve_path(spec.name))


@dataclass(frozen=True)
class _Inputs:
    """What preparing reads before any model weights load."""

    teacher: ModelConfig  # located
    student: ModelConfig
    device: torch.device
    tokenizer: PreTrainedTokenizerBase
    vocab: models.Vocabulary
    train_split: TokenizedSplit
    eval_split: TokenizedSplit


def _read_inputs(study: StudyConfig, progress: SweepProgress) -> _Inputs:
    device = models.resolve_device(study.train.device)
    teacher, student = locate(study.teacher, study), locate(study.student, study)
    progress.message(f"loading tokenizer and data for {study.name!r} on {device}")
    tokenizer = models.load_tokenizer(teacher)
    vocab = models.check_vocabularies(teacher, student, tokenizer)
    train_split = _tokenized(study, study.data.train_split, tokenizer)
    eval_split = _tokenized(study, study.data.eval_split, tokenizer)
    return _Inputs(teacher, student, device, tokenizer, vocab, train_split, eval_split)


def _tokenized(study: StudyConfig, split: str, tokenizer) -> TokenizedSplit:
    texts = load_texts(study.data, split, base_dir=study.base_dir)
    tokens = tokenize(texts, tokenizer, max_length=study.data.max_length, assistant_only=study.data.assistant_only)
    if len(tokens) == 0:
        raise UsageError(
            f"data split {split!r} of {study.data.dataset} has no row with a scored token; "
            "check data.text_field and data.assistant_only"
        )
    return tokens


# ---------------------------------------------------------------- the teacher caches


def _teacher_caches(study: StudyConfig, inputs: _Inputs, progress: SweepProgress) -> tuple[CachedTeacher, CachedTeacher]:
    """The training tokens' top-K cache (K = the largest top_k) and the eval tokens' cache."""
    teacher = _TeacherOnDemand(study, inputs, progress)
    identity = _teacher_identity(study, inputs)
    try:
        caches = []
        for split_name, split, k in (
            (study.data.train_split, inputs.train_split, max(cached_top_ks(study))),
            (study.data.eval_split, inputs.eval_split, EVAL_TOP_K),
        ):
            key = CacheKey(
                teacher=identity,
                tokenizer=vocab_digest(inputs.tokenizer),
                data=_data_selection(study, split_name),
                tokens=split_digest(split),
            )
            k = min(k, inputs.vocab.size)
            write = partial(_write, teacher, split, k=k, study=study, pad_id=inputs.tokenizer.pad_token_id)
            cache, built = open_or_build(teacher_cache_dir(), key, k=k, write=write)
            verb = "built" if built else "reusing"
            progress.message(f"teacher top-{cache.k} cache of {split_name!r}: {verb} {cache.folder} ({cache.rows:,} tokens)")
            caches.append(cache)
    finally:
        teacher.release()
    return caches[0], caches[1]


def _write(teacher: _TeacherOnDemand, split: TokenizedSplit, folder: Path, *, k: int, study: StudyConfig, pad_id: int) -> dict:
    train_cfg = study.train
    return write_cache(
        teacher(), split, folder, k=k, batch_size=train_cfg.eval_batch_size, pad_id=pad_id, chunk_tokens=train_cfg.loss_chunk_tokens
    )


def _teacher_identity(study: StudyConfig, inputs: _Inputs) -> dict:
    spec = inputs.teacher
    dtype = models.resolve_dtype(spec.dtype, inputs.device, frozen=True)
    return {"name": study.teacher.name, "revision": spec.revision, "dtype": str(dtype), **model_digest(spec.name, spec.revision)}


def _data_selection(study: StudyConfig, split_name: str) -> dict:
    data = study.data
    return {
        "dataset": data.dataset,
        "split": split_name,
        "text_field": data.text_field,
        "assistant_only": data.assistant_only,
        "max_length": data.max_length,
    }


class _TeacherOnDemand:
    """Loads the teacher the first time a cache must be built, and frees it afterwards: trials
    reading the cache never need its weights (on a GPU, the 4B teacher's 8 GB)."""

    def __init__(self, study: StudyConfig, inputs: _Inputs, progress: SweepProgress):
        self.study, self.inputs, self.progress = study, inputs, progress
        self.teacher: OnlineTeacher | None = None

    def __call__(self) -> OnlineTeacher:
        if self.teacher is None:
            self.progress.message(f"loading the teacher {self.study.teacher.name} to build its top-K cache")
            model = models.load_model("teacher", self.inputs.teacher, self.inputs.device)
            self.teacher = OnlineTeacher(model, self.inputs.vocab)
        return self.teacher

    def release(self) -> None:
        if self.teacher is None:
            return
        self.teacher = None
        gc.collect()
        if self.inputs.device.type == "cuda":
            torch.cuda.empty_cache()


def _cached_eval_set(cache: CachedTeacher, batches, device: torch.device) -> EvalSet:
    """The eval set as ``evaluate.prepare_eval_set`` makes it, from the cache instead of the teacher."""
    targets = [cache.targets(batch.to(device), top_k=EVAL_TOP_K) for batch in batches]
    return EvalSet(batches=batches, teacher_targets=targets, teacher_ppl=cache.perplexity(), num_tokens=cache.rows)
