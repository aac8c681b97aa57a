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
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdsweep import demo, models, space, train
from kdsweep.config import ModelConfig, StudyConfig
from kdsweep.data import (
    ChatTemplate,
    Rows,
    RowError,
    TokenizedSplit,
    first_difference,
    load_split,
    make_batches,
    padding_share,
    read_rows,
    render,
    tokenize,
)
from kdsweep.errors import UsageError
from kdsweep.evaluate import EVAL_TOP_K, Answers, EvalSet, accuracy, evaluate_student, prepare_eval_set, score
from kdsweep.names import ACCURACY_OBJECTIVES, Metric, StudyAttr
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
    online_teacher: OnlineTeacher | None = None  # kept loaded when a trial may be on-policy

    def distill(
        self, params: dict, *, seed: int | None = None, batch: tuple[int, int] | None = None, on_log, on_eval, on_trained=None
    ) -> train.DistillResult:
        """One trial: a fresh student distilled with ``params`` (the declared search space), with
        the study's training seed or ``seed``, and its micro-batch and accumulation or ``batch``.
        ``on_trained(student)``, if given, sees the trained student (``save_best`` saves it)."""
        student = models.load_model("student", self.student_spec, self.device)
        fixed = self.study.train if seed is None else dataclasses.replace(self.study.train, seed=seed)
        if batch is not None:
            fixed = dataclasses.replace(fixed, batch_size=batch[0], grad_accum_steps=batch[1])
        settings = train.DistillSettings(**space.settings(params), train=fixed, group_by_length=self.study.data.group_by_length)
        result = train.distill(
            student,
            self.train_split,
            self.teacher,
            settings,
            vocab=self.vocab,
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
        """What a trial's on-policy steps need: the loaded teacher, the prompts, how to sample."""
        cfg = self.study.train
        return train.OnPolicy(
            self.online_teacher, self.train_split, temperature=cfg.generation_temperature,
            max_new_tokens=cfg.generation_max_new_tokens, pad_id=self.tokenizer.pad_token_id,
            eos_id=self.train_split.stop_id,
        )

    def evaluate(self, student: PreTrainedModel, step: int) -> dict[str, float]:
        """A trial's evaluation at ``step``: accuracy too at the last step, or at every one when
        the study asks (an accuracy objective needs it for pruning)."""
        with_accuracy = self.study.accuracy_every_eval or step == self.study.train.max_steps
        return evaluate_student(
            student, self.eval_set, self.vocab, chunk_tokens=self.study.train.loss_chunk_tokens, with_accuracy=with_accuracy
        )

    def topk_mass(self, params: dict) -> float | None:
        """Mean teacher probability (T=1) over the training tokens that the trial's top_k keeps;
        None when the teacher runs online (its full distribution is never stored)."""
        top_k = space.BY_NAME["top_k"].setting(params["top_k"])
        if not isinstance(self.teacher, CachedTeacher) or top_k is None:
            return None
        return self.teacher.mass(top_k)

    def references(self) -> dict:
        """What every trial is compared with, and what the data holds: teacher and untrained
        student perplexity (and accuracy), sizes, padding share, top-k mass. Computed once per
        study (the sweep keeps them with the Optuna study, keyed by ``names.StudyAttr``)."""
        self.progress.message("scoring the untrained student")
        student = models.load_model("student", self.student_spec, self.device)
        values = self._accuracy_references(student) if self.eval_set.answers is not None else {}
        values |= {
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

    def _accuracy_references(self, student: PreTrainedModel) -> dict[str, float]:
        """The teacher's and the untrained student's accuracy on the eval answers. A worker that
        reads the teacher cache loads the teacher's weights for this, once per study."""
        answers = self.eval_set.answers
        self.progress.message(f"decoding the teacher's answers to {len(answers.prompts)} eval rows")
        loaded = self.online_teacher or (self.teacher if isinstance(self.teacher, OnlineTeacher) else None)
        teacher = loaded.model if loaded else models.load_model("teacher", self.teacher_spec, self.device)
        scores = {"teacher": accuracy(teacher, answers), "untrained": accuracy(student, answers)}
        del teacher
        release_memory(self.device)
        return {
            StudyAttr.ACCURACY_ROWS: len(answers.prompts),
            StudyAttr.TEACHER_EXACT_MATCH: scores["teacher"][Metric.EXACT_MATCH],
            StudyAttr.TEACHER_ROUGE_L: scores["teacher"][Metric.ROUGE_L],
            StudyAttr.UNTRAINED_EXACT_MATCH: scores["untrained"][Metric.EXACT_MATCH],
            StudyAttr.UNTRAINED_ROUGE_L: scores["untrained"][Metric.ROUGE_L],
        }

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
    if study.train.threads:
        torch.set_num_threads(study.train.threads)
    inputs = _read_inputs(study, progress)
    eval_batches = make_batches(
        inputs.eval_split,
        batch_size=study.train.eval_batch_size,
        pad_id=inputs.tokenizer.pad_token_id,
        shuffle_seed=None,
        group_by_length=True,
    )
    if cached_top_ks(study):
        train_cache, eval_cache, loaded = _teacher_caches(study, inputs, progress, keep=on_policy_possible(study))
        teacher = train_cache
        eval_set = _cached_eval_set(eval_cache, eval_batches, inputs.device)
    else:
        progress.message(f"loading the teacher {study.teacher.name}")
        teacher = loaded = OnlineTeacher(models.load_model("teacher", inputs.teacher, inputs.device), inputs.vocab)
        progress.message("scoring the teacher on the eval tokens")
        eval_set = prepare_eval_set(teacher, eval_batches, chunk_tokens=study.train.loss_chunk_tokens)
    if study.eval.accuracy:
        eval_set = dataclasses.replace(eval_set, answers=_answers(study, inputs, progress))
    return Workspace(
        study, inputs.teacher, inputs.student, inputs.device, inputs.tokenizer, inputs.vocab, inputs.train_split,
        eval_set, teacher, progress, online_teacher=_online_teacher(study, inputs, loaded, progress),
    )


def _answers(study: StudyConfig, inputs: _Inputs, progress: SweepProgress) -> Answers | None:
    """The eval rows whose final answers are decoded; None, with a warning, when no row ends with
    one (accuracy is then off: there is nothing to ask)."""
    if inputs.eval_split.answered():
        return Answers.of(inputs.eval_split, inputs.tokenizer, study.eval)
    if study.objective in ACCURACY_OBJECTIVES:
        raise UsageError(
            f"objective: {study.objective} needs eval rows that end with an answer, and no row of {study.data.eval_split!r} "
            "does; choose another objective or eval split"
        )
    progress.message(
        f"warning: eval.accuracy: no row of {study.data.eval_split!r} ends with an assistant turn, so there is no answer "
        "to decode; accuracy is off"
    )
    return None


def on_policy_possible(study: StudyConfig) -> bool:
    """Whether any trial may take on-policy steps (search.lmbda above 0 somewhere)."""
    return space.may_be_positive(study.search, study.baselines, "lmbda")


def _online_teacher(study: StudyConfig, inputs: _Inputs, loaded: OnlineTeacher | None, progress: SweepProgress) -> OnlineTeacher | None:
    """The teacher's weights, kept loaded beside its cache only when a trial may be on-policy:
    generated tokens are new, the cache cannot hold them. Other studies never load them again.
    ``loaded``: the teacher this worker already loaded, if any."""
    if not on_policy_possible(study):
        return None
    if loaded is not None:
        return loaded
    progress.message(f"loading the teacher {study.teacher.name} to score on-policy completions")
    return OnlineTeacher(models.load_model("teacher", inputs.teacher, inputs.device), inputs.vocab)


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
        train_cache, _, _ = _teacher_caches(study, _read_inputs(study, progress), progress, keep=False)
    finally:
        progress.close()
    return train_cache.folder


def check_inputs(study: StudyConfig) -> None:
    """Read and check what a trial needs, loading no weights: the models' tokenizer and
    vocabularies, the data splits (the demo's models are built on first use)."""
    progress = SweepProgress()
    try:
        _read_inputs(study, progress)
    finally:
        progress.close()


def cached_top_ks(study: StudyConfig) -> list[int]:
    """The top_k values trials may use when they all read the teacher cache, else []."""
    return space.finite_top_ks(study.search, study.baselines) if study.train.teacher_cache else []


def locate(spec: ModelConfig, study: StudyConfig) -> ModelConfig:
    """``spec`` named by where it loads from: the demo's models are built on first use, a
    relative folder is read from the study file's folder. A local folder is named by its
    absolute path, which no library mistakes for a hub id (MLflow looks hub ids up for their
    model card when it saves a model)."""
    if spec.name.startswith(demo.PREFIX):
        return dataclasses.replace(spec, name=demo.location(spec.name))
    return dataclasses.replace(spec, name=study.resolve_path(spec.name))


@dataclass(frozen=True)
class _Inputs:
    """What preparing reads before any model weights load."""

    teacher: ModelConfig  # located
    student: ModelConfig
    device: torch.device
    tokenizer: PreTrainedTokenizerBase  # the student's: it renders and tokenizes the data
    vocab: models.Vocabulary
    train_split: TokenizedSplit
    eval_split: TokenizedSplit


AGREEMENT_ROWS = 64  # rows of each split that teacher and student must render and tokenize alike


def _read_inputs(study: StudyConfig, progress: SweepProgress) -> _Inputs:
    device = models.resolve_device(study.train.device)
    teacher, student = locate(study.teacher, study), locate(study.student, study)
    progress.message(f"loading tokenizer and data for {study.name!r} on {device}")
    tokenizer = models.load_tokenizer("student", student)
    teacher_tokenizer = models.load_tokenizer("teacher", teacher)
    models.check_same_vocabulary(tokenizer, teacher_tokenizer)
    vocab = models.check_vocabularies(teacher, student, tokenizer)
    _check_top_k(study, vocab)
    data = study.data
    rows = {split: _read_rows(study, split, progress) for split in dict.fromkeys((data.train_split, data.eval_split))}
    chat = _chat_template(study, rows, tokenizer)
    _check_teacher_tokens(study, rows, tokenizer, teacher_tokenizer, chat)
    # The train rows' prompts are read by on-policy steps only; the eval rows' by accuracy.
    train_split = _tokenized(study, rows[data.train_split], tokenizer, chat, progress, with_prompts=on_policy_possible(study))
    eval_split = _tokenized(study, rows[data.eval_split], tokenizer, chat, progress, with_prompts=study.eval.accuracy)
    return _Inputs(teacher, student, device, tokenizer, vocab, train_split, eval_split)


def _read_rows(study: StudyConfig, split: str, progress: SweepProgress) -> Rows:
    rows = read_rows(load_split(study.data, split, base_dir=study.base_dir), study.data, split=split)
    if rows.skipped:
        progress.message(f"data: left out {rows.skipped} conversations of {split!r} that have no assistant turn")
    return rows


def _chat_template(study: StudyConfig, rows: dict[str, Rows], tokenizer) -> ChatTemplate | None:
    """The template conversations are rendered with (None for text rows). The splits must share a
    format. A study's own template goes with the student's tokenizer, so a saved student has it."""
    formats = {split: r.format for split, r in rows.items()}
    if len(set(formats.values())) > 1:
        shown = ", ".join(f"{split!r} as {fmt}" for split, fmt in formats.items())
        raise UsageError(f"data.format: the splits read as different formats ({shown}); give them the same columns, or set data.format")
    if not next(iter(rows.values())).conversational:
        return None
    chat = ChatTemplate.of(tokenizer, study.data, base_dir=study.base_dir)
    if study.data.chat_template:
        tokenizer.chat_template = chat.template
    return chat


def _check_teacher_tokens(study: StudyConfig, rows: dict[str, Rows], tokenizer, teacher_tokenizer, chat: ChatTemplate | None) -> None:
    """Teacher and student must see the same tokens: render and tokenize the first rows of each
    split with both (each with its own chat template, unless the study gives one) and compare."""
    teacher_chat = None
    if chat is not None:
        own = None if study.data.chat_template else teacher_tokenizer.chat_template
        teacher_chat = ChatTemplate(teacher_tokenizer, own or chat.template, study.data.chat_template_kwargs)
    special = chat is None  # a chat template writes its own special tokens
    for split, split_rows in rows.items():
        sample = split_rows.rows[:AGREEMENT_ROWS]
        try:
            texts = [[r.text for r in render(sample, t, chat=c)] for t, c in ((tokenizer, chat), (teacher_tokenizer, teacher_chat))]
        except RowError as exc:
            raise split_rows.error(exc) from None
        ours, theirs = (t(x, add_special_tokens=special)["input_ids"] for t, x in zip((tokenizer, teacher_tokenizer), texts))
        for row, (a, b) in enumerate(zip(ours, theirs)):
            if (position := first_difference(a, b)) is not None:
                student_has, teacher_has = _token_at(tokenizer, a, position), _token_at(teacher_tokenizer, b, position)
                raise split_rows.error(RowError(
                    row, "tokens",
                    f"teacher and student tokenize it differently from token {position} on (the student has {student_has}, "
                    f"the teacher {teacher_has}); distill between models that share one tokenizer and chat template, "
                    "or set data.chat_template to render for both",
                ))


def _token_at(tokenizer, ids: list[int], position: int) -> str:
    if position >= len(ids):
        return "nothing: its tokens end there"
    return f"{tokenizer.decode([ids[position]])!r} (id {ids[position]})"


def _check_top_k(study: StudyConfig, vocab: models.Vocabulary) -> None:
    """A top_k above the vocabulary keeps nothing more than the whole of it: a typo, or the
    wrong models. Known only once the vocabulary is read, so not a study-file check."""
    where = [("search.top_k", k) for k in study.search.top_k.values]
    where += [(f"baselines[{i}].top_k", b["top_k"]) for i, b in enumerate(study.baselines) if "top_k" in b]
    for key, k in where:
        if k != space.WHOLE_VOCAB and k > vocab.size:
            raise UsageError(
                f"{key}: {k} is above the vocabulary size ({vocab.size:,} tokens); use values up to {vocab.size:,}, "
                f"or {space.WHOLE_VOCAB!r} for the whole vocabulary"
            )


def _tokenized(
    study: StudyConfig, rows: Rows, tokenizer, chat: ChatTemplate | None, progress: SweepProgress, *, with_prompts: bool
) -> TokenizedSplit:
    data = study.data
    try:
        tokens = tokenize(
            rows.rows, tokenizer, max_length=data.max_length, assistant_only=data.assistant_only, chat=chat, with_prompts=with_prompts
        )
    except RowError as exc:
        raise rows.error(exc) from None
    split = rows.place.split
    if len(tokens) == 0:
        raise UsageError(
            f"{rows.place.key}: no row of {split!r} of {data.dataset} has a scored token within data.max_length "
            f"({data.max_length}); check data.format, data.assistant_only and data.max_length"
        )
    if tokens.dropped:
        progress.message(f"data: {tokens.dropped} rows of {split!r} have no scored token within data.max_length and are left out")
    return tokens


# ---------------------------------------------------------------- the teacher caches


def _teacher_caches(
    study: StudyConfig, inputs: _Inputs, progress: SweepProgress, *, keep: bool
) -> tuple[CachedTeacher, CachedTeacher, OnlineTeacher | None]:
    """The training tokens' top-K cache (K = the largest top_k), the eval tokens' cache, and the
    teacher if it was loaded to build them and ``keep`` says so (else its memory is freed)."""
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
        if not keep:
            teacher.release()
    return caches[0], caches[1], teacher.teacher


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
        "format": data.format,
        "text_field": data.text_field,
        "assistant_only": data.assistant_only,
        "max_length": data.max_length,
    }


class _TeacherOnDemand:
    """Loads the teacher the first time a cache must be built; freed afterwards unless on-policy
    trials need it: others, reading the cache, never need its weights (on a GPU, the 4B teacher's
    8 GB)."""

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
        if self.teacher is not None:
            self.teacher = None
            release_memory(self.inputs.device)


def _cached_eval_set(cache: CachedTeacher, batches, device: torch.device) -> EvalSet:
    """The eval set as ``evaluate.prepare_eval_set`` makes it, from the cache instead of the teacher."""
    targets = [cache.targets(batch.to(device), top_k=EVAL_TOP_K) for batch in batches]
    return EvalSet(batches=batches, teacher_targets=targets, teacher_ppl=cache.perplexity(), num_tokens=cache.rows)


def release_memory(device: torch.device) -> None:
    """Give freed tensors' memory back: models just dropped would otherwise stay in the CUDA
    allocator's cache, out of reach of the next trial."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
