"""`kdsweep status`: the study's trials as a table, read from the Optuna storage."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from kdsweep.config import StudyConfig
from kdsweep.names import TrialAttr
from kdsweep.space import SEARCHED
from kdsweep.storage import best_trial, load_existing_study


def print_status(study: StudyConfig, console: Console | None = None) -> None:
    console = console or Console()
    optuna_study = load_existing_study(study)
    trials = optuna_study.get_trials(deepcopy=False)
    best = best_trial(optuna_study)
    table = Table(title=f"study {study.name!r}: {len(trials)} trials, target {study.n_trials}")
    for column in ("trial", "state", *SEARCHED, study.objective, "minutes", "note"):
        table.add_column(column)
    for trial in trials:
        params = trial.user_attrs.get(TrialAttr.PARAMS, trial.params)
        duration = trial.duration.total_seconds() / 60 if trial.duration else None
        note = "baseline" if trial.user_attrs.get(TrialAttr.BASELINE) else ""
        note = trial.user_attrs.get(TrialAttr.FAIL_REASON, note)
        if best is not None and trial.number == best.number:
            note = "best"
        table.add_row(
            str(trial.number),
            trial.state.name,
            *(_cell(params.get(name)) for name in SEARCHED),
            _cell(trial.value),
            _cell(duration),
            note,
        )
    console.print(table)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
