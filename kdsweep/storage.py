"""The Optuna storage: opening it, the first-use lock, the compare-and-set user attr, reading it.

A study's storage is shared by every worker on every machine (a SQLite file on one machine, a
PostgreSQL server for many). Reading commands (``report``, ``status``) never create a store.
Imports Optuna and SQLAlchemy, never torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
from filelock import FileLock
from optuna.storages._rdb.models import StudyUserAttributeModel
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import IntegrityError

from kdsweep.config import StudyConfig
from kdsweep.errors import UsageError
from kdsweep.paths import sqlite_file, store_missing

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 120  # a RUNNING trial whose worker was silent this long is failed by the next worker


@contextmanager
def first_use_lock(url: str) -> Iterator[None]:
    """Hold an exclusive lock on a local SQLite store while a process opens it.

    Optuna and MLflow create or migrate a store's tables the first time they open it, and two
    workers doing so at the same moment break each other's migration ("table already exists").
    A SQLite file is shared only by processes on one machine, so a lock file beside it serialises
    that first contact (SQLite's own locks are of another kind and are not affected). Server
    databases (PostgreSQL, MySQL) are left to their own transactions.
    """
    path = sqlite_file(url)
    if path is None:
        yield
        return
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(f".{path.name}.lock")):
        yield


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The storage at ``url``, its tables created on first use.

    The heartbeat lets any worker mark a killed worker's trial FAIL instead of RUNNING forever.
    """
    with first_use_lock(url):  # workers starting together must not create the tables twice
        return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS)


def load_existing_study(study: StudyConfig) -> optuna.Study:
    """The study as stored, for reading; a study that was never run is a usage error, and
    reading never creates a database."""
    name, url = study.name, study.storage_url
    if store_missing(url):
        raise UsageError(f"no Optuna storage at {url}: run `kdsweep run` on this study first (or set storage)")
    try:
        return optuna.load_study(study_name=name, storage=url)
    except KeyError:
        raise UsageError(f"no study named {name!r} in {url}: run `kdsweep run` on it first") from None


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


def finished_count(optuna_study: optuna.Study) -> int:
    return len(optuna_study.get_trials(deepcopy=False, states=FINISHED_STATES))


def best_trial(optuna_study: optuna.Study) -> FrozenTrial | None:
    """The best complete trial in the study's own direction; ties go to the earlier trial."""
    complete = optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    sign = 1 if optuna_study.direction == optuna.study.StudyDirection.MINIMIZE else -1
    return min(complete, key=lambda t: (sign * t.value, t.number))
