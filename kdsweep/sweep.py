"""Optuna: the study, its search space, the objective, pruning, failures and workers.

``run`` prepares everything a trial shares (tokenizer, data, teacher, eval set) before it opens
the Optuna study or the MLflow runs, so bad input stops it with nothing written. Running it again
continues the same study up to ``n_trials``; other processes may run it at the same time.
"""

from __future__ import annotations

import math
import signal
import traceback
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from kdsweep.config import StudyConfig
from kdsweep.errors import UsageError
from kdsweep.mlflow_plugin import active_trial
from kdsweep.names import Metric, StudyAttr, TrialAttr, better
from kdsweep.progress import SweepProgress
from kdsweep.space import SEARCH_SPACE, Param, grid
from kdsweep.storage import FINISHED_STATES, best_trial, finished_count, open_storage
from kdsweep.tracking import StudyTracker, TrialRun
from kdsweep.workspace import Workspace, prepare


class TrainingDiverged(RuntimeError):
    """The loss or the perplexity stopped being finite."""


# ---------------------------------------------------------------- study, sampler, pruner


def open_study(study: StudyConfig) -> optuna.Study:
    """Create the Optuna study, or load it when an earlier run or another worker made it."""
    optuna_study = optuna.create_study(
        study_name=study.name,
        storage=open_storage(study.storage_url),
        sampler=make_sampler(study),
        pruner=make_pruner(study),
        direction=study.direction,
        load_if_exists=True,
    )
    stored = optuna_study.direction.name.lower()
    if stored != study.direction:
        raise UsageError(
            f"objective: study {study.name!r} was created to {stored} its objective, but {study.objective} is "
            f"{study.direction}d; keep its objective or give the study a new name"
        )
    return optuna_study


def make_sampler(study: StudyConfig) -> optuna.samplers.BaseSampler:
    cfg = study.sampler
    if cfg.name == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    if cfg.name == "grid":
        return optuna.samplers.GridSampler(grid(study.search), seed=cfg.seed)
    return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.n_startup_trials)


def make_pruner(study: StudyConfig) -> optuna.pruners.BasePruner:
    cfg = study.pruner
    if cfg.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps)
    if cfg.name == "hyperband":
        train = study.train
        return optuna.pruners.HyperbandPruner(min_resource=train.eval_every, max_resource=train.max_steps)
    return optuna.pruners.NopPruner()


# ---------------------------------------------------------------- parameters of a trial


def suggest(trial: optuna.Trial, search) -> dict:
    """Every declared parameter of the trial: sampled, fixed by the study, or fixed by a baseline."""
    baseline = trial.user_attrs.get(TrialAttr.BASELINE_PARAMS, {})
    params = {}
    for p in SEARCH_SPACE:
        param: Param = getattr(search, p.name)
        if param.is_fixed:
            params[p.name] = baseline.get(p.name, param.value)
        elif param.choices is not None:
            params[p.name] = trial.suggest_categorical(p.name, list(param.choices))
        elif param.step is not None:
            params[p.name] = trial.suggest_float(p.name, param.low, param.high, step=param.step)
        else:
            params[p.name] = trial.suggest_float(p.name, param.low, param.high, log=param.log)
    return params


def enqueue_baselines(optuna_study: optuna.Study, study: StudyConfig) -> None:
    """Baseline trials (e.g. alpha 0: plain fine-tuning on the same budget) run first, once."""
    if optuna_study.user_attrs.get(StudyAttr.BASELINES_ENQUEUED):
        return
    for params in study.baselines:
        searched = {k: v for k, v in params.items() if not getattr(study.search, k).is_fixed}
        attrs = {TrialAttr.BASELINE: True, TrialAttr.BASELINE_PARAMS: dict(params)}
        optuna_study.enqueue_trial(searched, user_attrs=attrs)
    optuna_study.set_user_attr(StudyAttr.BASELINES_ENQUEUED, True)


# ---------------------------------------------------------------- the run


@dataclass(frozen=True)
class RunSummary:
    ran: int
    finished: int
    target: int
    best: FrozenTrial | None


def run(
    study: StudyConfig,
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    progress: SweepProgress | None = None,
) -> RunSummary:
    """Run trials until the study holds ``n_trials`` finished ones (or ``timeout`` passes)."""
    progress = progress or SweepProgress()
    target = n_trials or study.n_trials
    workspace = prepare(study, progress=progress)  # raises UsageError before anything is written
    optuna_study = open_study(study)
    done = finished_count(optuna_study)
    if done >= target:
        progress.message(f"study {study.name!r} already holds {done} finished trials (target {target}): nothing to do")
        return RunSummary(ran=0, finished=done, target=target, best=best_trial(optuna_study))

    tracker = attach_tracking(study, optuna_study, workspace)
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


def attach_tracking(study: StudyConfig, optuna_study: optuna.Study, workspace: Workspace) -> StudyTracker:
    """The study's MLflow side, its parent run showing the references: the first worker to
    reach a new study measures them and keeps them with the Optuna study for all the others."""
    if StudyAttr.UNTRAINED_PPL not in optuna_study.user_attrs:
        for key, value in workspace.references().items():
            optuna_study.set_user_attr(key, value)
        optuna_study.set_user_attr(StudyAttr.CONFIG, study.to_dict())
        optuna_study.set_user_attr(StudyAttr.FINGERPRINT, study.fingerprint())
    tracker = StudyTracker(study)
    tracker.attach(optuna_study, references=parent_metrics(optuna_study.user_attrs))
    tracker.use_data(workspace.train_split, workspace.eval_set)
    return tracker


def parent_metrics(attrs: dict) -> dict[str, float]:
    """The references as the parent run's metrics: perplexities, padding share, top-k mass."""
    keys = (StudyAttr.TEACHER_PPL, StudyAttr.UNTRAINED_PPL, StudyAttr.TRAIN_PADDING_SHARE)
    metrics = {key: float(attrs[key]) for key in keys}
    masses = attrs.get(StudyAttr.TOPK_MASS, {})
    return metrics | {f"{Metric.TOPK_MASS_PREFIX}{k}": float(mass) for k, mass in masses.items()}


def _raise_interrupt(signum, frame):
    # A plain kill (SIGTERM) unwinds like Ctrl-C, so the running trial and the parent run are closed.
    raise KeyboardInterrupt


class Objective:
    """One trial: sample, distill, report each evaluation to the pruner, mirror it in MLflow."""

    def __init__(self, study: StudyConfig, workspace: Workspace, tracker: StudyTracker, progress: SweepProgress):
        self.study = study
        self.workspace = workspace
        self.tracker = tracker
        self.progress = progress
        self.ran = 0

    def __call__(self, trial: optuna.Trial) -> float:
        params = suggest(trial, self.study.search)
        trial.set_user_attr(TrialAttr.PARAMS, params)
        run = self.tracker.start_trial(trial, params)
        mass = self.workspace.topk_mass(params)  # None when the teacher runs online
        if mass is not None:
            trial.set_user_attr(TrialAttr.TOPK_MASS, mass)  # the report warns when top_k keeps little
            run.log_metrics({Metric.TOPK_MASS: mass}, step=0)
        self.progress.trial_started(trial.number, params, self.study.train.max_steps)
        trained = {}  # save_best: the trained student, until the trial is scored
        on_trained = (lambda student: trained.update(student=student)) if self.study.save_best else None
        try:
            with active_trial(self.study.name, trial.number, run.run_id):  # tags runs that user code starts
                result = self.workspace.distill(
                    params, on_log=self._on_log(run), on_eval=self._on_eval(trial, run), on_trained=on_trained
                )
            return self._complete(trial, run, result, student=trained.pop("student", None))
        except optuna.TrialPruned as exc:
            run.end("KILLED", state="PRUNED", reason=str(exc))
            raise
        except KeyboardInterrupt:
            run.end("KILLED", state="INTERRUPTED", reason="interrupted (Ctrl-C or SIGTERM)")
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}".strip()
            trial.set_user_attr(TrialAttr.FAIL_REASON, reason.splitlines()[0][:500])
            run.end("FAILED", state="FAIL", reason=reason, traceback=traceback.format_exc())
            raise

    def _on_log(self, run: TrialRun):
        def on_log(log) -> None:
            if not math.isfinite(log.loss):
                raise TrainingDiverged(f"the training loss is {log.loss} at step {log.step}")
            run.log_step(log)
            self.progress.step(log)

        return on_log

    def _on_eval(self, trial: optuna.Trial, run: TrialRun):
        objective = self.study.objective

        def on_eval(step: int, metrics: dict[str, float]) -> None:
            run.log_metrics(metrics, step=step)
            run.flush()
            value = metrics[objective]
            if not math.isfinite(value):
                raise TrainingDiverged(f"{objective} is {value} at step {step}")
            trial.report(value, step)
            if trial.should_prune():
                trial.set_user_attr(TrialAttr.PRUNED_STEP, step)
                raise optuna.TrialPruned(f"pruned at step {step}: {objective} {value:.4g}")

        return on_eval

    def _complete(self, trial: optuna.Trial, run: TrialRun, result, *, student) -> float:
        """A finished distillation: its results on the trial, its final metrics (and model, if
        it is the best so far) on its run, which ends FINISHED. Returns the objective."""
        value = result.final_eval[self.study.objective]
        trial.set_user_attr(TrialAttr.DURATION_S, result.seconds)
        trial.set_user_attr(TrialAttr.PEAK_MEMORY_MB, result.peak_memory_bytes / 2**20)
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
        if student is None or (best is not None and not better(self.study.direction, value, best.value)):
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
