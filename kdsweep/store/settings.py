"""The settings a study's trials ran with, as stored with the study: one source of truth for
what a report or ``kdsweep status`` says about them.

A study file changes after its runs (a longer ``max_steps``), and a run can override it
(``kdsweep run --set pruner.name=none``). So each run records its resolved study under its
fingerprint (``StudyAttr.CONFIG_PREFIX``), each trial the fingerprint it ran with
(``TrialAttr.CONFIG``), and the study the target the latest run asked for. Readers take the
latest trial's settings, and name what differs from the study file as it reads now.
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna

from kdsweep.names import StudyAttr, TrialAttr
from kdsweep.study.config import StudyConfig
from kdsweep.study.reader import study_as_stored

# Settings that say where things are or how a run is reported, not what a trial computes.
_NOT_SETTINGS = ("name", "storage", "tracking", "report_top_n")


@dataclass(frozen=True)
class AsRun:
    """The study as its trials ran, beside the study file as it reads now."""

    study: StudyConfig  # the latest trial's settings (the file's, before any trial ran)
    target: int  # the finished trials the latest run asked for
    # key path -> (the file's value, the run's), for every setting the run changed
    overrides: dict[str, tuple]
    # each set of settings that trials ran with, oldest first: (fingerprint, trial numbers)
    runs: list[tuple[str, list[int]]]


def as_run(optuna_study: optuna.Study, file: StudyConfig) -> AsRun:
    """What the study's trials ran with (see the module)."""
    attrs = optuna_study.user_attrs
    runs: dict[str, list[int]] = {}
    for trial in optuna_study.get_trials(deepcopy=False):
        if (key := trial.user_attrs.get(TrialAttr.CONFIG)) is not None:
            runs.setdefault(key, []).append(trial.number)
    latest = max(runs, key=lambda key: max(runs[key]), default=None)
    stored = attrs.get(f"{StudyAttr.CONFIG_PREFIX}{latest}")
    study = study_as_stored(stored, file) if stored else file
    return AsRun(
        study=study,
        target=attrs.get(StudyAttr.TARGET, study.n_trials),
        overrides=differences(file.to_dict(), study.to_dict()),
        runs=sorted(runs.items(), key=lambda item: min(item[1])),
    )


def differences(file: dict, ran: dict) -> dict[str, tuple]:
    """Key path -> (the file's value, the run's) wherever they differ."""
    a, b = _flatten(file), _flatten(ran)
    return {
        key: (a.get(key), b.get(key))
        for key in sorted(a.keys() | b.keys())
        if a.get(key) != b.get(key) and key.split(".")[0] not in _NOT_SETTINGS
    }


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
