"""The seed check: after the sweep, the best configurations trained again with other seeds.

A sweep picks its winner as the best of many trials, each trained with one seed: part of the
winner's lead may be that seed's luck. So the ``seed_check.top`` best distilled configurations, the
baseline the verdict compares with and the winner's control are trained again with
``seed_check.seeds`` other seeds, every parameter fixed, in trials of their own group
(``names.Group.SEED_CHECK``) that feed no sampler and no pruner. The report compares the winner's
lead with the spread the seeds make.

Every worker that finds the sweep over computes the same jobs from the same trials; the study keeps
them. A continued study (a larger ``--n-trials``) keeps its earlier jobs and adds those of its new
best configurations; each job runs once across all workers (a worker claims it by a compare-and-set
on the study).
"""

from __future__ import annotations

import time

import optuna

from kdsweep.names import Group, StudyAttr, TrialAttr
from kdsweep.progress import SweepProgress
from kdsweep.store.recovery import worker_id
from kdsweep.store.storage import set_user_attr_once
from kdsweep.store.trials import Trials, is_baseline
from kdsweep.study.config import StudyConfig
from kdsweep.sweep.objective import Objective, optimize


def seed_check_jobs(
    optuna_study: optuna.Study, study: StudyConfig, trials: Trials
) -> list[tuple[int, int]]:
    """(trial, seed) of every seed-check run of the ended sweep ``trials``: the best
    ``seed_check.top`` distilled trials, the compared baseline and the winner's control, each
    with every other seed."""
    stored = [tuple(job) for job in optuna_study.user_attrs.get(StudyAttr.SEED_CHECK_JOBS, [])]
    baseline, control = trials.compared_baseline, trials.control(trials.best_distilled)
    checked = trials.distilled[: study.seed_check.top]
    checked += [run for run in (baseline, control) if run is not None]
    seeds = [study.train.seed + k for k in range(1, study.seed_check.seeds + 1)]
    wanted = [(t.number, seed) for t in checked for seed in seeds]
    jobs = stored + [job for job in wanted if job not in stored]
    if jobs != stored or StudyAttr.SEED_CHECK_JOBS not in optuna_study.user_attrs:
        optuna_study.set_user_attr(StudyAttr.SEED_CHECK_JOBS, [list(job) for job in jobs])
    return jobs


def seed_check_done(optuna_study: optuna.Study, study: StudyConfig) -> bool:
    """Whether every seed-check run the study's trials call for has been claimed (False while
    sweep trials run or wait)."""
    if not study.seed_check.top:
        return True
    trials = Trials.of(optuna_study)
    if trials.running or trials.queued:
        return False
    jobs = seed_check_jobs(optuna_study, study, trials)
    attrs = optuna_study.user_attrs  # a storage read, and a copy, each time it is asked
    return all(_job_key(*job) in attrs for job in jobs)


def run_seed_check(
    optuna_study: optuna.Study,
    study: StudyConfig,
    objective: Objective,
    progress: SweepProgress,
    *,
    deadline: float | None,
) -> None:
    """Run the seed check's trials of the ended sweep, each once across all workers: a worker
    claims a job, enqueues it with every parameter fixed, and runs one trial."""
    trials = Trials.of(optuna_study)
    jobs = seed_check_jobs(optuna_study, study, trials)
    if jobs:
        progress.message(
            f"seed check: {len(jobs)} runs of the best configurations with other seeds"
        )
    by_number = {t.number: t for t in trials.all}
    for number, seed in jobs:
        if deadline is not None and time.monotonic() >= deadline:
            return
        if set_user_attr_once(optuna_study, _job_key(number, seed), worker_id()) != worker_id():
            continue  # another worker has it
        original = by_number[number]
        attrs = {
            TrialAttr.GROUP: Group.SEED_CHECK,
            TrialAttr.SEED_CHECK_OF: number,
            TrialAttr.SEED: seed,
            TrialAttr.BASELINE: is_baseline(original),
            TrialAttr.BASELINE_PARAMS: original.user_attrs.get(TrialAttr.BASELINE_PARAMS, {}),
        }
        optuna_study.enqueue_trial(original.params, user_attrs=attrs)
        optimize(optuna_study, objective, n_trials=1, deadline=None)


def _job_key(number: int, seed: int) -> str:
    return f"seed_check:{number}:{seed}"
