"""MLflow: one experiment per study, one parent run, one nested run per trial.

Runs are driven through ``MlflowClient`` with explicit run ids rather than the fluent
``mlflow.start_run`` stack: several trials, processes and machines write to one parent, and an
explicit id is what lets each of them attach to it. The layout (names, params, tags, metrics,
statuses) is described in README.md, "MLflow layout".
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, RunTag
from mlflow.entities import Metric as LoggedMetric
from mlflow.entities import Param as LoggedParam
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient, get_tracking_uri
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from optuna.trial import FrozenTrial, TrialState

from kdsweep.config import StudyConfig
from kdsweep.errors import UsageError
from kdsweep.names import (
    MAXIMIZE,
    MODEL_ARTIFACT,
    STUDY_ARTIFACT,
    TRACEBACK_ARTIFACT,
    Metric,
    StudyAttr,
    Tag,
    TrialAttr,
)
from kdsweep.space import run_name
from kdsweep.storage import first_use_lock, set_user_attr_once
from kdsweep.version import __version__

# MLflow 3's UI tells model-training experiments from GenAI ones by this tag (where its
# workflow switch does not decide instead: see ui.runs_url).
TRAINING_EXPERIMENT = "custom_model_development"
_BATCH_LIMIT = 1000  # MLflow accepts at most 1000 metrics per log_batch call
_TRAINING = "workflowType=machine_learning"  # the UI's "Model training" pages, not its GenAI ones


def tracking_uri(configured: str | None) -> str | None:
    """``MLFLOW_TRACKING_URI`` wins; else the study's; else None (MLflow's own default)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured


def resolved_tracking_uri(configured: str | None) -> str:
    """``tracking_uri``, with MLflow's default filled in (it depends on what the current folder
    holds: an existing ``./mlruns`` store, else ``sqlite:///mlflow.db``)."""
    return tracking_uri(configured) or get_tracking_uri()


# ---------------------------------------------------------------- MLflow UI addresses
# MLflow 3's UI opens an experiment's plain URL on its GenAI overview, where no runs are shown:
# every address names the model-training workflow.


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
    return f"{base.rstrip('/')}/#/compare-runs?runs=[{runs}]&experiments=[\"{experiment}\"]&{_TRAINING}"


class StudyTracker:
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
        # Trial runs' batches are written by one background thread, in order, while training goes on.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdsweep-mlflow")

    def _experiment(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self.client.create_experiment(name, tags={Tag.EXPERIMENT_KIND: TRAINING_EXPERIMENT})
            except MlflowException as exc:  # another worker created it a moment ago
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = self.client.get_experiment_by_name(name)
        if experiment.tags.get(Tag.EXPERIMENT_KIND) is None:
            self.client.set_experiment_tag(experiment.experiment_id, Tag.EXPERIMENT_KIND, TRAINING_EXPERIMENT)
        return experiment.experiment_id

    # -------------------------------------------------------------- the parent run

    def attach(self, optuna_study: optuna.Study, *, references: dict[str, float]) -> str:
        """Re-open the study's parent run (its id lives with the Optuna study), or create it.

        Workers that start a new study at the same moment each create a candidate run; the
        Optuna storage keeps the first id written (``storage.set_user_attr_once``) and every
        other candidate is deleted, so the study has exactly one parent. ``references``
        (teacher and untrained-student perplexity) are logged on it by the worker that made it.
        """
        run_id = optuna_study.user_attrs.get(StudyAttr.PARENT_RUN_ID)
        if run_id is None:
            candidate = self.client.create_run(self.experiment_id, run_name=self.study.name, tags=self._common_tags)
            run_id = set_user_attr_once(optuna_study, StudyAttr.PARENT_RUN_ID, candidate.info.run_id)
            if run_id != candidate.info.run_id:
                self.client.delete_run(candidate.info.run_id)  # another worker's parent came first
            else:
                optuna_study.set_user_attr(StudyAttr.EXPERIMENT_ID, self.experiment_id)
                _log_batch(self.client, run_id, params=fixed_settings(self.study), metrics=references)
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
                f"study {self.study.name!r} logs to MLflow run {run_id}, which is not in the tracking store "
                f"{self.client.tracking_uri}: use the store the study started with (MLFLOW_TRACKING_URI or "
                "tracking.uri), or give the study a new name"
            ) from None

    def record_best(self, best: FrozenTrial | None) -> None:
        """Keep the best trial so far visible on the parent run: its number, params, value and
        run as tags, its value as the metric ``best_value`` (stepped by trial number)."""
        if best is None or best.number == self._best_logged:
            return
        self._best_logged = best.number
        params = best.user_attrs.get(TrialAttr.PARAMS, best.params)
        tags = {
            Tag.BEST_TRIAL: best.number,
            Tag.BEST_RUN_ID: best.user_attrs.get(TrialAttr.MLFLOW_RUN_ID, ""),
            Tag.BEST_VALUE: f"{best.value:.6g}",
            **{f"{Tag.BEST_PARAM_PREFIX}{k}": v for k, v in params.items()},
        }
        _log_batch(self.client, self.parent_run_id, metrics={Metric.BEST_VALUE: best.value}, tags=tags, step=best.number)

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
        _fail_stale_trials(optuna_study)
        # Trial numbers, not run ids: a live trial's run may exist a moment before its id is stored.
        live = {str(t.number) for t in optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{Tag.PARENT}` = '{self.parent_run_id}' and attributes.status = 'RUNNING'",
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
        data = self.study.data
        self.inputs = [
            _dataset_input(data, data.train_split, self.study.base_dir, *_training_data(train_split), "training"),
            _dataset_input(data, data.eval_split, self.study.base_dir, *_evaluation_data(eval_set), "evaluation"),
        ]

    def start_trial(self, trial: optuna.Trial, params: dict) -> TrialRun:
        tags = {
            Tag.PARENT: self.parent_run_id,
            Tag.TRIAL: trial.number,
            Tag.STATE: "RUNNING",
            Tag.BASELINE: bool(trial.user_attrs.get(TrialAttr.BASELINE, False)),
            **self._common_tags,
        }
        run = self.client.create_run(self.experiment_id, run_name=run_name(trial.number, params), tags=_strings(tags))
        trial.set_user_attr(TrialAttr.MLFLOW_RUN_ID, run.info.run_id)
        trial_run = TrialRun(self.client, run.info.run_id, run.info.run_name, writer=self._writer)
        values = {**params, **fixed_settings(self.study)}
        trial_run.send(params=[LoggedParam(k, _param_text(v)) for k, v in values.items()])
        if self.inputs:
            self.client.log_inputs(run.info.run_id, datasets=self.inputs)
        return trial_run

    def keep_best_model(self) -> None:
        """``save_best``: of the trial runs holding a saved student, keep the one with the best
        objective and delete the others' model files, so one model stays on disk per study.

        Safe with several workers: every worker that saves a model runs this afterwards, and the
        outcome depends only on the runs' objectives, not on who runs it last.
        """
        saved = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{Tag.PARENT}` = '{self.parent_run_id}' and tags.`{Tag.MODEL}` = 'saved'",
            order_by=[f"metrics.{Metric.OBJECTIVE} {'DESC' if self.study.direction == MAXIMIZE else 'ASC'}"],
        )
        if len(saved) < 2:
            return
        best = saved[0]
        for run in saved[1:]:
            _artifact_repository(run, self.client.tracking_uri).delete_artifacts(MODEL_ARTIFACT)
            note = f"deleted: trial {best.data.tags.get(Tag.TRIAL)} is better"
            self.client.set_tag(run.info.run_id, Tag.MODEL, note)

    def _tags(self) -> dict[str, str]:
        """Tags of every run of the study: MLflow's usual context (user, source) and kdsweep's."""
        kdsweep = {
            Tag.STUDY: self.study.name,
            Tag.VERSION: __version__,
            Tag.FINGERPRINT: self.study.fingerprint(),
            **({Tag.GIT_COMMIT: commit} if (commit := git_commit(self.study.base_dir)) else {}),
        }
        return _strings(resolve_tags(kdsweep))


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


def git_commit(folder: str = ".") -> str | None:
    """The commit checked out where the study file lives, if that is a git work tree."""
    try:
        out = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@dataclass
class TrialRun:
    """One trial's nested run, logged so that the trial hardly waits for MLflow: metrics are
    buffered and sent in batches, which ``writer`` (a background thread) writes while training
    goes on; the run's end waits until everything sent is written.

    Not MLflow's own async logging: ``set_terminated`` shuts its queue down, which takes up to a
    second per run, more than all of a short trial's synchronous writes.
    """

    client: MlflowClient
    run_id: str
    name: str = ""
    writer: ThreadPoolExecutor | None = None  # None: write at once
    pending: list[LoggedMetric] = field(default_factory=list)
    sending: list[Future] = field(default_factory=list)  # batches not known to be written yet

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        now = int(time.time() * 1000)
        self.pending += [LoggedMetric(key, float(value), now, step) for key, value in metrics.items()]

    def log_step(self, log) -> None:
        """A training log line (``train.StepLog``): sent with the next batch, not now."""
        values = {
            Metric.TRAIN_LOSS: log.loss,
            Metric.TRAIN_KL: log.kl,
            Metric.TRAIN_CE: log.ce,
            Metric.LEARNING_RATE: log.learning_rate,
            Metric.GRAD_NORM: log.grad_norm,
            Metric.TOKENS_PER_SECOND: log.tokens_per_second,
        }
        self.log_metrics(values, step=log.step)
        if len(self.pending) >= _BATCH_LIMIT:
            self.flush()

    def flush(self) -> None:
        """Send the buffered metrics in the background."""
        for start in range(0, len(self.pending), _BATCH_LIMIT):
            self.send(metrics=self.pending[start : start + _BATCH_LIMIT])
        self.pending = []

    def send(self, *, metrics=(), params=()) -> None:
        write = functools.partial(self.client.log_batch, self.run_id, metrics=list(metrics), params=list(params))
        if self.writer is None:
            write()
        else:
            self.sending.append(self.writer.submit(write))

    def wait_sent(self) -> None:
        """Block until every batch sent in the background is written (raises if one failed)."""
        sending, self.sending = self.sending, []
        for future in sending:
            future.result()

    def finish(self, result, *, objective: float, save_model: Callable[[str], None] | None = None) -> None:
        """A completed trial (``train.DistillResult``): final metrics, the model if asked, then
        FINISHED. ``save_model(folder)`` writes the student (weights and tokenizer) to ``folder``."""
        final = {
            Metric.OBJECTIVE: objective,
            Metric.DURATION_S: result.seconds,
            Metric.PEAK_MEMORY_MB: result.peak_memory_bytes / 2**20,
        }
        self.log_metrics(final, step=result.steps)
        if save_model is not None:
            self.log_model(save_model)
        self.end("FINISHED", state="COMPLETE")

    def log_model(self, save_model: Callable[[str], None]) -> None:
        with tempfile.TemporaryDirectory(prefix="kdsweep-model-") as folder:
            save_model(folder)
            self.client.log_artifacts(self.run_id, folder, MODEL_ARTIFACT)
        self.client.set_tag(self.run_id, Tag.MODEL, "saved")

    def end(self, status: str, *, state: str, reason: str | None = None, traceback: str | None = None) -> None:
        """Write what is left, record the Optuna state (and why it ended) as tags, and set the
        MLflow status.

        A pruned run also says so in its name, since its status (KILLED) does not tell it from
        an interrupted one in the runs list.
        """
        tags = {Tag.STATE: state}
        if reason:
            tags[Tag.REASON] = reason.splitlines()[0][:500]
        if len(self.pending) > _BATCH_LIMIT:
            self.flush()
        self.wait_sent()
        self.client.log_batch(self.run_id, metrics=self.pending, tags=[RunTag(k, v) for k, v in tags.items()])
        self.pending = []
        if traceback:
            self.client.log_text(self.run_id, traceback, TRACEBACK_ARTIFACT)
        if state == "PRUNED":
            self.client.update_run(self.run_id, name=f"{self.name} (pruned)")
        self.client.set_terminated(self.run_id, status=status)


# ---------------------------------------------------------------- helpers


class _TokenizedDataset(MetaDataset):
    """A dataset logged by reference: where it comes from, a digest of the exact tokens the
    trials use, and a profile (rows, scored tokens) that the MLflow UI shows."""

    def __init__(self, source, *, name: str, digest: str, profile: dict):
        self._profile = profile
        super().__init__(source, name=name, digest=digest)

    @property
    def profile(self) -> dict:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def _dataset_input(data, split: str, base_dir: str, digest: str, profile: dict, context: str) -> DatasetInput:
    source = _dataset_source(data.dataset, split, base_dir)
    dataset = _TokenizedDataset(source, name=f"{Path(data.dataset).name}-{split}", digest=digest, profile=profile)
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])


def _dataset_source(dataset: str, split: str, base_dir: str):
    """A local file or folder, or else a Hugging Face hub dataset."""
    local = next((p for p in (Path(base_dir) / dataset, Path(dataset)) if p.exists()), None)
    if local is None:
        return HuggingFaceDatasetSource(path=dataset, split=split)
    with warnings.catch_warnings():  # MLflow registers the local-file source twice and says so
        warnings.simplefilter("ignore")
        return resolve_dataset_source(str(local.resolve()))


def _training_data(split) -> tuple[str, dict]:
    """Digest and profile (rows, scored tokens) of a ``data.TokenizedSplit``."""
    digest = _digest([split.input_ids, split.labels])
    return digest, {"rows": len(split), "scored_tokens": split.num_scored_tokens}


def _evaluation_data(eval_set) -> tuple[str, dict]:
    """Digest and profile of an ``evaluate.EvalSet`` (its padded batches)."""
    batches = eval_set.batches
    digest = _digest([[b.input_ids.tolist(), b.labels.tolist()] for b in batches])
    rows = sum(len(b.input_ids) for b in batches)
    return digest, {"rows": rows, "scored_tokens": eval_set.num_tokens}


def _digest(values) -> str:
    return hashlib.sha256(json.dumps(values, separators=(",", ":")).encode()).hexdigest()[:12]


def _fail_stale_trials(optuna_study: optuna.Study) -> None:
    with warnings.catch_warnings():  # "fail_stale_trials is experimental"
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(optuna_study)


def _artifact_repository(run, tracking_uri: str):
    return get_artifact_repository(run.info.artifact_uri, tracking_uri=tracking_uri)


def _log_batch(client: MlflowClient, run_id: str, *, params=None, metrics=None, tags=None, step: int = 0) -> None:
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[LoggedMetric(k, float(v), now, step) for k, v in (metrics or {}).items()],
        params=[LoggedParam(k, _param_text(v)) for k, v in (params or {}).items()],
        tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
    )


def _param_text(value) -> str:
    # MLflow params are immutable strings; keep them short and stable.
    return "None" if value is None else str(value)[:6000]


def _strings(values: dict) -> dict[str, str]:
    return {k: str(v) for k, v in values.items()}
