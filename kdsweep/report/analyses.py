"""What Optuna computes over the study's trials for the report: parameter importances over the
trials the sampler chose (on an in-memory copy of the study holding just those), and a
multi-objective study's Pareto front (on a view of the study showing its complete sweep)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from kdsweep.compat.optuna import FilteredStudy
from kdsweep.names import Group
from kdsweep.store.trials import Trials, group_of, in_sweep, is_baseline, primary_value
from kdsweep.study.config import StudyConfig
from kdsweep.study.measures import feasible


@dataclass
class Importances:
    """Parameter importances, or why there are none."""

    values: pd.Series | None  # parameter -> importance, largest first
    evaluator: str
    n_trials: int
    skipped: str | None = None
    warnings: list[str] = field(default_factory=list)


def compute_importances(trials: list[FrozenTrial], study: StudyConfig) -> Importances:
    """PED-ANOVA importances (Optuna's default evaluator: deterministic, handles categorical
    top_k) for the first objective, over the complete, feasible trials the sampler chose.
    Baselines are left out: their fixed values (alpha 0) lie outside the search space and would
    dominate the estimate."""
    evaluator_name = "PED-ANOVA (optuna.importance.PedAnovaImportanceEvaluator, Optuna's default)"
    sampled = sampled_trials(trials)
    result = Importances(None, evaluator_name, len(sampled))
    searched = {
        name for t in sampled for name, dist in t.distributions.items() if not dist.single()
    }
    if len(sampled) < 2:
        result.skipped = (
            "importances need at least 2 complete non-baseline trials; this study "
            f"has {len(sampled)}"
        )
    elif not searched:
        result.skipped = (
            "no parameter is searched (every one is fixed), so there is nothing to rank"
        )
    if result.skipped:
        return result
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = optuna.importance.get_param_importances(
            study_of(sampled, study.directions),
            evaluator=optuna.importance.PedAnovaImportanceEvaluator(),
            target=primary_value if study.multi_objective else None,
        )
    result.values = pd.Series(values, dtype=float).rename_axis("parameter").rename("importance")
    result.warnings = sorted({str(w.message) for w in caught if "optuna" in w.filename})
    return result


def sampled_trials(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The complete, feasible trials of the sweep's own search (baselines were fixed by hand,
    seed-check runs repeat a configuration)."""
    return [
        t
        for t in trials
        if t.state == TrialState.COMPLETE
        and group_of(t) == Group.SEARCH
        and not is_baseline(t)
        and feasible(t.constraints)
    ]


def study_of(trials: list[FrozenTrial], directions: list[str]) -> optuna.Study:
    """An in-memory copy of the study holding only ``trials``, for the evaluators, the plots and
    the Pareto front."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created in memory" line
    try:
        copy = optuna.create_study(directions=directions)
    finally:
        optuna.logging.set_verbosity(verbosity)
    copy.add_trials(trials)
    return copy


def pareto_front(optuna_study: optuna.Study) -> list[FrozenTrial]:
    """The complete, feasible sweep trials (baselines included) that no other matches in every
    objective and beats in one (Optuna's ``best_trials``), by the first objective. Read through a
    view of the study, not a copy: a copy would reject the baselines' alpha 0, which lies outside
    the searched range."""
    front = complete_sweep(optuna_study).best_trials  # infeasible ones left out by Optuna
    return Trials(front, optuna_study.directions).ranked


def complete_sweep(optuna_study: optuna.Study) -> FilteredStudy:
    """The study as its complete sweep trials (baselines included, seed-check runs not)."""
    return FilteredStudy(
        optuna_study,
        lambda t: t.state == TrialState.COMPLETE and in_sweep(t),
    )
