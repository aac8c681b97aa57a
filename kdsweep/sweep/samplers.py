"""The samplers and the pruner: one sampler per group of trials, and a pruner per arm.

A study holds four groups of trials (``names.Group``): the sweep's own (sampled over the whole
search space), each baseline's (plain fine-tuning at alpha 0, say, which may search its own
learning rate), the control (the winner trained again at alpha 0) and the seed check's
(configurations trained again with other seeds). Optuna's samplers learn from every trial of a
study, and mixing the groups would teach TPE that alpha 0 exists or count one configuration
several times. So each group is sampled by a sampler of its own that sees only its group's
trials (the way Optuna's Hyperband pruner shows each bracket its own trials). The pruner judges
a trial against its own arm only: the baselines, or the sweep's own search (``make_pruner``).
The control's and the seed check's trials, whose parameters are all fixed, feed no sampler and
no pruner. What each parameter is drawn from is declared in ``study.space``.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from kdsweep.compat.optuna import FilteredStudy, PeersHyperband, reseed_sampler, study_id
from kdsweep.names import Group
from kdsweep.store.trials import arm_of, group_of
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
    """The study's pruner, fair to both arms: a trial is judged against its own arm's trials
    only (``store.trials.arm_of``: the baselines, or the sweep's own search). Plain fine-tuning
    may lower its loss faster in its first steps than distillation, which also pulls the student
    toward the teacher; judged against the baselines' curves, every distilled trial could be
    pruned before it shows what the teacher adds. An arm's first trials (``n_startup_trials``)
    are not pruned: nothing of their own to compare with yet. The seed check's and the control's
    runs are never pruned."""
    cfg = study.pruner
    if cfg.name == "median":
        median = optuna.pruners.MedianPruner(
            n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps
        )
        return ArmPruner(median)
    if cfg.name == "hyperband":
        return PeersHyperband(
            _peers, min_resource=study.train.eval_every, max_resource=study.train.max_steps
        )
    return optuna.pruners.NopPruner()


def _peers(trial: FrozenTrial, arm_of=arm_of):
    """What a trial is judged against: its arm's trials (None: it is never pruned)."""
    arm = arm_of(trial)
    return None if arm is None else (lambda t: arm_of(t) == arm)


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


class ArmPruner(optuna.pruners.BasePruner):
    """Shows the pruner it wraps only the trials of the judged trial's arm (``arm_of``: the
    study's arms unless told otherwise, as benchmarks/pruning.py compares rules)."""

    def __init__(self, pruner: optuna.pruners.BasePruner, arm_of=arm_of):
        self._pruner = pruner
        self._arm_of = arm_of
        self._views: dict[tuple[int, str], FilteredStudy] = {}

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        arm = self._arm_of(trial)
        if arm is None:
            return False
        key = (study_id(study), arm)
        if key not in self._views:
            self._views[key] = FilteredStudy(study, _peers(trial, self._arm_of))
        return self._pruner.prune(self._views[key], trial)
