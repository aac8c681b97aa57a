"""Optuna: the study and its run, from the first trial to the seed check.

``run`` prepares everything a trial shares (tokenizer, data, teacher, eval set) before it opens
the Optuna study or the MLflow runs, so bad input stops it with nothing written. Then it runs
the sweep (baselines first) until the study holds ``n_trials`` finished trials, and then the seed
check (``seed_check``). Running it again continues the same study; other processes may run it at
the same time, and share both phases.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from kdsweep.distill import preemption
from kdsweep.errors import UsageError
from kdsweep.mlflow.study_runs import StudyRuns
from kdsweep.names import Group, Metric, StudyAttr, TrialAttr
from kdsweep.prepare import references
from kdsweep.prepare.trial_runner import TrialRunner
from kdsweep.progress import SweepProgress
from kdsweep.store import cost
from kdsweep.store.recovery import fail_dead_trials, retried, retry_once, worker_id
from kdsweep.store.storage import (
    FINISHED_STATES,
    best_trial,
    check_storage,
    compared_baseline,
    group_of,
    open_storage,
    ranked_trials,
    set_user_attr_once,
)
from kdsweep.study.config import StudyConfig
from kdsweep.study.space import baseline_trials
from kdsweep.sweep.finalists import finalists, run_finals
from kdsweep.sweep.objective import Objective
from kdsweep.sweep.samplers import make_pruner, make_sampler

SEED_CHECK_POLL_SECONDS = 5.0  # how often a worker looks whether the last sweep trials have ended


@dataclass(frozen=True)
class RunSummary:
    ran: int  # trials this call ran, seed-check trials included
    finished: int  # finished sweep trials the study holds (seed-check trials not counted)
    target: int
    best: FrozenTrial | None


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
) -> RunSummary:
    """Run trials until the study holds ``n_trials`` finished ones (or ``timeout`` passes), then
    the seed check. ``runner`` trains each trial (default: ``TrialRunner.prepare(study)``)."""
    progress = progress or SweepProgress()
    target = n_trials or study.n_trials
    check_storage(study.storage_url)  # a bad storage URL costs seconds, not a model load
    preparing = time.perf_counter()
    # raises UsageError before anything is written
    runner = runner or TrialRunner.prepare(study, progress=progress)
    optuna_study = open_study(study)
    for trial, reason in fail_dead_trials(optuna_study):
        progress.message(
            f"trial {trial.number} failed: {reason}; it is retried once with the same parameters"
        )
    done = sweep_count(optuna_study, FINISHED_STATES)
    if (
        done >= target
        and seed_check_done(optuna_study, study)
        and finals_done(study, optuna_study)
    ):
        progress.message(
            f"study {study.name!r} already holds {done} finished trials (target {target}): "
            "nothing to do"
        )
        return RunSummary(ran=0, finished=done, target=target, best=best_trial(optuna_study))

    baselines = len(baseline_trials(study.search, study.baselines))
    if baselines and target <= baselines:
        progress.message(
            f"warning: the {target} trials asked for are all baselines (the study has "
            f"{baselines}), so no distilled trial runs and the report has no verdict; ask for at "
            f"least {baselines + 1} (--n-trials {baselines + 1})"
        )
    runs = attach_tracking(study, optuna_study, runner, progress)
    _record_preparation(optuna_study, runner, time.perf_counter() - preparing)
    objective = Objective(study=study, runner=runner, runs=runs, progress=progress)
    deadline = None if timeout is None else time.monotonic() + timeout
    status = "KILLED"
    restore = _Interrupts().install()
    try:
        progress.study_started(study.name, done=done, target=target)
        if done < target:
            enqueue_baselines(optuna_study, study)
            # No trial count of Optuna's own: retries (a dead worker's, an out-of-memory one)
            # replace
            # the trials they retry, and the study stops when it holds its target.
            optimize(
                optuna_study,
                objective,
                n_trials=None,
                deadline=deadline,
                stop=_StopAtTarget(target),
            )
        if not _past(deadline):
            run_finals(study, optuna_study, runner, runs, progress, deadline=deadline)
        if study.seed_check.top and not _past(deadline):
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
    finished = sweep_count(optuna_study, FINISHED_STATES)
    return RunSummary(
        ran=objective.ran, finished=finished, target=target, best=best_trial(optuna_study)
    )


def optimize(
    optuna_study: optuna.Study,
    objective: Objective,
    *,
    n_trials: int | None,
    deadline: float | None,
    stop=None,
) -> None:
    """Optuna's loop: a failed trial does not stop it; the trial's state is told to the study."""
    callbacks = [objective.after_trial] + ([stop] if stop else [])
    timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
    # Ctrl-C and SIGTERM wait for a step's or a trial's end (after_trial checks), never cutting a
    # trial's write to the storage in half.
    with preemption.deferred():
        optuna_study.optimize(
            objective,
            n_trials=n_trials,
            timeout=timeout,
            catch=(Exception,),
            callbacks=callbacks,
            gc_after_trial=True,
        )
    preemption.raise_if_requested()  # asked as the last trial ended


def sweep_count(optuna_study: optuna.Study, states) -> int:
    """Trials of the sweep (baselines included; seed-check trials and trials a retry replaces
    not) in ``states``."""
    trials = optuna_study.get_trials(deepcopy=False)
    replaced = retried(trials)
    return sum(
        t.state in states and group_of(t) != Group.SEED_CHECK and t.number not in replaced
        for t in trials
    )


class _StopAtTarget:
    """Stop once finished and running sweep trials reach the target: with several workers,
    each running one, the study ends at exactly the target."""

    def __init__(self, target: int):
        self.target = target

    def __call__(self, optuna_study: optuna.Study, trial: FrozenTrial) -> None:
        if sweep_count(optuna_study, (*FINISHED_STATES, TrialState.RUNNING)) >= self.target:
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
        optuna_study.set_user_attr(StudyAttr.CONFIG, study.to_dict())
        optuna_study.set_user_attr(StudyAttr.FINGERPRINT, study.fingerprint())
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


def _record_preparation(optuna_study: optuna.Study, runner: TrialRunner, seconds: float) -> None:
    """This worker's preparation (models, data, references), and the teacher cache's build on
    its own (whoever built it: this worker, another, ``kdsweep cache``)."""
    cost.record(optuna_study, cost.PREPARATION, seconds - runner.teacher.built_seconds)
    if runner.teacher.cached:
        optuna_study.set_user_attr(StudyAttr.TEACHER_CACHE_SECONDS, runner.teacher.cache_seconds)


def _cost_metrics(spent: cost.StudyCost) -> dict[str, float]:
    return {
        Metric.DEVICE_SECONDS: spent.total,
        Metric.TEACHER_CACHE_SECONDS: spent.teacher_cache,
    }


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


# ---------------------------------------------------------------- the seed check


def seed_check_jobs(
    optuna_study: optuna.Study, study: StudyConfig
) -> list[tuple[int, int]] | None:
    """(trial, seed) of every seed-check run: the best ``seed_check.top`` distilled trials and the
    best baseline, each with ``seed_check.seeds`` other seeds. None while sweep trials still run.

    Every worker that finds the sweep over computes the same jobs from the same trials; the
    study keeps them. A continued study (a larger ``--n-trials``) keeps its earlier jobs and adds
    those of its new best configurations; each job runs once (``run_seed_check`` claims it)."""
    if sweep_count(optuna_study, (TrialState.RUNNING, TrialState.WAITING)):
        return None
    stored = [tuple(job) for job in optuna_study.user_attrs.get(StudyAttr.SEED_CHECK_JOBS, [])]
    ranked = ranked_trials(optuna_study)
    distilled = [t for t in ranked if not t.user_attrs.get(TrialAttr.BASELINE)][
        : study.seed_check.top
    ]
    baseline = compared_baseline(ranked)
    baselines = [baseline] if baseline is not None else []
    seeds = [study.train.seed + k for k in range(1, study.seed_check.seeds + 1)]
    wanted = [(t.number, seed) for t in distilled + baselines for seed in seeds]
    jobs = stored + [job for job in wanted if job not in stored]
    if jobs != stored or StudyAttr.SEED_CHECK_JOBS not in optuna_study.user_attrs:
        optuna_study.set_user_attr(StudyAttr.SEED_CHECK_JOBS, [list(job) for job in jobs])
    return jobs


def finals_done(study: StudyConfig, optuna_study: optuna.Study) -> bool:
    """Whether every finalist and the teacher have test scores (or the study has no test split)."""
    if study.data.test_split is None:
        return True
    attrs = optuna_study.user_attrs
    scored = all(
        f"{StudyAttr.TEST_PREFIX}{t.number}" in attrs for t in finalists(study, optuna_study)
    )
    return scored and StudyAttr.TEST_TEACHER_PPL in attrs


def seed_check_done(optuna_study: optuna.Study, study: StudyConfig) -> bool:
    """Whether every seed-check run the study's trials call for has been claimed."""
    if not study.seed_check.top:
        return True
    jobs = seed_check_jobs(optuna_study, study)
    attrs = optuna_study.user_attrs  # a storage read, and a copy, each time it is asked
    return jobs is not None and all(_job_key(*job) in attrs for job in jobs)


def run_seed_check(
    optuna_study: optuna.Study,
    study: StudyConfig,
    objective: Objective,
    progress: SweepProgress,
    *,
    deadline: float | None,
) -> None:
    """Run the seed-check trials, each once across all workers: a worker claims a job (a
    compare-and-set on the study), enqueues it with every parameter fixed, and runs one trial."""
    while (jobs := seed_check_jobs(optuna_study, study)) is None:
        if _past(deadline):
            return
        time.sleep(SEED_CHECK_POLL_SECONDS)  # the last sweep trials of other workers are running
    if jobs:
        progress.message(
            f"seed check: {len(jobs)} runs of the best configurations with other seeds"
        )
    trials = {t.number: t for t in optuna_study.get_trials(deepcopy=False)}
    for number, seed in jobs:
        if _past(deadline):
            return
        if set_user_attr_once(optuna_study, _job_key(number, seed), worker_id()) != worker_id():
            continue  # another worker has it
        original = trials[number]
        attrs = {
            TrialAttr.GROUP: Group.SEED_CHECK,
            TrialAttr.SEED_CHECK_OF: number,
            TrialAttr.SEED: seed,
            TrialAttr.BASELINE: bool(original.user_attrs.get(TrialAttr.BASELINE)),
            TrialAttr.BASELINE_PARAMS: original.user_attrs.get(TrialAttr.BASELINE_PARAMS, {}),
        }
        optuna_study.enqueue_trial(original.params, user_attrs=attrs)
        optimize(optuna_study, objective, n_trials=1, deadline=None)


def _job_key(number: int, seed: int) -> str:
    return f"seed_check:{number}:{seed}"
