"""Trials whose worker died, and retries: which process runs each trial, failing the trials of
dead workers, queueing a trial to run again, and which trial retries which.

Every running trial records its worker: host, process id and the process's start time (a
process id alone may have been reused). A ``kdsweep run`` on the same host fails, at start,
every RUNNING trial whose process is gone, and retries it once with the same parameters
(:func:`retry_once`), so a ``kill -9`` followed by the same command resumes at once. Trials of
workers on other hosts are left to Optuna's heartbeat, which fails them after its grace period
and calls :func:`retry_once` too (the sweep opens its storage with it). A trial that ran out of
memory is retried by the objective with a smaller micro-batch (:func:`enqueue_retry`), and a
preempted one (SIGTERM, ``preemption``) by the objective too, to resume from its checkpoint.
"""

from __future__ import annotations

import os
import socket

import optuna
import psutil
from optuna.trial import FrozenTrial, TrialState

from kdsweep.compat.optuna import fail_trial
from kdsweep.names import StudyAttr, TrialAttr
from kdsweep.store.storage import set_user_attr_once

# What a retry keeps of the trial it runs again: its group, what makes it a baseline or a seed
# check, and an out-of-memory retry's smaller batch.
INHERITED_ATTRS = (
    TrialAttr.GROUP,
    TrialAttr.BASELINE,
    TrialAttr.BASELINE_PARAMS,
    TrialAttr.SEED_CHECK_OF,
    TrialAttr.CONTROL_OF,
    TrialAttr.SEED,
    TrialAttr.MICRO_BATCH,
    TrialAttr.GRAD_ACCUM,
)


def retry_once(optuna_study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a trial whose worker died to run again with its parameters, once (a retry that dies
    is not retried, unless it was a preempted trial's: preemption is no fault of the trial's).
    The retry goes on from the trial's resume checkpoint, if it wrote one (``objective``).
    Called for a dead worker on this host (:func:`fail_dead_trials`) and, as Optuna's heartbeat
    callback, for one on another host.

    Optuna's own ``RetryHeartbeatStaleTrialCallback`` copies the trial with the distributions its
    parameters were suggested from, and so rejects a baseline's alpha of 0, fixed outside the
    searched range; an enqueued trial takes its values as they are.
    """
    attrs = trial.user_attrs
    if TrialAttr.RETRY_OF not in attrs or attrs.get(TrialAttr.AFTER_PREEMPTION):
        enqueue_retry(optuna_study, trial, {TrialAttr.RETRY_OF: trial.number})


def enqueue_retry(
    optuna_study: optuna.Study, trial: FrozenTrial | optuna.Trial, marks: dict
) -> None:
    """Queue ``trial`` to run again: its parameters, what it inherits (`INHERITED_ATTRS`), and
    ``marks`` (which trial it retries, and how it differs)."""
    attrs = {k: v for k, v in trial.user_attrs.items() if k in INHERITED_ATTRS}
    optuna_study.enqueue_trial(trial.params, user_attrs=attrs | marks)


def worker_id() -> str:
    """This process, as a compare-and-set claim names it: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def this_worker() -> dict:
    """Host, process id and process start time of the current process."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": psutil.Process().create_time(),
    }


def is_gone(worker: dict) -> bool:
    """A worker on this host whose process no longer runs (or whose id another process took).
    A worker on another host is never judged from here."""
    if worker.get("host") != socket.gethostname():
        return False
    try:
        return psutil.Process(worker["pid"]).create_time() != worker.get("started")
    except (psutil.NoSuchProcess, KeyError, TypeError):
        return True


def fail_dead_trials(optuna_study: optuna.Study) -> list[tuple[FrozenTrial, str]]:
    """Fail every RUNNING trial whose worker on this host is gone, retrying each once.

    Returns the failed trials with the reason recorded on them.
    """
    failed = []
    me = this_worker()
    for trial in optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(TrialAttr.WORKER)
        if not worker or not is_gone(worker):
            continue
        # Of several workers starting together, one claims the dead trial (compare-and-set).
        if (
            set_user_attr_once(optuna_study, f"{StudyAttr.RECOVERED_PREFIX}{trial.number}", me)
            != me
        ):
            continue
        retry_once(optuna_study, trial)  # its params and user attrs, into a waiting trial
        reason = f"its worker (process {worker['pid']} on {worker['host']}) died while it ran"
        fail_trial(optuna_study, trial, TrialAttr.FAIL_REASON, reason)
        failed.append((trial, reason))
    return failed
