"""Where the study's MLflow tracking store is, and the addresses of its UI pages.

MLflow 3's UI opens an experiment's plain URL on its GenAI overview, where no runs are shown:
every address here names the model-training workflow.
"""

from __future__ import annotations

import os

from mlflow.tracking import get_tracking_uri

_TRAINING = "workflowType=machine_learning"  # the UI's "Model training" pages, not its GenAI ones


def tracking_uri(configured: str | None) -> str | None:
    """``MLFLOW_TRACKING_URI`` wins; else the study's; else None (MLflow's own default)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured


def resolved_tracking_uri(configured: str | None) -> str:
    """``tracking_uri``, with MLflow's default filled in (it depends on what the current folder
    holds: an existing ``./mlruns`` store, else ``sqlite:///mlflow.db``)."""
    return tracking_uri(configured) or get_tracking_uri()


def run_url(base: str, experiment: str, run_id: str) -> str:
    """One run's page."""
    return f"{base.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}?{_TRAINING}"


def runs_url(base: str, experiment: str | None) -> str:
    """The study's runs table; the experiments list when the study has not run yet."""
    base = base.rstrip("/")
    if experiment is None:
        return f"{base}/#/experiments"
    return f"{base}/#/experiments/{experiment}/runs?{_TRAINING}"


def compare_url(base: str, experiment: str, run_ids: list[str]) -> str:
    """MLflow's side-by-side view of ``run_ids``: params, metrics and plots."""
    runs = ",".join(f'"{r}"' for r in run_ids)
    return (
        f'{base.rstrip("/")}/#/compare-runs?runs=[{runs}]&experiments=["{experiment}"]&{_TRAINING}'
    )
