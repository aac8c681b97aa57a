"""MLflow: one experiment per study, one parent run, one nested run per trial.

Runs are driven through ``MlflowClient`` with explicit run ids rather than the fluent
``mlflow.start_run`` stack: several trials, processes and machines write to one parent, and an
explicit id is what lets each of them attach to it.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from kdsweep import __version__
from kdsweep.config import StudyConfig

# MLflow 3's UI opens experiments of unknown kind on a GenAI overview with no runs on it.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
PARENT_TAG = "mlflow.parentRunId"
_BATCH_LIMIT = 1000  # MLflow accepts at most 1000 metrics per log_batch call


def tracking_uri(configured: str | None) -> str | None:
    """``MLFLOW_TRACKING_URI`` wins; else the study's; else None (MLflow's own default)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured


class StudyTracker:
    """The MLflow side of one study: its experiment, its parent run and its trials' runs."""

    def __init__(self, study: StudyConfig):
        self.study = study
        self.client = MlflowClient(tracking_uri=tracking_uri(study.tracking.uri))
        self.experiment_id = self._experiment(study.experiment_name)
        self.parent_run_id: str | None = None

    def _experiment(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            return self.client.create_experiment(name, tags=dict([EXPERIMENT_KIND]))
        if experiment.tags.get(EXPERIMENT_KIND[0]) is None:
            self.client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
        return experiment.experiment_id

    # -------------------------------------------------------------- the parent run

    def attach(self, optuna_study, *, references: dict[str, float]) -> str:
        """Re-open the study's parent run (its id lives with the Optuna study), or create it.

        ``references`` (teacher and untrained-student perplexity, data sizes) are logged once.
        """
        run_id = optuna_study.user_attrs.get("mlflow_parent_run_id")
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=self.study.name, tags=self._tags())
            run_id = run.info.run_id
            optuna_study.set_user_attr("mlflow_parent_run_id", run_id)
            optuna_study.set_user_attr("mlflow_experiment_id", self.experiment_id)
            _log_batch(self.client, run_id, params=fixed_settings(self.study), metrics=references)
            self.client.log_dict(run_id, self.study.to_dict(), "study.yaml")
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.parent_run_id = run_id
        self.end_stale_runs(optuna_study)
        return run_id

    def record_best(self, best) -> None:
        """Keep the best trial so far visible on the parent run."""
        if best is None:
            return
        params = best.user_attrs.get("params", best.params)
        tags = {"best_trial": best.number, **{f"best.{k}": v for k, v in params.items()}}
        _log_batch(self.client, self.parent_run_id, metrics={"best_value": best.value}, tags=tags)

    def close(self, optuna_study, *, status: str) -> None:
        """End the parent run and any trial run left RUNNING by this or a dead process."""
        self.end_stale_runs(optuna_study)
        self.client.set_terminated(self.parent_run_id, status=status)

    def end_stale_runs(self, optuna_study) -> int:
        """Mark KILLED every nested run still RUNNING whose Optuna trial is no longer running
        (its process was killed), so no run shows as running forever."""
        from optuna.trial import TrialState

        live = {
            t.user_attrs.get("mlflow_run_id")
            for t in optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        }
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and attributes.status = 'RUNNING'",
        )
        stale = [r for r in runs if r.info.run_id not in live]
        for run in stale:
            TrialRun(self.client, run.info.run_id).end("KILLED", state="KILLED", reason="its worker process died")
        return len(stale)

    # -------------------------------------------------------------- one run per trial

    def start_trial(self, trial, params: dict) -> TrialRun:
        from kdsweep.sweep import run_name

        baseline = bool(trial.user_attrs.get("baseline", False))
        tags = {
            PARENT_TAG: self.parent_run_id,
            "kdsweep.trial": trial.number,
            "kdsweep.state": "RUNNING",
            "kdsweep.baseline": baseline,
            **self._tags(),
        }
        run = self.client.create_run(self.experiment_id, run_name=run_name(trial.number, params), tags=_strings(tags))
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        _log_batch(self.client, run.info.run_id, params={**params, **fixed_settings(self.study)})
        return TrialRun(self.client, run.info.run_id)

    def _tags(self) -> dict[str, str]:
        return _strings(
            {
                "kdsweep.study": self.study.name,
                "kdsweep.version": __version__,
                "kdsweep.fingerprint": self.study.fingerprint(),
                **({"mlflow.source.git.commit": commit} if (commit := git_commit()) else {}),
            }
        )


def fixed_settings(study: StudyConfig) -> dict:
    """The settings every trial shares, as params, so the compare view shows all that differs."""
    train = study.train
    return {
        "teacher": study.teacher.name,
        "student": study.student.name,
        "dataset": study.data.dataset,
        "train_split": study.data.train_split,
        "eval_split": study.data.eval_split,
        "max_length": study.data.max_length,
        "assistant_only": study.data.assistant_only,
        "batch_size": train.batch_size,
        "grad_accum_steps": train.grad_accum_steps,
        "max_steps": train.max_steps,
        "precision": train.precision,
        "seed": train.seed,
        "objective": study.objective,
    }


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@dataclass
class TrialRun:
    """One trial's nested run. Metrics are buffered and sent in batches to keep logging cheap."""

    client: MlflowClient
    run_id: str
    pending: list[Metric] = field(default_factory=list)

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        now = int(time.time() * 1000)
        self.pending += [Metric(key, float(value), now, step) for key, value in metrics.items()]

    def log_step(self, log) -> None:
        """A training log line (``train.StepLog``): sent with the next batch, not now."""
        values = {
            "train_loss": log.loss,
            "train_kl": log.kl,
            "train_ce": log.ce,
            "learning_rate": log.learning_rate,
            "grad_norm": log.grad_norm,
            "tokens_per_second": log.tokens_per_second,
        }
        self.log_metrics(values, step=log.step)
        if len(self.pending) >= _BATCH_LIMIT:
            self.flush()

    def flush(self) -> None:
        for start in range(0, len(self.pending), _BATCH_LIMIT):
            self.client.log_batch(self.run_id, metrics=self.pending[start : start + _BATCH_LIMIT])
        self.pending = []

    def finish(self, result, *, objective: float) -> None:
        """A completed trial (``train.DistillResult``): final metrics, then FINISHED."""
        final = {
            "objective": objective,
            "duration_s": result.seconds,
            "peak_memory_mb": result.peak_memory_bytes / 2**20,
        }
        self.log_metrics(final, step=result.steps)
        self.end("FINISHED", state="COMPLETE")

    def end(self, status: str, *, state: str, reason: str | None = None, traceback: str | None = None) -> None:
        """Flush, record the Optuna state (and why it ended) as tags, and set the MLflow status."""
        self.flush()
        tags = {"kdsweep.state": state}
        if reason:
            tags["kdsweep.reason"] = reason.splitlines()[0][:500]
        _log_batch(self.client, self.run_id, tags=tags)
        if traceback:
            self.client.log_text(self.run_id, traceback, "traceback.txt")
        self.client.set_terminated(self.run_id, status=status)


def _log_batch(client: MlflowClient, run_id: str, *, params=None, metrics=None, tags=None) -> None:
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
        params=[Param(k, _param_text(v)) for k, v in (params or {}).items()],
        tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
    )


def _param_text(value) -> str:
    # MLflow params are immutable strings; keep them short and stable.
    return "None" if value is None else str(value)[:6000]


def _strings(values: dict) -> dict[str, str]:
    return {k: str(v) for k, v in values.items()}
