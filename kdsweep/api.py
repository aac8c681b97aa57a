"""kdsweep from Python: what the command line does, as functions for notebooks and scripts.

Example:
    >>> import kdsweep
    >>> overrides = {"train.max_steps": 100}
    >>> summary = kdsweep.run_study("studies/demo.yaml", overrides=overrides)  # doctest: +SKIP
    >>> summary.best_params, summary.best_run_id  # doctest: +SKIP
    >>> kdsweep.write_report("studies/demo.yaml")  # doctest: +SKIP
    PosixPath('reports/demo.md')

Each function is a thin call to what ``kdsweep run`` and ``kdsweep report`` use, and raises the
same errors: :class:`kdsweep.errors.StudyError` for a bad study file (``.problems`` lists each
problem), :class:`kdsweep.errors.UsageError` for other bad input (a missing model or dataset).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import datasets
import optuna
import transformers
import yaml

from kdsweep import sweep
from kdsweep.progress import SweepProgress
from kdsweep.report import write_report as write_markdown_report
from kdsweep.study.config import StudyConfig
from kdsweep.study.reader import load_study
from kdsweep.sweep import StudySummary

StudyLike = str | Path | StudyConfig


def run_study(
    study: StudyLike,
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    overrides: Mapping[str, object] | None = None,
    report: bool = True,
) -> StudySummary:
    """Run (or continue) a study until it holds ``n_trials`` finished trials, as ``kdsweep run``.

    Args:
        study: A study file, or a loaded :class:`~kdsweep.study.config.StudyConfig`.
        n_trials: The total of finished trials the study should hold (default: the study's).
        timeout: Start no new trial after this many seconds.
        overrides: Study fields to override, by key path: ``{"train.max_steps": 50}``.
        report: Write ``reports/<study>.md`` at the end, as the command does.
    """
    config = load(study, overrides)
    quiet_libraries()
    progress = SweepProgress()
    try:
        result = sweep.run(config, n_trials=n_trials, timeout=timeout, progress=progress)
    finally:
        progress.close()
    if report and result.finished:
        result = dataclasses.replace(result, report=write_markdown_report(config))
    return result


def write_report(
    study: StudyLike,
    *,
    output: str | Path | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Path:
    """Write the study's Markdown report and figures, as ``kdsweep report``; returns its path."""
    return write_markdown_report(
        load(study, overrides), output=None if output is None else str(output)
    )


def load(study: StudyLike, overrides: Mapping[str, object] | None = None) -> StudyConfig:
    """A study file read, overridden and validated (a StudyConfig is returned as it is)."""
    if isinstance(study, StudyConfig):
        if overrides:
            raise TypeError(
                "overrides apply to a study file; pass the file's path, or change the StudyConfig"
            )
        return study
    return load_study(
        study, [f"{key}={_yaml_text(value)}" for key, value in (overrides or {}).items()]
    )


def _yaml_text(value: object) -> str:
    """A value as ``--set`` reads it (YAML): numbers and booleans keep their type."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def quiet_libraries() -> None:
    """Keep the libraries' own chatter out of kdsweep's progress: Optuna's per-trial log lines
    repeat ours, transformers draws a bar for every checkpoint a trial loads, and MLflow prints a
    "View run" line for every run it ends on a tracking server, with the server's URL as given
    (credentials included): kdsweep links its runs itself, with passwords masked."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # A local student has no hub model card or license, which MLflow warns about on every save;
    # the system metrics' sampling thread warns about what a CPU or a GPU-less host lacks.
    for logger in ("mlflow.transformers", "mlflow.system_metrics"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    datasets.disable_progress_bars()  # "Generating train split" bars, once per split and worker
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # Baselines fix alpha at 0, outside a distillation range, on purpose.
    warnings.filterwarnings(
        "ignore", message="Fixed parameter .* is out of range", category=UserWarning
    )
