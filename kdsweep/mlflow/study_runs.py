"""A study in MLflow: one experiment, one parent run, one nested run per trial.

Runs are driven through ``MlflowClient`` with explicit run ids rather than the fluent
``mlflow.start_run`` stack: several trials, processes and machines write to one parent, and an
explicit id is what lets each of them attach to it. The layout (names, params, tags, metrics,
statuses) is described in docs/mlflow.md.
"""

from __future__ import annotations

import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor

import optuna
from mlflow.entities import DatasetInput
from mlflow.entities import Param as LoggedParam
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from optuna.trial import FrozenTrial, TrialState

from kdsweep.compat.optuna import fail_stale_trials
from kdsweep.errors import UsageError
from kdsweep.mlflow.dataset_inputs import dataset_inputs
from kdsweep.mlflow.links import resolved_tracking_uri
from kdsweep.mlflow.trial_run import (
    TrialRun,
    library_versions,
    log_batch,
    param_text,
    strings,
    system_monitor,
)
from kdsweep.names import (
    ADAPTER_ARTIFACT,
    CHAMPION,
    MODEL_ARTIFACT,
    RERUN_ARTIFACT,
    STUDY_ARTIFACT,
    SYSTEM_METRICS_PREFIX,
    Metric,
    StudyAttr,
    Tag,
    TrialAttr,
)
from kdsweep.store.storage import first_use_lock, set_user_attr_once
from kdsweep.store.trials import is_baseline, params_of, primary_value
from kdsweep.study.config import StudyConfig
from kdsweep.study.measures import MAXIMIZE
from kdsweep.study.reader import set_key_path
from kdsweep.study.space import run_name
from kdsweep.version import __version__

# MLflow 3's UI tells model-training experiments from GenAI ones by this tag (where its
# workflow switch does not decide instead: see links.runs_url).
TRAINING_EXPERIMENT = "custom_model_development"


class StudyRuns:
    """The MLflow side of one study: its experiment, its parent run and its trials' runs."""

    def __init__(self, study: StudyConfig):
        self.study = study
        uri = resolved_tracking_uri(study.tracking.uri)
        with first_use_lock(uri):  # the client creates (or migrates) its store right away
            self.client = MlflowClient(tracking_uri=uri)
            self.experiment_id = self._experiment(study.experiment_name)
        self.parent_run_id: str | None = None
        self.inputs: list[DatasetInput] = []
        self._common_tags = self._tags()
        self._best_logged: int | None = None  # the trial last shown as best on the parent run
        # Trial runs' batches are written by one background thread, in order, while training goes
        # on.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdsweep-mlflow")

    def _experiment(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self.client.create_experiment(
                    name, tags={Tag.EXPERIMENT_KIND: TRAINING_EXPERIMENT}
                )
            except MlflowException as exc:  # another worker created it a moment ago
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = self.client.get_experiment_by_name(name)
        if experiment.tags.get(Tag.EXPERIMENT_KIND) is None:
            self.client.set_experiment_tag(
                experiment.experiment_id, Tag.EXPERIMENT_KIND, TRAINING_EXPERIMENT
            )
        return experiment.experiment_id

    # -------------------------------------------------------------- the parent run

    def attach(self, optuna_study: optuna.Study, *, references: dict[str, float]) -> str:
        """Re-open the study's parent run (its id lives with the Optuna study), or create it.

        Workers that start a new study at the same moment each create a candidate run; the
        Optuna storage keeps the first id written (``store.storage.set_user_attr_once``) and every
        other candidate is deleted, so the study has exactly one parent. ``references``
        (teacher and untrained-student perplexity) are logged on it by the worker that made it.
        """
        run_id = optuna_study.user_attrs.get(StudyAttr.PARENT_RUN_ID)
        if run_id is None:
            candidate = self.client.create_run(
                self.experiment_id, run_name=self.study.name, tags=self._common_tags
            )
            run_id = set_user_attr_once(
                optuna_study, StudyAttr.PARENT_RUN_ID, candidate.info.run_id
            )
            if run_id != candidate.info.run_id:
                self.client.delete_run(candidate.info.run_id)  # another worker's parent came first
            else:
                optuna_study.set_user_attr(StudyAttr.EXPERIMENT_ID, self.experiment_id)
                log_batch(
                    self.client, run_id, params=fixed_settings(self.study), metrics=references
                )
                self.client.log_dict(run_id, self.study.to_dict(), STUDY_ARTIFACT)
        else:
            self._reopen(run_id)
        self.parent_run_id = run_id
        self.end_stale_runs(optuna_study)
        return run_id

    def _reopen(self, run_id: str) -> None:
        try:
            self.client.update_run(run_id, status="RUNNING")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise UsageError(
                f"study {self.study.name!r} logs to MLflow run {run_id}, which is not in the "
                "tracking store "
                f"{self.client.tracking_uri}: use the store the study started with "
                "(MLFLOW_TRACKING_URI or "
                "tracking.uri), or give the study a new name"
            ) from None

    def record_best(self, best: FrozenTrial | None) -> None:
        """Keep the best trial so far (by the first objective, among feasible trials) visible on
        the parent run: its number, params, value and run as tags, its value as the metric
        ``best_value`` (stepped by trial number)."""
        if best is None or best.number == self._best_logged:
            return
        self._best_logged = best.number
        params = params_of(best)
        value = primary_value(best)
        tags = {
            Tag.BEST_TRIAL: best.number,
            Tag.BEST_RUN_ID: best.user_attrs.get(TrialAttr.MLFLOW_RUN_ID, ""),
            Tag.BEST_VALUE: f"{value:.6g}",
            **{f"{Tag.BEST_PARAM_PREFIX}{k}": v for k, v in params.items()},
        }
        log_batch(
            self.client,
            self.parent_run_id,
            metrics={Metric.BEST_VALUE: value},
            tags=tags,
            step=best.number,
        )

    def log_to_run(self, run_id: str, metrics: dict[str, float], *, step: int) -> None:
        """Metrics on a run that may have ended (a finalist's test scores, the teacher's)."""
        log_batch(self.client, run_id, metrics=metrics, step=step)

    def copy_history(self, run_id: str, into: TrialRun, *, until: int) -> None:
        """A retried trial's curves, steps 1 to ``until`` (its resume checkpoint's), into the run
        of the retry that goes on from there: its curves then show every step once. System
        metrics stay with the run whose machine they sampled."""
        for key in self.client.get_run(run_id).data.metrics:
            if key.startswith(SYSTEM_METRICS_PREFIX):
                continue
            into.pending += [
                point
                for point in self.client.get_metric_history(run_id, key)
                if 1 <= point.step <= until
            ]
        into.flush()

    def close(self, optuna_study: optuna.Study, *, status: str) -> None:
        """End every trial run left RUNNING by a dead worker, then the parent run, unless
        another worker is still running trials under it (the last one to close ends it)."""
        self._writer.shutdown(wait=True)
        self.end_stale_runs(optuna_study)
        if not optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self.client.set_terminated(self.parent_run_id, status=status)

    def end_stale_runs(self, optuna_study: optuna.Study) -> int:
        """Mark KILLED every nested run still RUNNING whose Optuna trial is no longer running.

        That is a trial whose worker was killed (SIGKILL, a lost machine) before it could close
        its run. Optuna's heartbeat turns such a trial from RUNNING to FAIL once its worker has
        been silent for the storage's grace period; this asks it to check first.
        """
        fail_stale_trials(optuna_study)
        # Trial numbers, not run ids: a live trial's run may exist a moment before its id is
        # stored.
        live = {
            str(t.number)
            for t in optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        }
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{Tag.PARENT}` = '{self.parent_run_id}' and attributes.status = "
            "'RUNNING'",
        )
        stale = [r for r in runs if r.data.tags.get(Tag.TRIAL) not in live]
        for run in stale:
            reason = "its worker stopped without closing the run (killed, or its machine was lost)"
            TrialRun(self.client, run.info.run_id).end("KILLED", state="KILLED", reason=reason)
        return len(stale)

    # -------------------------------------------------------------- one run per trial

    def use_data(self, train_split, eval_set) -> None:
        """Describe the training and evaluation data once per worker; each trial run logs them
        as MLflow dataset inputs (a digest and a source: the data itself is not uploaded)."""
        self.inputs = dataset_inputs(self.study, train_split, eval_set)

    def start_trial(
        self,
        trial: optuna.Trial,
        params: dict,
        *,
        seed: int,
        device: str,
        gpu_uuid: str | None = None,
    ) -> TrialRun:
        """The trial's nested run, its params (the searched ones, the fixed settings, its seed)
        sent in the background. A seed-check run or a control is tagged with the trial it trains
        again; every run with the host and device it trains on."""
        checked = trial.user_attrs.get(TrialAttr.SEED_CHECK_OF)
        controlled = trial.user_attrs.get(TrialAttr.CONTROL_OF)
        tags = {
            Tag.PARENT: self.parent_run_id,
            Tag.TRIAL: trial.number,
            Tag.STATE: "RUNNING",
            Tag.BASELINE: is_baseline(trial),
            Tag.HOST: socket.gethostname(),
            Tag.DEVICE: device,
            **({Tag.SEED_CHECK_OF: checked} if checked is not None else {}),
            **({Tag.CONTROL_OF: controlled} if controlled is not None else {}),
            **self._common_tags,
        }
        name = run_name(trial.number, params)
        if checked is not None:
            name += f" seed={seed} (seed check of {checked})"
        if controlled is not None:
            name += f" (control of {controlled})"
        run = self.client.create_run(self.experiment_id, run_name=name, tags=strings(tags))
        trial.set_user_attr(TrialAttr.MLFLOW_RUN_ID, run.info.run_id)
        monitor = None
        if self.study.tracking.system_metrics:
            interval = self.study.tracking.system_metrics_interval
            monitor = system_monitor(
                self.client, run.info.run_id, interval=interval, gpu_uuid=gpu_uuid
            )
        trial_run = TrialRun(
            self.client, run.info.run_id, run.info.run_name, writer=self._writer, monitor=monitor
        )
        values = {**params, **fixed_settings(self.study), "seed": seed}
        trial_run.send(params=[LoggedParam(k, param_text(v)) for k, v in values.items()])
        trial_run.send_dict(
            rerun_study(self.study, params, seed=seed, number=trial.number), RERUN_ARTIFACT
        )
        if self.inputs:
            self.client.log_inputs(run.info.run_id, datasets=self.inputs)
        return trial_run

    def keep_best_model(self) -> None:
        """``save_best``: of the trial runs holding a saved student, the best one is the model.

        With ``register_as`` every saved student is a version of that registered model and the
        alias ``champion`` is moved to the best one; without it, the others' model files are
        deleted, so one model stays on disk per study. Safe with several workers: every worker
        that saves a model runs this afterwards, and the outcome depends only on the runs'
        objectives, not on who runs it last.
        """
        saved = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{Tag.PARENT}` = '{self.parent_run_id}' and tags.`{Tag.MODEL}` "
            "= 'saved'",
            order_by=[
                f"metrics.{Metric.OBJECTIVE} "
                f"{'DESC' if self.study.direction == MAXIMIZE else 'ASC'}",
                "attributes.start_time ASC",
            ],
        )
        if not saved:
            return
        best = saved[0]
        if self.study.register_as:
            self._make_champion(best.info.run_id)
            return
        for run in saved[1:]:
            repository = _artifact_repository(run, self.client.tracking_uri)
            for artifact in (MODEL_ARTIFACT, ADAPTER_ARTIFACT):
                if self.client.list_artifacts(run.info.run_id, artifact):
                    repository.delete_artifacts(artifact)
            note = f"deleted: trial {best.data.tags.get(Tag.TRIAL)} is better"
            self.client.set_tag(run.info.run_id, Tag.MODEL, note)

    def _make_champion(self, run_id: str) -> None:
        """Register the run's model (once) as a version of ``register_as``, and point the alias
        ``champion`` at it."""
        name = self.study.register_as
        try:
            self.client.create_registered_model(name, tags={Tag.STUDY: self.study.name})
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        versions = self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        if versions:
            version = versions[0].version
        else:
            source = f"runs:/{run_id}/{MODEL_ARTIFACT}"
            version = self.client.create_model_version(
                name, source=source, run_id=run_id, tags={Tag.STUDY: self.study.name}
            ).version
        self.client.set_registered_model_alias(name, CHAMPION, version)

    def _tags(self) -> dict[str, str]:
        """Tags of every run of the study: MLflow's usual context (user, source) and kdsweep's."""
        kdsweep = {
            Tag.STUDY: self.study.name,
            Tag.VERSION: __version__,
            # Optuna's too: which trials a study draws depends on it.
            **{
                f"{Tag.LIBRARY_VERSION_PREFIX}{package}": version
                for package, version in library_versions(
                    ("torch", "transformers", "optuna")
                ).items()
            },
            Tag.FINGERPRINT: self.study.fingerprint(),
            **({Tag.GIT_COMMIT: commit} if (commit := git_commit(self.study.base_dir)) else {}),
        }
        return strings(resolve_tags(kdsweep))


def fixed_settings(study: StudyConfig) -> dict:
    """The settings every trial shares, as params, so the compare view shows all that differs."""
    train = study.train
    return {
        "teacher": study.teacher.label,
        "student": study.student.label,
        "dataset": study.data.dataset,
        "train_split": study.data.train_split,
        "eval_split": study.data.eval_split,
        "data_format": study.data.format,
        "max_length": study.data.max_length,
        "assistant_only": study.data.assistant_only,
        # what is trained of reasoning, in which context, and what exact match compares
        "reasoning": study.data.reasoning,
        "each_turn_as_last": study.data.each_turn_as_last,
        "answer": study.eval.answer,
        "batch_size": train.batch_size,
        "grad_accum_steps": train.grad_accum_steps,
        "max_steps": train.max_steps,
        "precision": train.precision,
        "gradient_checkpointing": train.gradient_checkpointing,
        "attn_implementation": train.attn_implementation,
        "seed": train.seed,
        "objective": ", ".join(study.objectives),
        **(
            {"constraints": ", ".join(f"{k} <= {v:g}" for k, v in study.constraints.items())}
            if study.constraints
            else {}
        ),
        # How trials are drawn: explicit, so the same study samples the same way on every Optuna
        # (the parent run's tags hold Optuna's version).
        **{f"sampler.{key}": value for key, value in study.sampler.acting().items()},
    }


def rerun_study(study: StudyConfig, params: dict, *, seed: int, number: int) -> dict:
    """The study that reruns one trial: its parameters fixed, its seed, one trial, local paths
    made absolute (the artifact is read elsewhere); ``kdsweep run`` takes it as it is."""
    data = study.to_dict()
    for key, value in study.rerun_settings(number, params).items():
        set_key_path(data, key, value)
    data["train"]["seed"] = seed
    data["data"]["dataset"] = study.resolve_path(study.data.dataset)
    for role in ("teacher", "student"):
        data[role]["name"] = study.resolve_path(data[role]["name"])
    return data


def git_commit(folder: str = ".") -> str | None:
    """The commit checked out where the study file lives, if that is a git work tree."""
    try:
        out = subprocess.run(
            ["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# ---------------------------------------------------------------- helpers


def _artifact_repository(run, tracking_uri: str):
    return get_artifact_repository(run.info.artifact_uri, tracking_uri=tracking_uri)
