"""Which process runs each trial, and what happens to trials whose process died.

Every running trial records its worker: host, process id and the process's start time (a
process id alone may have been reused). A ``kdsweep run`` on the same host fails, at start,
every RUNNING trial whose process is gone, and retries it once with the same parameters
(``storage.retry_once``), so a ``kill -9`` followed by the same command
resumes at once. Trials of workers on other hosts are left to Optuna's heartbeat, which fails
them after its grace period and retries them the same way (``storage.open_storage``).
"""

from __future__ import annotations

import os
import socket

import optuna
import psutil
from optuna.trial import FrozenTrial, TrialState

from kdsweep.names import StudyAttr, TrialAttr
from kdsweep.storage import retry_once, set_user_attr_once


def this_worker() -> dict:
    """Host, process id and process start time of the current process."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


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
        if set_user_attr_once(optuna_study, f"{StudyAttr.RECOVERED_PREFIX}{trial.number}", me) != me:
            continue
        retry_once(optuna_study, trial)  # its params and user attrs, into a waiting trial
        reason = f"its worker (process {worker['pid']} on {worker['host']}) died while it ran"
        storage = optuna_study._storage
        storage.set_trial_user_attr(trial._trial_id, TrialAttr.FAIL_REASON, reason)
        storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        failed.append((trial, reason))
    return failed

