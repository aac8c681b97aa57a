"""The study's teacher behind one object: the teacher's targets for a batch, wherever they come
from.

When every trial keeps only the teacher's top-k (``StudyConfig.cached_top_ks``), the teacher runs
once per study: its top-K logits on the training tokens, and its top tokens and NLL on the eval
tokens, go to an on-disk cache (``teacher_cache``) that every trial and every worker reads. A
worker that finds the caches never loads the teacher's weights. Otherwise the teacher is loaded
once per worker and runs online in every trial.

Either way a trial sees one :class:`StudyTeacher` and asks it ``targets(batch, top_k=...)``. Its
weights are loaded on demand and kept only while something needs them: the online signal,
on-policy steps (generated tokens are in no cache), the teacher's accuracy (``references``).
"""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path

from kdsweep.data import Batch, TokenizedSplit, rows_read
from kdsweep.distill import models
from kdsweep.distill.evaluate import EVAL_TOP_K, EvalSet, prepare_eval_set
from kdsweep.distill.targets import OnlineTeacher, TeacherTargets
from kdsweep.errors import UsageError
from kdsweep.paths import store_identity, teacher_cache_dir
from kdsweep.prepare.inputs import Inputs, read_inputs
from kdsweep.prepare.teacher_cache import (
    CachedTeacher,
    CacheKey,
    model_digest,
    open_or_build,
    rows_digest,
    split_digest,
    vocab_digest,
    write_cache,
)
from kdsweep.progress import SweepProgress
from kdsweep.study.config import StudyConfig
from kdsweep.study.space import BY_NAME


class StudyTeacher:
    """The teacher of one study, as its trials use it (a ``distill.targets.TeacherSignal``)."""

    def __init__(self, *, study: StudyConfig, inputs: Inputs, progress: SweepProgress):
        self.study = study
        self.inputs = inputs
        self.progress = progress
        self._online: OnlineTeacher | None = None  # the weights, while something needs them
        self._train_cache: CachedTeacher | None = None
        self._eval_cache: CachedTeacher | None = None
        self.built_seconds = 0.0  # spent building caches in this process

    @classmethod
    def prepare(
        cls, *, study: StudyConfig, inputs: Inputs, progress: SweepProgress
    ) -> StudyTeacher:
        """The study's teacher, ready for its trials: its caches found or built (the weights then
        freed, unless on-policy trials need them), or its weights loaded to run online."""
        teacher = cls(study=study, inputs=inputs, progress=progress)
        if study.cached_top_ks:
            teacher._open_caches()
            teacher.release()
        else:
            teacher.online()
        return teacher

    @property
    def cached(self) -> bool:
        return self._train_cache is not None

    @property
    def train_cache(self) -> CachedTeacher | None:
        """The training tokens' cache, when the teacher runs from one."""
        return self._train_cache

    @property
    def owner(self) -> str:
        """The study, as a cache's manifest names the study it was built for."""
        store = hashlib.sha256(store_identity(self.study.storage_url).encode()).hexdigest()
        return f"{self.study.name} ({store[:8]})"

    @property
    def cache_seconds(self) -> float:
        """What building the study's caches took, by whichever of its workers (0: no cache, or
        caches another study built: reusing them costs this one nothing)."""
        caches = (self._train_cache, self._eval_cache)
        return sum(
            c.manifest.get("build_seconds", 0.0)
            for c in caches
            if c is not None and c.manifest.get("built_for") == self.owner
        )

    @property
    def reused_from(self) -> list[str]:
        """The other studies whose caches this one reads (built for them, reused here)."""
        caches = (self._train_cache, self._eval_cache)
        owners = {c.manifest.get("built_for") for c in caches if c is not None}
        return sorted(owner for owner in owners - {self.owner} if owner)

    @property
    def tokens_processed(self) -> int:
        """Real tokens the teacher's weights have run on in this process (0 reading a cache)."""
        return self._online.tokens_processed if self._online is not None else 0

    def targets(self, batch: Batch, *, top_k: int | None) -> TeacherTargets:
        """The teacher's logits (top_k None: all of them) at the batch's scored positions."""
        source = self._train_cache if self._train_cache is not None else self.online()
        return source.targets(batch, top_k=top_k)

    def online(self, why: str = "") -> OnlineTeacher:
        """The teacher run online: its weights, loaded on first use and kept until released."""
        if self._online is None:
            self.progress.message(
                f"loading the teacher {self.study.teacher.name}{f' to {why}' if why else ''}"
            )
            model = models.load_model(
                "teacher",
                self.inputs.teacher,
                self.inputs.device,
                attention=self.study.train.attn_implementation,
            )
            self._online = OnlineTeacher(model, self.inputs.vocab)
        return self._online

    def release(self) -> None:
        """Free the teacher's weights unless trials need them: the online signal, or on-policy
        steps. A cache reader's trials never need them (on a GPU, the 4B teacher's 8 GB)."""
        if self._online is not None and self.cached and not self.study.on_policy_possible:
            self._online = None
            models.release_memory(self.inputs.device)

    def eval_set(self, batches: list[Batch]) -> EvalSet:
        """The eval batches with the teacher's top tokens and perplexity on them, for every
        trial."""
        if self._eval_cache is not None:
            device = self.inputs.device
            targets = [
                self._eval_cache.targets(batch.to(device), top_k=EVAL_TOP_K) for batch in batches
            ]
            return EvalSet(
                batches=batches,
                teacher_targets=targets,
                teacher_ppl=self._eval_cache.perplexity(),
                num_tokens=self._eval_cache.rows,
            )
        teacher = self.online()
        rows = sum(len(batch.example_ids) for batch in batches)
        with self.progress.phase("scoring the teacher on the validation split", rows) as phase:
            return prepare_eval_set(
                teacher,
                batches,
                chunk_tokens=self.study.train.loss_chunk_tokens,
                on_rows=phase.advance,
            )

    def mass(self, top_k_choice) -> float | None:
        """Mean teacher probability (T=1) over the training tokens that a trial's top_k keeps;
        None when the teacher runs online (its full distribution is never stored)."""
        top_k = BY_NAME["top_k"].setting(top_k_choice)
        if self._train_cache is None or top_k is None:
            return None
        return self._train_cache.mass(top_k)

    def masses(self) -> dict[str, float]:
        """Each cached top_k's mass, by top_k as text (JSON keys); {} when the teacher runs
        online."""
        if self._train_cache is None:
            return {}
        return {str(k): self._train_cache.mass(k) for k in self.study.cached_top_ks}

    # -------------------------------------------------------------- the caches

    def _open_caches(self) -> None:
        """The training tokens' top-K cache (K = the largest top_k) and the eval tokens' (K =
        EVAL_TOP_K), each found or, once for all workers, built with the teacher's weights."""
        data, inputs = self.study.data, self.inputs
        read = rows_trials_read(self.study, inputs.train_split)
        self._train_cache = self._cache(
            data.train_split, inputs.train_split, k=max(self.study.cached_top_ks), rows=read
        )
        self._eval_cache = self._cache(data.eval_split, inputs.eval_split, k=EVAL_TOP_K)

    def _cache(
        self, name: str, split: TokenizedSplit, *, k: int, rows: list[int] | None = None
    ) -> CachedTeacher:
        inputs = self.inputs
        key = CacheKey(
            teacher=self._identity(),
            tokenizer=vocab_digest(inputs.tokenizer),
            data=self._selection(name),
            tokens=split_digest(split),
            rows="all" if rows is None else rows_digest(rows),
        )
        k = min(k, inputs.vocab.size)
        write = partial(self._write, name, split, k=k, rows=rows)
        cache, built = open_or_build(teacher_cache_dir(), key, k=k, write=write)
        if built:
            self.built_seconds += cache.manifest.get("build_seconds", 0.0)
        covered = cache.manifest.get("covered_examples", len(split))
        which = (
            f"the {covered:,} of {len(split):,} rows the trials read"
            if covered < len(split)
            else f"all {len(split):,} rows: the trials read every one"
        )
        self.progress.message(
            f"teacher top-{cache.k} cache of {name!r}: {'built' if built else 'reusing'} "
            f"{cache.folder} ({cache.rows:,} tokens; {which})"
        )
        return cache

    def _write(
        self, name: str, split: TokenizedSplit, folder: Path, *, k: int, rows: list[int] | None
    ) -> dict:
        train = self.study.train
        teacher = self.online("build its top-K cache")
        total = len(split) if rows is None else len(rows)
        with self.progress.phase(f"teacher cache of {name!r}", total) as phase:
            facts = write_cache(
                teacher,
                split,
                folder,
                k=k,
                rows=rows,
                batch_size=train.eval_batch_size,
                pad_id=self.inputs.tokenizer.pad_token_id,
                chunk_tokens=train.loss_chunk_tokens,
                on_rows=phase.advance,
            )
        return facts | {"built_for": self.owner}

    def _identity(self) -> dict:
        spec = self.inputs.teacher
        dtype = models.resolve_dtype(spec.dtype, self.inputs.device, frozen=True)
        return {
            "name": self.study.teacher.name,
            "revision": spec.revision,
            "dtype": str(dtype),
            **model_digest(spec.name, spec.revision),
        }

    def _selection(self, split: str) -> dict:
        data = self.study.data
        return {
            "dataset": data.dataset,
            "split": split,
            "format": data.format,
            "text_field": data.text_field,
            "assistant_only": data.assistant_only,
            "max_length": data.max_length,
        }


def rows_trials_read(study: StudyConfig, split: TokenizedSplit) -> list[int] | None:
    """The training rows the study's trials can read, by their stream's order
    (``data.training_order``): ``max_steps`` x ``grad_accum_steps`` micro-batches from each seed
    a trial trains with (the study's; the seed check's), at the study's micro-batch and at every
    smaller one an out-of-memory retry may take. None when that is every row."""
    train = study.train
    seeds = {train.seed}
    if study.seed_check.top:
        seeds |= {train.seed + k for k in range(1, study.seed_check.seeds + 1)}
    batches = [(train.batch_size, train.grad_accum_steps)]
    while train.oom_retry and batches[-1][0] > 1:  # as sweep.objective retries one
        batches.append((batches[-1][0] // 2, batches[-1][1] * 2))
    read: set[int] = set()
    for seed in sorted(seeds):
        for size, accum in batches:
            read |= rows_read(
                split,
                batch_size=size,
                micro_batches=train.max_steps * accum,
                seed=seed,
                group_by_length=study.data.group_by_length,
            )
    return None if len(read) == len(split) else sorted(read)


def build_cache(study: StudyConfig) -> Path:
    """Build the teacher's top-K caches ahead of a many-worker launch (``kdsweep cache``);
    returns the training tokens' cache folder. Nothing is built twice."""
    if not study.cached_top_ks:
        reason = (
            "train.teacher_cache is false"
            if not study.train.teacher_cache
            else "search.top_k (or a baseline) uses 'all', the teacher's whole vocabulary, which "
            "the cache does not hold"
        )
        raise UsageError(
            f"no teacher cache to build: {reason}; every top_k must be a number for the teacher "
            "to run once"
        )
    progress = SweepProgress()
    try:
        teacher = StudyTeacher.prepare(
            study=study, inputs=read_inputs(study, progress), progress=progress
        )
    finally:
        progress.close()
    return teacher.train_cache.folder
