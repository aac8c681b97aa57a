"""The samplers and the pruner: one sampler per group of trials, and a pruner that leaves the
seed check alone.

A study holds three groups of trials (``names.Group``): the sweep's own (sampled over the whole
search space), each baseline's (plain fine-tuning at alpha 0, which may search its own learning
rate), and the seed check's (configurations trained again with other seeds). Optuna's samplers
learn from every trial of a study, and mixing the groups would teach TPE that alpha 0 exists or
count one configuration several times. So each group is sampled by a sampler of its own that
sees only its group's trials (the way Optuna's Hyperband pruner shows each bracket its own
trials), and seed-check trials, whose parameters are all fixed, feed no sampler and no pruner.
What each parameter is drawn from is declared in ``space``.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from kdsweep.compat.optuna import FilteredStudy, reseed_sampler, study_id
from kdsweep.names import Group
from kdsweep.store.trials import group_of, is_seed_check
from kdsweep.study.config import StudyConfig
from kdsweep.study.space import grid


def make_sampler(study: StudyConfig) -> optuna.samplers.BaseSampler:
    """The study's sampler: one per group of trials, each seeded apart."""
    return GroupedSampler(lambda group: _group_sampler(study, group), seed=study.sampler.seed)


def _group_sampler(study: StudyConfig, group: str) -> optuna.samplers.BaseSampler:
    cfg = study.sampler
    if group == Group.SEARCH:
        if cfg.name == "grid":
            return optuna.samplers.GridSampler(grid(study.search), seed=cfg.seed)
        if cfg.name == "gp":
            # Optuna's Gaussian process: for the usual kdsweep space (5-6 parameters, tens of
            # trials); it draws parallel workers' trials apart since Optuna 4.9.
            return optuna.samplers.GPSampler(seed=cfg.seed, n_startup_trials=cfg.n_startup_trials)
        if cfg.name == "tpe":
            return optuna.samplers.TPESampler(
                seed=cfg.seed,
                n_startup_trials=cfg.n_startup_trials,
                multivariate=cfg.multivariate,
                constant_liar=cfg.constant_liar,
            )
    # A baseline's few trials, and the seed check's fixed ones: random sampling, seeded apart.
    offset = (
        1 + int(group.removeprefix(Group.BASELINE_PREFIX))
        if group.startswith(Group.BASELINE_PREFIX)
        else 0
    )
    return optuna.samplers.RandomSampler(seed=None if cfg.seed is None else cfg.seed + offset)


def make_pruner(study: StudyConfig) -> optuna.pruners.BasePruner:
    """The study's pruner. Seed-check trials are never pruned (``objective``); the median
    compares with the sweep's trials only. Hyperband stays unwrapped: Optuna finds it by its type
    to show the sampler one bracket's trials, and its brackets read the storage directly."""
    cfg = study.pruner
    if cfg.name == "median":
        median = optuna.pruners.MedianPruner(
            n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps
        )
        return SeedCheckAwarePruner(median)
    if cfg.name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=study.train.eval_every, max_resource=study.train.max_steps
        )
    return optuna.pruners.NopPruner()


class GroupedSampler(optuna.samplers.BaseSampler):
    """Delegates each trial to its group's sampler, which sees only its group's trials.

    With a ``seed``, each trial's random draws are seeded by the seed and the trial's number, not
    by a stream that starts over in every process: workers sharing a study (or a run resumed
    after a crash) draw new parameters instead of repeating each other's, and the same study
    run again draws the same ones in the same order.
    """

    def __init__(
        self, make: Callable[[str], optuna.samplers.BaseSampler], *, seed: int | None = None
    ):
        self._make = make
        self._seed = seed
        self._samplers: dict[str, optuna.samplers.BaseSampler] = {}
        self._views: dict[tuple[int, str], FilteredStudy] = {}

    def _pick(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> tuple[optuna.samplers.BaseSampler, FilteredStudy]:
        group = group_of(trial)
        if group not in self._samplers:
            self._samplers[group] = self._make(group)
        key = (study_id(study), group)
        if key not in self._views:
            self._views[key] = FilteredStudy(study, lambda t: group_of(t) == group)
        return self._samplers[group], self._views[key]

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        sampler, view = self._pick(study, trial)
        return sampler.infer_relative_search_space(view, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict:
        sampler, view = self._pick(study, trial)
        return sampler.sample_relative(view, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ):
        sampler, view = self._pick(study, trial)
        return sampler.sample_independent(view, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        sampler, view = self._pick(study, trial)
        if self._seed is not None:
            reseed_sampler(sampler, self._seed * 1_000_003 + trial.number)
        sampler.before_trial(view, trial)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values
    ) -> None:
        sampler, view = self._pick(study, trial)
        sampler.after_trial(view, trial, state, values)

    def reseed_rng(self) -> None:
        for sampler in self._samplers.values():
            sampler.reseed_rng()


class SeedCheckAwarePruner(optuna.pruners.BasePruner):
    """Never prunes a seed-check trial, and keeps them out of what the pruner compares with."""

    def __init__(self, pruner: optuna.pruners.BasePruner):
        self._pruner = pruner
        self._views: dict[int, FilteredStudy] = {}

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        if is_seed_check(trial):
            return False
        key = study_id(study)
        if key not in self._views:
            self._views[key] = FilteredStudy(study, lambda t: not is_seed_check(t))
        return self._pruner.prune(self._views[key], trial)
