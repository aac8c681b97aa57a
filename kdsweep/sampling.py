"""How each trial gets its parameters: the samplers and pruner, the baselines, the seed check.

A study holds three groups of trials (``names.Group``): the sweep's own (sampled over the whole
search space), each baseline's (plain fine-tuning at alpha 0, which may search its own learning
rate), and the seed check's (configurations trained again with other seeds). Optuna's samplers
learn from every trial of a study, and mixing the groups would teach TPE that alpha 0 exists or
count one configuration several times. So each group is sampled by a sampler of its own that
sees only its group's trials (the way Optuna's Hyperband pruner shows each bracket its own
trials), and seed-check trials, whose parameters are all fixed, feed no sampler and no pruner.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from kdsweep.config import StudyConfig
from kdsweep.names import Group, TrialAttr
from kdsweep.space import BASELINE_TRIALS, SEARCH_SPACE, Param, baseline_params, grid, neutral
from kdsweep.storage import StudyView, group_of

# ---------------------------------------------------------------- samplers and pruner


def make_sampler(study: StudyConfig) -> optuna.samplers.BaseSampler:
    """The study's sampler: one per group of trials, each seeded apart."""
    return GroupedSampler(lambda group: _group_sampler(study, group), seed=study.sampler.seed)


def _group_sampler(study: StudyConfig, group: str) -> optuna.samplers.BaseSampler:
    cfg = study.sampler
    if group == Group.SEARCH:
        if cfg.name == "grid":
            return optuna.samplers.GridSampler(grid(study.search), seed=cfg.seed)
        if cfg.name == "tpe":
            return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.n_startup_trials)
    # A baseline's few trials, and the seed check's fixed ones: random sampling, seeded apart.
    offset = 1 + int(group.removeprefix(Group.BASELINE_PREFIX)) if group.startswith(Group.BASELINE_PREFIX) else 0
    return optuna.samplers.RandomSampler(seed=None if cfg.seed is None else cfg.seed + offset)


def make_pruner(study: StudyConfig) -> optuna.pruners.BasePruner:
    """The study's pruner. Seed-check trials are never pruned (``objective``); the median
    compares with the sweep's trials only. Hyperband stays unwrapped: Optuna finds it by its type
    to show the sampler one bracket's trials, and its brackets read the storage directly."""
    cfg = study.pruner
    if cfg.name == "median":
        median = optuna.pruners.MedianPruner(n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps)
        return SeedCheckAwarePruner(median)
    if cfg.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=study.train.eval_every, max_resource=study.train.max_steps)
    return optuna.pruners.NopPruner()


class GroupedSampler(optuna.samplers.BaseSampler):
    """Delegates each trial to its group's sampler, which sees only its group's trials.

    With a ``seed``, each trial's random draws are seeded by the seed and the trial's number, not
    by a stream that starts over in every process: workers sharing a study (or a run resumed
    after a crash) draw new parameters instead of repeating each other's, and the same study
    run again draws the same ones in the same order.
    """

    def __init__(self, make: Callable[[str], optuna.samplers.BaseSampler], *, seed: int | None = None):
        self._make = make
        self._seed = seed
        self._samplers: dict[str, optuna.samplers.BaseSampler] = {}
        self._views: dict[tuple[int, str], StudyView] = {}

    def _pick(self, study: optuna.Study, trial: FrozenTrial) -> tuple[optuna.samplers.BaseSampler, StudyView]:
        group = group_of(trial)
        if group not in self._samplers:
            self._samplers[group] = self._make(group)
        key = (study._study_id, group)
        if key not in self._views:
            self._views[key] = StudyView(study, lambda t: group_of(t) == group)
        return self._samplers[group], self._views[key]

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        sampler, view = self._pick(study, trial)
        return sampler.infer_relative_search_space(view, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict:
        sampler, view = self._pick(study, trial)
        return sampler.sample_relative(view, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ):
        sampler, view = self._pick(study, trial)
        return sampler.sample_independent(view, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        sampler, view = self._pick(study, trial)
        if self._seed is not None:
            _reseed(sampler, self._seed * 1_000_003 + trial.number)
        sampler.before_trial(view, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values) -> None:
        sampler, view = self._pick(study, trial)
        sampler.after_trial(view, trial, state, values)

    def reseed_rng(self) -> None:
        for sampler in self._samplers.values():
            sampler.reseed_rng()


def _reseed(sampler: optuna.samplers.BaseSampler, seed: int) -> None:
    """Seed the random state of Optuna's samplers (TPE keeps a second one for its first trials).
    Optuna exposes only ``reseed_rng()``, which draws a seed from the OS."""
    for part in (sampler, getattr(sampler, "_random_sampler", None)):
        rng = getattr(part, "_rng", None)
        if rng is not None:
            rng.rng.seed(seed % 2**32)


class SeedCheckAwarePruner(optuna.pruners.BasePruner):
    """Never prunes a seed-check trial, and keeps them out of what the pruner compares with."""

    def __init__(self, pruner: optuna.pruners.BasePruner):
        self._pruner = pruner
        self._views: dict[int, StudyView] = {}

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        if group_of(trial) == Group.CONFIRM:
            return False
        if study._study_id not in self._views:
            self._views[study._study_id] = StudyView(study, lambda t: group_of(t) != Group.CONFIRM)
        return self._pruner.prune(self._views[study._study_id], trial)


# ---------------------------------------------------------------- parameters of a trial


def suggest(trial: optuna.Trial, search) -> dict:
    """Every declared parameter of the trial: sampled, fixed by the study, or fixed by a baseline."""
    baseline = trial.user_attrs.get(TrialAttr.BASELINE_PARAMS, {})
    params = {}
    for p in SEARCH_SPACE:
        param: Param = getattr(search, p.name)
        if param.is_fixed:
            params[p.name] = baseline.get(p.name, param.value)
        elif param.choices is not None:
            params[p.name] = trial.suggest_categorical(p.name, list(param.choices))
        elif param.step is not None:
            params[p.name] = trial.suggest_float(p.name, param.low, param.high, step=param.step)
        else:
            params[p.name] = trial.suggest_float(p.name, param.low, param.high, log=param.log)
    return params


def baseline_trials(study: StudyConfig) -> list[tuple[dict, dict]]:
    """(enqueued params, user attrs) of every baseline trial, in the order they run.

    A baseline fixes what it names; at alpha 0 the parameters that need a teacher are fixed too,
    at their first allowed value (they do nothing); the rest (the learning rate) is sampled by
    the baseline's own sampler, over ``trials`` trials.
    """
    trials = []
    for i, entry in enumerate(study.baselines):
        fixed = baseline_params(entry)
        enqueued = {k: v for k, v in fixed.items() if not getattr(study.search, k).is_fixed}
        if fixed.get("alpha", neutral(study.search, "alpha")) == 0:
            for p in SEARCH_SPACE:
                if p.distillation_only and p.name not in fixed and not getattr(study.search, p.name).is_fixed:
                    enqueued[p.name] = neutral(study.search, p.name)
        attrs = {TrialAttr.BASELINE: True, TrialAttr.BASELINE_PARAMS: fixed, TrialAttr.GROUP: Group.baseline(i)}
        trials += [(enqueued, attrs)] * entry.get(BASELINE_TRIALS, 1)
    return trials
