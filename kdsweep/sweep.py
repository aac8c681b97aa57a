"""Optuna: the study, its search space, the objective, pruning, failures and workers.

``run_study`` prepares everything a trial shares (tokenizer, data, teacher, eval set) before it
opens the Optuna study or the MLflow runs, so bad input stops it with nothing written. Running it
again continues the same study up to ``n_trials``; other processes may run it at the same time.
"""

from __future__ import annotations

import json
import signal
import traceback
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from kdsweep.config import SEARCHED, WHOLE_VOCAB, Param, SearchConfig, StudyConfig
from kdsweep.errors import UsageError
from kdsweep.mlflow_plugin import active_trial
from kdsweep.progress import SweepProgress

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class TrainingDiverged(RuntimeError):
    """The loss or the perplexity stopped being finite."""


# ---------------------------------------------------------------- study, sampler, pruner


def open_study(study: StudyConfig) -> optuna.Study:
    """Create the Optuna study, or load it when an earlier run or another worker made it."""
    return optuna.create_study(
        study_name=study.name,
        storage=storage(study.storage_url),
        sampler=make_sampler(study),
        pruner=make_pruner(study),
        direction="minimize",
        load_if_exists=True,
    )


def storage(url: str) -> optuna.storages.BaseStorage:
    from kdsweep.tracking import first_use_lock

    # The heartbeat lets any worker mark a killed worker's trial FAIL instead of RUNNING forever.
    with first_use_lock(url):  # workers starting together must not create the tables twice
        return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=120)


def set_user_attr_once(optuna_study: optuna.Study, key: str, value) -> object:
    """Store ``value`` as the study's user attr ``key`` unless one is there; return the stored one.

    A compare-and-set for workers racing to create the same thing (the MLflow parent run): the
    value is inserted in one transaction and the storage's unique (study, key) constraint
    rejects every insert but the first, across processes and machines (SQLite, PostgreSQL,
    MySQL). ``Study.set_user_attr`` would overwrite instead.
    """
    stored = optuna_study.user_attrs.get(key)
    if stored is not None:
        return stored
    backend = getattr(optuna_study._storage, "_backend", optuna_study._storage)  # under Optuna's cache
    if not isinstance(backend, optuna.storages.RDBStorage):  # in-memory storage: one process
        optuna_study.set_user_attr(key, value)
        return value
    from optuna.storages._rdb.models import StudyUserAttributeModel
    from sqlalchemy.exc import IntegrityError

    study_id = backend.get_study_id_from_name(optuna_study.study_name)
    session = backend.scoped_session()
    try:
        session.add(StudyUserAttributeModel(study_id=study_id, key=key, value_json=json.dumps(value)))
        session.commit()
    except IntegrityError:
        session.rollback()  # another worker's value came first
    finally:
        session.close()
    return optuna_study.user_attrs[key]


def make_sampler(study: StudyConfig) -> optuna.samplers.BaseSampler:
    cfg = study.sampler
    if cfg.name == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    if cfg.name == "grid":
        return optuna.samplers.GridSampler(grid_space(study.search), seed=cfg.seed)
    return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.n_startup_trials)


def make_pruner(study: StudyConfig) -> optuna.pruners.BasePruner:
    cfg = study.pruner
    if cfg.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps)
    if cfg.name == "hyperband":
        train = study.train
        return optuna.pruners.HyperbandPruner(min_resource=train.eval_every, max_resource=train.max_steps)
    return optuna.pruners.NopPruner()


def grid_space(search: SearchConfig) -> dict[str, list]:
    space = {}
    for name in SEARCHED:
        param: Param = getattr(search, name)
        if param.choices is not None:
            space[name] = list(param.choices)
        elif not param.is_fixed:
            count = int(round((param.high - param.low) / param.step)) + 1
            space[name] = [param.low + i * param.step for i in range(count)]
    return space


# ---------------------------------------------------------------- parameters of a trial


def suggest(trial: optuna.Trial, search: SearchConfig) -> dict:
    """The trial's four hyperparameters: sampled, fixed by the study, or fixed by a baseline."""
    baseline = trial.user_attrs.get("baseline_params", {})
    params = {}
    for name in SEARCHED:
        param: Param = getattr(search, name)
        if param.is_fixed:
            params[name] = baseline.get(name, param.value)
        elif param.choices is not None:
            params[name] = trial.suggest_categorical(name, list(param.choices))
        elif param.step is not None:
            params[name] = trial.suggest_float(name, param.low, param.high, step=param.step)
        else:
            params[name] = trial.suggest_float(name, param.low, param.high, log=param.log)
    return params


def enqueue_baselines(optuna_study: optuna.Study, study: StudyConfig) -> None:
    """Baseline trials (e.g. alpha 0: plain fine-tuning on the same budget) run first, once."""
    if optuna_study.user_attrs.get("baselines_enqueued"):
        return
    for params in study.baselines:
        searched = {k: v for k, v in params.items() if not getattr(study.search, k).is_fixed}
        optuna_study.enqueue_trial(searched, user_attrs={"baseline": True, "baseline_params": dict(params)})
    optuna_study.set_user_attr("baselines_enqueued", True)


def top_k_of(params: dict) -> int | None:
    return None if params["top_k"] == WHOLE_VOCAB else int(params["top_k"])


def run_name(number: int, params: dict) -> str:
    """A name that reads well in a list of runs: trial 3 a=0.52 T=2.1 k=64 lr=3.1e-04."""
    return (
        f"trial {number} a={params['alpha']:.2f} T={params['temperature']:.2g} "
        f"k={params['top_k']} lr={params['learning_rate']:.1e}"
    )


def objective_value(study: StudyConfig, metrics: dict[str, float]) -> float:
    return metrics[study.objective]


def finished_count(optuna_study: optuna.Study) -> int:
    return len(optuna_study.get_trials(deepcopy=False, states=FINISHED_STATES))


def best_trial(optuna_study: optuna.Study) -> FrozenTrial | None:
    complete = optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return min(complete, key=lambda t: t.value) if complete else None


# ---------------------------------------------------------------- the run


@dataclass(frozen=True)
class RunSummary:
    ran: int
    finished: int
    target: int
    best: FrozenTrial | None


def run_study(
    study: StudyConfig,
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    progress: SweepProgress | None = None,
) -> RunSummary:
    """Run trials until the study holds ``n_trials`` finished ones (or ``timeout`` passes)."""
    from kdsweep.workspace import prepare  # torch and transformers load here, not at import

    progress = progress or SweepProgress()
    target = n_trials or study.n_trials
    workspace = prepare(study, progress=progress)  # raises UsageError before anything is written
    optuna_study = open_study(study)
    done = finished_count(optuna_study)
    if done >= target:
        progress.message(f"study {study.name!r} already holds {done} finished trials (target {target}): nothing to do")
        return RunSummary(ran=0, finished=done, target=target, best=best_trial(optuna_study))

    tracker = workspace.attach_tracking(optuna_study)
    tracker.use_data(workspace.train_split, workspace.eval_set)
    enqueue_baselines(optuna_study, study)
    objective = Objective(study, workspace, tracker, progress)
    stop_on = optuna.study.MaxTrialsCallback(target, states=(*FINISHED_STATES, TrialState.RUNNING))
    status = "KILLED"
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        progress.study_started(study.name, done=done, target=target)
        optuna_study.optimize(
            objective,
            n_trials=target - done,
            timeout=timeout,
            catch=(Exception,),
            callbacks=[stop_on, objective.after_trial],
            gc_after_trial=True,
        )
        status = "FINISHED"
    except Exception:
        status = "FAILED"  # the sweep itself broke; Ctrl-C and SIGTERM leave it KILLED
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        tracker.close(optuna_study, status=status)
    return RunSummary(
        ran=objective.ran, finished=finished_count(optuna_study), target=target, best=best_trial(optuna_study)
    )


def _raise_interrupt(signum, frame):
    # A plain kill (SIGTERM) unwinds like Ctrl-C, so the running trial and the parent run are closed.
    raise KeyboardInterrupt


class Objective:
    """One trial: sample, distill, report each evaluation to the pruner, mirror it in MLflow."""

    def __init__(self, study: StudyConfig, workspace, tracker, progress: SweepProgress):
        self.study = study
        self.workspace = workspace
        self.tracker = tracker
        self.progress = progress
        self.ran = 0

    def __call__(self, trial: optuna.Trial) -> float:
        params = suggest(trial, self.study.search)
        trial.set_user_attr("params", params)
        run = self.tracker.start_trial(trial, params)
        mass = self.workspace.topk_mass(params)  # None when the teacher runs online
        if mass is not None:
            trial.set_user_attr("topk_mass", mass)  # the report warns when top_k keeps little
            run.log_metrics({"topk_mass": mass}, step=0)
        self.progress.trial_started(trial.number, params, self.study.train.max_steps)

        def on_eval(step: int, metrics: dict[str, float]) -> None:
            run.log_metrics(metrics, step=step)
            run.flush()
            value = objective_value(self.study, metrics)
            if value != value or value == float("inf"):
                raise TrainingDiverged(f"{self.study.objective} is {value} at step {step}")
            trial.report(value, step)
            if trial.should_prune():
                trial.set_user_attr("pruned_step", step)
                raise optuna.TrialPruned(f"pruned at step {step}: {self.study.objective} {value:.4g}")

        def on_log(log) -> None:
            if log.loss != log.loss:
                raise TrainingDiverged(f"the training loss is NaN at step {log.step}")
            run.log_step(log)
            self.progress.step(log)

        trained = {}  # save_best: the trained student, until the trial is scored
        callbacks = {"on_log": on_log, "on_eval": on_eval}
        if self.study.save_best:
            callbacks["on_trained"] = lambda student: trained.update(student=student)
        try:
            with active_trial(self.study.name, trial.number, run.run_id):  # tags runs that user code starts
                result = self.workspace.distill(params, **callbacks)
            return self._complete(trial, run, result, student=trained.pop("student", None))
        except optuna.TrialPruned as exc:
            run.end("KILLED", state="PRUNED", reason=str(exc))
            raise
        except KeyboardInterrupt:
            run.end("KILLED", state="INTERRUPTED", reason="interrupted (Ctrl-C or SIGTERM)")
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}".strip()
            trial.set_user_attr("fail_reason", reason.splitlines()[0][:500])
            run.end("FAILED", state="FAIL", reason=reason, traceback=traceback.format_exc())
            raise

    def _complete(self, trial: optuna.Trial, run, result, *, student) -> float:
        """A finished distillation: its results on the trial, its final metrics (and model, if
        it is the best so far) on its run, which ends FINISHED. Returns the objective."""
        value = objective_value(self.study, result.final_eval)
        trial.set_user_attr("duration_s", result.seconds)
        trial.set_user_attr("peak_memory_mb", result.peak_memory_bytes / 2**20)
        for key, metric in result.final_eval.items():
            trial.set_user_attr(key, metric)
        save_model = self._model_saver(trial, value, student)
        run.finish(result, objective=value, save_model=save_model)
        if save_model is not None:
            self.tracker.keep_best_model()
        return value

    def _model_saver(self, trial: optuna.Trial, value: float, student):
        """``save_best``: a trial better than every complete one so far saves its student
        (weights and tokenizer); ``tracker.keep_best_model`` then deletes the one it beat."""
        best = best_trial(trial.study)
        if student is None or (best is not None and best.value <= value):
            return None
        tokenizer = self.workspace.tokenizer

        def save(folder: str) -> None:
            student.save_pretrained(folder)
            tokenizer.save_pretrained(folder)

        return save

    def after_trial(self, optuna_study: optuna.Study, trial: FrozenTrial) -> None:
        self.ran += 1
        best = best_trial(optuna_study)
        self.tracker.record_best(best)
        self.progress.trial_finished(trial, best)


def load_existing_study(study: StudyConfig) -> optuna.Study:
    """The study as stored, for reading; a study that was never run is a usage error, and
    reading never creates a database."""
    url = study.storage_url
    if url.startswith("sqlite:///") and not _sqlite_exists(url):
        raise UsageError(f"no Optuna storage at {url}: run `kdsweep run` on this study first (or set storage)")
    try:
        return optuna.load_study(study_name=study.name, storage=url)
    except KeyError:
        raise UsageError(f"no study named {study.name!r} in {url}: run `kdsweep run` on it first") from None


def _sqlite_exists(url: str) -> bool:
    from pathlib import Path

    path = url.removeprefix("sqlite:///")
    return path == ":memory:" or Path(path).exists()
