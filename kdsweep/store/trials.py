"""One view of a study's trials, read by every part that asks which trial is what.

The sweep, the finalists, the seed check, the cost, ``kdsweep status`` and the report all ask
the same questions of the trials in the store: which are baselines (what the study file declared
as one, never inferred from alpha), which are the seed check's runs, which a later trial retries,
which kept every constraint, how the complete ones rank by the first objective, what "better"
means in its direction, and which baseline the verdict compares with. They are answered here,
once, over one read of the store (:meth:`Trials.of`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cached_property

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from kdsweep.names import Group, TrialAttr
from kdsweep.study.measures import MINIMIZE, feasible

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def group_of(trial: FrozenTrial | optuna.Trial) -> str:
    """The trial's group: the sweep's, a baseline's or the seed check's (``names.Group``)."""
    return trial.user_attrs.get(TrialAttr.GROUP, Group.SEARCH)


def is_baseline(trial: FrozenTrial | optuna.Trial) -> bool:
    """Whether the study declared the trial a baseline (``baselines:``), whatever its alpha; a
    seed-check run of a baseline is one too."""
    return bool(trial.user_attrs.get(TrialAttr.BASELINE))


def is_seed_check(trial: FrozenTrial | optuna.Trial) -> bool:
    return group_of(trial) == Group.SEED_CHECK


def is_control(trial: FrozenTrial | optuna.Trial) -> bool:
    """Whether the trial is a control: a distilled configuration trained again at alpha 0."""
    return group_of(trial) == Group.CONTROL


def arm_of(trial: FrozenTrial | optuna.Trial) -> str | None:
    """Which trials a trial is judged against (its pruner's peers): the baselines, or the sweep's
    own search; None for the seed check's and the control's runs, which are never pruned."""
    if is_seed_check(trial) or is_control(trial):
        return None
    return "baseline" if is_baseline(trial) else "search"


def in_sweep(trial: FrozenTrial | optuna.Trial) -> bool:
    """Whether the trial is one of the sweep's (a baseline's or its own search's), not a run of
    a configuration trained again (the seed check, the control)."""
    return arm_of(trial) is not None


def params_of(trial: FrozenTrial) -> dict:
    """Every declared parameter the trial trained with (fixed ones included)."""
    return trial.user_attrs.get(TrialAttr.PARAMS, trial.params)


def lora_rank(trial: FrozenTrial) -> int:
    """The trial's student form: its LoRA rank, 0 for full fine-tuning."""
    return params_of(trial).get("lora_rank", 0)


def primary_value(trial: FrozenTrial) -> float:
    """The trial's value of the study's first objective (its only one, or the one that decides)."""
    return trial.values[0]


def retry_of(trial: FrozenTrial) -> int | None:
    """The trial that ``trial`` runs again: one whose worker died, or that ran out of memory."""
    return trial.user_attrs.get(TrialAttr.RETRY_OF, trial.user_attrs.get(TrialAttr.OOM_RETRY_OF))


class Trials:
    """A study's trials as one read of its store saw them."""

    def __init__(self, trials: Iterable[FrozenTrial], directions: Sequence[str | StudyDirection]):
        self.all: list[FrozenTrial] = sorted(trials, key=lambda t: t.number)
        first = directions[0]
        name = first.name.lower() if isinstance(first, StudyDirection) else first
        self.minimize = name == MINIMIZE

    @classmethod
    def of(cls, optuna_study: optuna.Study) -> Trials:
        return cls(optuna_study.get_trials(deepcopy=False), optuna_study.directions)

    def better(self, value: float, than: float) -> bool:
        """Whether a value of the first objective beats another."""
        return value < than if self.minimize else value > than

    def _rank_key(self, trial: FrozenTrial) -> tuple[float, int]:
        return (primary_value(trial) if self.minimize else -primary_value(trial), trial.number)

    # -------------------------------------------------------------- which trials count

    @cached_property
    def replaced(self) -> set[int]:
        """Trials a later trial retries (a dead worker's, one out of memory): they count no
        longer."""
        return {retry_of(t) for t in self.all} - {None}

    @cached_property
    def sweep(self) -> list[FrozenTrial]:
        """The sweep's trials, baselines included: not the seed check's or the control's runs,
        not the trials a retry replaces."""
        return [t for t in self.all if in_sweep(t) and t.number not in self.replaced]

    @property
    def seed_check_runs(self) -> list[FrozenTrial]:
        return [t for t in self.all if is_seed_check(t)]

    def control(self, of: FrozenTrial | None) -> FrozenTrial | None:
        """The complete control run of the trial ``of`` (its latest), if one ran."""
        runs = [
            t
            for t in self.all
            if is_control(t)
            and of is not None
            and t.user_attrs.get(TrialAttr.CONTROL_OF) == of.number
            and t.state == TrialState.COMPLETE
        ]
        return runs[-1] if runs else None

    def count(self, states: Iterable[TrialState]) -> int:
        """Sweep trials in ``states``."""
        wanted = tuple(states)
        return sum(t.state in wanted for t in self.sweep)

    @property
    def running(self) -> list[FrozenTrial]:
        """Sweep trials some worker is training now."""
        return [t for t in self.sweep if t.state == TrialState.RUNNING]

    @property
    def queued(self) -> list[FrozenTrial]:
        """Sweep trials enqueued (baselines, retries) that no worker has started."""
        return [t for t in self.sweep if t.state == TrialState.WAITING]

    @property
    def infeasible(self) -> list[FrozenTrial]:
        """Sweep trials that broke a constraint: over a ceiling, or out of memory."""
        return [t for t in self.sweep if not feasible(t.constraints)]

    # -------------------------------------------------------------- how they rank

    @cached_property
    def ranked(self) -> list[FrozenTrial]:
        """Complete, feasible sweep trials, best first by the first objective; ties go to the
        earlier trial."""
        complete = [
            t
            for t in self.all
            if t.state == TrialState.COMPLETE and in_sweep(t) and feasible(t.constraints)
        ]
        return sorted(complete, key=self._rank_key)

    @property
    def distilled(self) -> list[FrozenTrial]:
        """Ranked trials of the sweep's own search (not baselines), best first."""
        return [t for t in self.ranked if not is_baseline(t)]

    @property
    def baselines(self) -> list[FrozenTrial]:
        """Ranked baseline trials, best first."""
        return [t for t in self.ranked if is_baseline(t)]

    @property
    def best(self) -> FrozenTrial | None:
        return self.ranked[0] if self.ranked else None

    @property
    def best_distilled(self) -> FrozenTrial | None:
        return self.distilled[0] if self.distilled else None

    @property
    def compared_baselines(self) -> list[FrozenTrial]:
        """The baselines the verdict compares with, best first: those that trained the best
        distilled trial's student form (like with like), or all of them when none did."""
        best = self.best_distilled
        alike = [t for t in self.baselines if best is not None and lora_rank(t) == lora_rank(best)]
        return alike or self.baselines

    @property
    def compared_baseline(self) -> FrozenTrial | None:
        """The best of ``compared_baselines``: what the verdict compares the winner with."""
        return self.compared_baselines[0] if self.compared_baselines else None

    def finalists(self, top: int) -> list[FrozenTrial]:
        """The configurations the verdict is measured on: the ``top`` best distilled trials (at
        least one), then the compared baseline."""
        baseline = self.compared_baseline
        return self.distilled[: max(1, top)] + ([baseline] if baseline is not None else [])

    def contends(self, trial: FrozenTrial | optuna.Trial, value: float, top: int) -> bool:
        """Whether a trial that just completed with ``value`` is among its kind's finalists so
        far: one of the ``top`` best distilled trials, or the best baseline of its form."""
        baseline = is_baseline(trial)
        rivals = [
            t
            for t in self.ranked
            if is_baseline(t) == baseline and (not baseline or lora_rank(t) == lora_rank(trial))
        ]
        ahead = sum(not self.better(value, primary_value(t)) for t in rivals)
        return ahead < (1 if baseline else max(1, top))
