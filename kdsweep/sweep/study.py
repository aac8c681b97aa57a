"""Optuna: the study and its run, from the first trial to the seed check.

``run`` prepares everything a trial shares (tokenizer, data, teacher, eval set) before it opens the
Optuna study or the MLflow runs, so bad input stops it with nothing written. Then it runs the sweep
(baselines first) until the study holds ``n_trials`` finished trials, and then the control
(``control``), the finals (``finalists``) and the seed check (``seed_check``). Running it again
continues the same study; other processes may run it at the same time, and share both phases.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from kdsweep.compat.optuna import fail_stale_trials
from kdsweep.distill import preemption
from kdsweep.errors import UsageError
from kdsweep.mlflow.study_runs import StudyRuns
from kdsweep.names import Metric, StudyAttr, TrialAttr
from kdsweep.prepare import references
from kdsweep.prepare.trial_runner import TrialRunner
from kdsweep.progress import SweepProgress
from kdsweep.store import cost
from kdsweep.store.recovery import fail_dead_trials, retry_once, worker_id
from kdsweep.store.storage import check_storage, open_storage, set_user_attr_once
from kdsweep.store.trials import FINISHED_STATES, Trials, is_baseline, params_of
from kdsweep.study.config import StudyConfig
from kdsweep.study.space import baseline_trials
from kdsweep.sweep.control import control_needed, run_control
from kdsweep.sweep.finalists import finals_done, run_finals
from kdsweep.sweep.objective import Objective, optimize
from kdsweep.sweep.samplers import make_pruner, make_sampler
from kdsweep.sweep.seed_check import run_seed_check, seed_check_done

POLL_SECONDS = 5.0  # how often a worker looks whether other workers' last trials have ended


@dataclass(frozen=True)
class StudySummary:
    """Where a study stands after a run: its best trial and where to find it."""

    study: str
    objectives: tuple[str, ...]  # the first decides the best trial
    directions: list[str]  # each objective's: "minimize" or "maximize"
    finished: int  # finished sweep trials the study holds (complete, pruned, failed)
    target: int
    ran: int = 0  # trials this call ran, seed-check runs included
    best_trial: int | None = None  # the best feasible trial by the first objective
    best_values: list[float] = field(default_factory=list)  # its value of each objective
    best_params: dict = field(default_factory=dict)
    best_run_id: str | None = None  # the best trial's MLflow run
    report: Path | None = None  # written after the run, by ``kdsweep run`` and ``run_study``

    @classmethod
    def read(
        cls, study: StudyConfig, optuna_study: optuna.Study, *, target: int, ran: int = 0
    ) -> StudySummary:
        """The summary the study's store gives now."""
        trials = Trials.of(optuna_study)
        best = trials.best
        return cls(
            study=study.name,
            objectives=study.objectives,
            directions=study.directions,
            finished=trials.count(FINISHED_STATES),
            target=target,
            ran=ran,
            best_trial=None if best is None else best.number,
            best_values=[] if best is None else list(best.values),
            best_params={} if best is None else dict(params_of(best)),
            best_run_id=None if best is None else best.user_attrs.get(TrialAttr.MLFLOW_RUN_ID),
        )


def open_study(study: StudyConfig) -> optuna.Study:
    """Create the Optuna study, or load it when an earlier run or another worker made it."""
    optuna_study = optuna.create_study(
        study_name=study.name,
        # another host's dead worker: retried
        storage=open_storage(study.storage_url, on_stale_trial=retry_once),
        sampler=make_sampler(study),
        pruner=make_pruner(study),
        directions=study.directions,
        load_if_exists=True,
    )
    stored = [d.name.lower() for d in optuna_study.directions]
    if stored != study.directions:
        raise UsageError(
            f"objective: study {study.name!r} was created to {', '.join(stored)} its "
            f"objectives, but {', '.join(study.objectives)} are to be "
            f"{', '.join(d + 'd' for d in study.directions)}; keep its objectives or give the "
            "study a new name"
        )
    return optuna_study


def run(
    study: StudyConfig,
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    progress: SweepProgress | None = None,
    runner: TrialRunner | None = None,
) -> StudySummary:
    """Run trials until the study holds ``n_trials`` finished ones (or ``timeout`` passes), then
    the finals and the seed check. ``runner`` trains each trial (default:
    ``TrialRunner.prepare(study)``)."""
    progress = progress or SweepProgress()
    target = n_trials or study.n_trials
    check_storage(study.storage_url)  # a bad storage URL costs seconds, not a model load
    # raises UsageError before anything is written
    runner = runner or TrialRunner.prepare(study, progress=progress)
    optuna_study = open_study(study)
    for trial, reason in fail_dead_trials(optuna_study):
        progress.message(
            f"trial {trial.number} failed: {reason}; it is retried once with the same parameters"
        )
    done = Trials.of(optuna_study).count(FINISHED_STATES)
    if done >= target and _after_sweep_done(study, optuna_study):
        progress.message(
            f"study {study.name!r} already holds {done} finished trials (target {target}): "
            "nothing to do"
        )
        return StudySummary.read(study, optuna_study, target=target)
    _warn_all_baselines(study, target, progress)
    _record_settings(optuna_study, study, target)
    attaching = time.perf_counter()
    runs = attach_tracking(study, optuna_study, runner, progress)
    _record_preparation(optuna_study, runner, time.perf_counter() - attaching)
    objective = Objective(study=study, runner=runner, runs=runs, progress=progress)
    deadline = None if timeout is None else time.monotonic() + timeout
    status = "KILLED"
    restore = _Interrupts().install()
    try:
        progress.study_started(study.name, done=done, target=target)
        if done < target:
            enqueue_baselines(optuna_study, study)
            # No trial count of Optuna's own: retries (a dead worker's, an out-of-memory one)
            # replace the trials they retry, and the study stops when it holds its target.
            optimize(optuna_study, objective, deadline=deadline, stop=_StopAtTarget(target))
        trials = sweep_ended(optuna_study, deadline)
        if trials is not None and not _queued_left(study, trials, progress):
            run_control(optuna_study, study, objective, progress)
            run_finals(study, optuna_study, trials, runner, runs, progress)
            if study.seed_check.top:
                run_seed_check(optuna_study, study, objective, progress, deadline=deadline)
        status = "FINISHED"
    except Exception:
        status = "FAILED"  # the sweep itself broke; Ctrl-C and SIGTERM leave it KILLED
        raise
    finally:
        spent = cost.study_cost(optuna_study, max_steps=study.train.max_steps)
        # step: the study's trial count, so the parent run draws the cost as trials are added
        trials = len(optuna_study.get_trials(deepcopy=False))
        runs.log_to_run(runs.parent_run_id, _cost_metrics(spent), step=trials)
        runs.close(optuna_study, status=status)
        restore()
    return StudySummary.read(study, optuna_study, target=target, ran=objective.ran)


def _after_sweep_done(study: StudyConfig, optuna_study: optuna.Study) -> bool:
    """Whether the control, the finals and the seed check have all been done for the study's
    trials as they stand."""
    return (
        control_needed(optuna_study, study) is None
        and finals_done(study, optuna_study)
        and seed_check_done(optuna_study, study)
    )


def sweep_ended(optuna_study: optuna.Study, deadline: float | None) -> Trials | None:
    """The study's trials once no sweep trial is running (other workers' last ones), or None when
    ``deadline`` passes first. Trials that are queued and not running are not waited for: no
    worker may be left to run them (``_queued_left``). A worker that died while it ran one is
    found by Optuna's heartbeat, which fails its trial after the storage's grace period."""
    while (trials := Trials.of(optuna_study)).running:
        if _past(deadline):
            return None
        time.sleep(POLL_SECONDS)
        fail_stale_trials(optuna_study)
    return trials


def _queued_left(study: StudyConfig, trials: Trials, progress: SweepProgress) -> bool:
    """Whether sweep trials are queued with no worker left to run them (a run asked for fewer
    trials than the baselines): the finals and the seed check wait for them, and the line says
    the command that runs them."""
    queued = trials.queued
    if not queued:
        return False
    names = ", ".join(f"{t.number}{' (a baseline)' if is_baseline(t) else ''}" for t in queued)
    total = trials.count(FINISHED_STATES) + len(queued)
    progress.message(
        f"trials {names} are queued and no worker runs them, so the finals and the seed check "
        f"wait: `kdsweep run {study.source} --n-trials {total}` runs them (and the rest)"
    )
    return True


def _warn_all_baselines(study: StudyConfig, target: int, progress: SweepProgress) -> None:
    baselines = len(baseline_trials(study.search, study.baselines))
    if baselines and target <= baselines:
        progress.message(
            f"warning: the {target} trials asked for are all baselines (the study has "
            f"{baselines}), so no distilled trial runs and the report has no verdict; ask for at "
            f"least {baselines + 1} (--n-trials {baselines + 1})"
        )


class _StopAtTarget:
    """Stop once finished and running sweep trials reach the target: with several workers,
    each running one, the study ends at exactly the target."""

    def __init__(self, target: int):
        self.target = target

    def __call__(self, optuna_study: optuna.Study, trial: FrozenTrial) -> None:
        running = (*FINISHED_STATES, TrialState.RUNNING)
        if Trials.of(optuna_study).count(running) >= self.target:
            optuna_study.stop()


def enqueue_baselines(optuna_study: optuna.Study, study: StudyConfig) -> None:
    """Baseline trials (e.g. alpha 0: plain fine-tuning on the same budget) run first, once."""
    if set_user_attr_once(optuna_study, StudyAttr.BASELINES_ENQUEUED, worker_id()) != worker_id():
        return  # another worker (or an earlier run) enqueued them
    for params, attrs in baseline_trials(study.search, study.baselines):
        optuna_study.enqueue_trial(params, user_attrs=attrs)


def attach_tracking(
    study: StudyConfig, optuna_study: optuna.Study, runner: TrialRunner, progress: SweepProgress
) -> StudyRuns:
    """The study's MLflow side, its parent run showing the references: the first worker to
    reach a new study measures them and keeps them with the Optuna study for all the others."""
    if StudyAttr.UNTRAINED_PPL not in optuna_study.user_attrs:
        measured = references.measure(
            study=study,
            inputs=runner.inputs,
            teacher=runner.teacher,
            eval_set=runner.eval_set,
            progress=progress,
        )
        for key, value in measured.items():
            optuna_study.set_user_attr(key, value)
    runs = StudyRuns(study)
    runs.attach(optuna_study, references=parent_metrics(optuna_study.user_attrs))
    runs.use_data(runner.inputs.train_split, runner.eval_set)
    return runs


_PARENT_METRICS = (
    StudyAttr.TEACHER_PPL,
    StudyAttr.UNTRAINED_PPL,
    StudyAttr.TRAIN_SCORED_TOKENS,
    StudyAttr.EVAL_SCORED_TOKENS,
    StudyAttr.TRAIN_PADDING_SHARE,
    StudyAttr.TEACHER_EXACT_MATCH,
    StudyAttr.TEACHER_ROUGE_L,
    StudyAttr.UNTRAINED_EXACT_MATCH,
    StudyAttr.UNTRAINED_ROUGE_L,
    StudyAttr.TEACHER_REASONING_TOKENS,
    StudyAttr.TEACHER_TRUNCATED_SHARE,
    StudyAttr.TRAIN_ANSWERS,
    StudyAttr.TRAIN_REASONED,
    StudyAttr.TRAIN_REASONING_TRAINED,
    StudyAttr.TRAIN_REASONING_LEFT_OUT,
    StudyAttr.TRAIN_REASONING_STRIPPED,
    StudyAttr.TRAIN_UNLIKE_GENERATION,
)


def parent_metrics(attrs: dict) -> dict[str, float]:
    """The references as the parent run's metrics: perplexities, accuracies, each split's scored
    tokens, padding, top-k mass."""
    metrics = {key: float(attrs[key]) for key in _PARENT_METRICS if key in attrs}
    masses = attrs.get(StudyAttr.TOPK_MASS, {})
    return metrics | {f"{Metric.TOPK_MASS_PREFIX}{k}": float(mass) for k, mass in masses.items()}


class _Interrupts:
    """Ctrl-C unwinds the run: the running trial ends INTERRUPTED at its step's end, the parent
    run is closed. SIGTERM (preemption) does the same after the trial writes its checkpoint
    (``preemption``). A second signal of either kind, while that waits, exits at once."""

    def __init__(self):
        self.seen = 0

    def install(self):
        preemption.reset()
        previous = {
            sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        return lambda: [signal.signal(sig, handler) for sig, handler in previous.items()]

    def _handle(self, signum, frame):
        self.seen += 1
        preempted = signum == signal.SIGTERM
        if self.seen > 1:
            os.write(2, b"kdsweep: interrupted again: exiting now\n")
            os._exit(preemption.EXIT_STATUS if preempted else 130)
        if preempted:
            os.write(2, b"kdsweep: SIGTERM: checkpointing the running trial (again: exit now)\n")
        else:
            os.write(2, b"kdsweep: interrupted: ending the running trial (again: exit now)\n")
        # A running trial stops at its step's end; outside trials this raises at once.
        preemption.request(preemption.PREEMPTED if preempted else preemption.INTERRUPTED)


def _record_settings(optuna_study: optuna.Study, study: StudyConfig, target: int) -> None:
    """The settings this run's trials run with, under their fingerprint (``store.settings``),
    and the target it asks for."""
    set_user_attr_once(
        optuna_study, f"{StudyAttr.CONFIG_PREFIX}{study.fingerprint()}", study.to_dict()
    )
    optuna_study.set_user_attr(StudyAttr.TARGET, target)


def _record_preparation(optuna_study: optuna.Study, runner: TrialRunner, attached: float) -> None:
    """This worker's preparation (inputs, the eval set, ``attached``: the references and MLflow),
    and the teacher caches' build on its own: what it took whichever of the study's processes
    built them (a worker, ``kdsweep cache``, the launcher); nothing when they were built for
    another study, which the study records."""
    cost.record(optuna_study, cost.PREPARATION, runner.seconds + attached)
    if seconds := runner.teacher.cache_seconds:
        optuna_study.set_user_attr(StudyAttr.TEACHER_CACHE_SECONDS, seconds)
    if reused := runner.teacher.reused_from:
        optuna_study.set_user_attr(StudyAttr.TEACHER_CACHE_REUSED, reused)


def _cost_metrics(spent: cost.StudyCost) -> dict[str, float]:
    return {
        Metric.DEVICE_SECONDS: spent.total,
        Metric.TEACHER_CACHE_SECONDS: spent.teacher_cache,
    }


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline
