"""What a study cost, in device-seconds: wall seconds times the devices held (a trial holds one:
its worker's GPU, or the CPU).

Each trial's cost comes from its clock (``distill.clock``), in every state: a pruned, failed or
preempted trial spent its time too. The study's costs outside its trials are kept on the Optuna
study: each worker's preparation (models, data, the references) and finals (the test split), and
the teacher cache's build. Read back, they make the parent run's total, ``kdsweep status``'s line,
the report's Compute section and ``kdsweep check``'s estimate.
"""

from __future__ import annotations

import statistics
import uuid
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from kdsweep.names import Metric, StudyAttr, TrialAttr
from kdsweep.store.trials import in_sweep, is_baseline, is_control, is_seed_check
from kdsweep.study.config import StudyConfig
from kdsweep.study.space import baseline_trials

PREPARATION, FINALS = "preparation", "finals"  # the study's parts outside its trials


def runs_after_sweep(study: StudyConfig) -> int:
    """The runs after the sweep, once it has enough distilled trials: the control, and the seed
    check's (each of its top configurations, the best baseline and the control, with each other
    seed)."""
    control = 1 if study.control else 0
    if not study.seed_check.top:
        return control
    baselines = 1 if baseline_trials(study.search, study.baselines) else 0
    return control + (study.seed_check.top + baselines + control) * study.seed_check.seeds


def record(optuna_study: optuna.Study, part: str, seconds: float) -> None:
    """One worker's ``seconds`` of ``part`` (``PREPARATION``, ``FINALS``), under a key of its own:
    workers record theirs at once without overwriting each other's."""
    key = f"{StudyAttr.COST_PREFIX}{part}:{uuid.uuid4().hex[:12]}"
    optuna_study.set_user_attr(key, seconds)


@dataclass(frozen=True)
class StudyCost:
    """A study's device-seconds, split by what they bought."""

    teacher_cache: float  # building the teacher's top-K caches, once
    preparation: float  # every worker's models, data and references, every run of the study
    preparations: int  # ... how many there were
    finals: float  # the finalists and the teacher scored on the test split
    distilled: float  # complete distilled trials of the sweep
    baselines: float  # complete baseline trials of the sweep
    control: float  # the complete controls (the winner trained again at alpha 0)
    seed_check: float  # complete seed-check runs
    pruned_or_failed: float  # trials of any group that did not complete (preempted too)
    unmeasured: int  # ended trials with no cost recorded: killed with their worker (kill -9)
    median_complete: float | None  # the median complete trial
    cached_step: float | None  # the median trial's mean seconds per step on the cache ...
    on_policy_step: float | None  # ... and on-policy (None: no such step ran)
    pruned_steps_not_run: int  # the steps pruned trials stopped short of
    pruning_saved: float  # ... times each one's measured seconds per step

    @property
    def trials(self) -> float:
        return (
            self.distilled
            + self.baselines
            + self.control
            + self.seed_check
            + self.pruned_or_failed
        )

    @property
    def total(self) -> float:
        return self.teacher_cache + self.preparation + self.finals + self.trials

    @property
    def teacher_cache_percent(self) -> float | None:
        """The teacher cache's share of the total, in percent (None: no cache)."""
        return 100 * self.teacher_cache / self.total if self.total and self.teacher_cache else None


def study_cost(optuna_study: optuna.Study, *, max_steps: int) -> StudyCost:
    """What the study's store says it cost so far (``max_steps``: a complete trial's steps)."""
    attrs = optuna_study.user_attrs
    trials = optuna_study.get_trials(deepcopy=False)
    ended = [t for t in trials if t.state not in (TrialState.RUNNING, TrialState.WAITING)]
    measured = [t for t in ended if TrialAttr.COST in t.user_attrs]
    costs = {t.number: t.user_attrs[TrialAttr.COST] for t in measured}
    complete = [t for t in measured if t.state == TrialState.COMPLETE]

    def spent(group: list[FrozenTrial]) -> float:
        return sum(costs[t.number][Metric.DEVICE_SECONDS] for t in group)

    seed_check = [t for t in complete if is_seed_check(t)]
    sweep = [t for t in complete if in_sweep(t)]
    pruned = [t for t in measured if t.state == TrialState.PRUNED]
    not_run = {t.number: max(max_steps - (t.last_step or 0), 0) for t in pruned}
    preparations = _recorded(attrs, PREPARATION)
    return StudyCost(
        teacher_cache=attrs.get(StudyAttr.TEACHER_CACHE_SECONDS, 0.0),
        preparation=sum(preparations),
        preparations=len(preparations),
        finals=sum(_recorded(attrs, FINALS)),
        distilled=spent([t for t in sweep if not is_baseline(t)]),
        baselines=spent([t for t in sweep if is_baseline(t)]),
        control=spent([t for t in complete if is_control(t)]),
        seed_check=spent(seed_check),
        pruned_or_failed=spent([t for t in measured if t.state != TrialState.COMPLETE]),
        unmeasured=len(ended) - len(measured),
        median_complete=_median(costs[t.number][Metric.DEVICE_SECONDS] for t in complete),
        cached_step=_median(costs[t.number].get(Metric.CACHED_STEP_SECONDS) for t in complete),
        on_policy_step=_median(
            costs[t.number].get(Metric.ON_POLICY_STEP_SECONDS) for t in complete
        ),
        pruned_steps_not_run=sum(not_run.values()),
        pruning_saved=sum(not_run[t.number] * _per_step(costs[t.number], t) for t in pruned),
    )


@dataclass(frozen=True)
class TrialTime:
    """What a trial takes, as the study's store measured it: the medians over its complete
    trials that ran from step 0."""

    setup: float  # device-seconds outside the training loop: the student's loading, ...
    per_step: float  # ... and the loop's per step, evaluations and checkpoints included
    trials: int  # how many trials measured it


def trial_time(optuna_study: optuna.Study, *, max_steps: int) -> TrialTime | None:
    """The store's measure of a trial's time (None: no complete trial that ran from step 0;
    ``max_steps``: a complete trial's steps, as the study ran them)."""
    measured = [
        t
        for t in optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if TrialAttr.COST in t.user_attrs and TrialAttr.RESUMED_STEP not in t.user_attrs
    ]
    if not measured:
        return None
    # A multi-objective study reports no evaluation to Optuna: its trials have no last_step.
    loops = [(_loop_seconds(t.user_attrs[TrialAttr.COST]), t) for t in measured]
    return TrialTime(
        setup=statistics.median(
            t.user_attrs[TrialAttr.COST][Metric.DEVICE_SECONDS] - loop for loop, t in loops
        ),
        per_step=statistics.median(loop / (t.last_step or max_steps) for loop, t in loops),
        trials=len(measured),
    )


def _loop_seconds(spent: dict) -> float:
    """A trial's seconds in its training loop: its steps, evaluations and checkpoints."""
    parts = (
        Metric.TRAIN_SECONDS,
        Metric.EVAL_SECONDS,
        Metric.GENERATION_SECONDS,
        Metric.CHECKPOINT_SECONDS,
    )
    return sum(spent.get(name, 0.0) for name in parts)


def _per_step(spent: dict, trial: FrozenTrial) -> float:
    """A trial's training-loop seconds per step it ran (a resumed trial's steps from its
    checkpoint on)."""
    ran = (trial.last_step or 0) - trial.user_attrs.get(TrialAttr.RESUMED_STEP, 0)
    return _loop_seconds(spent) / ran if ran > 0 else 0.0


def _recorded(attrs: dict, part: str) -> list[float]:
    prefix = f"{StudyAttr.COST_PREFIX}{part}:"
    return [seconds for key, seconds in attrs.items() if key.startswith(prefix)]


def _median(values) -> float | None:
    found = [v for v in values if v is not None]
    return statistics.median(found) if found else None
