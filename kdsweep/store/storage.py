"""The Optuna storage: opening it, the first-use lock, the compare-and-set user attr, reading it.

A study's storage is shared by every worker on every machine (a SQLite file on one machine, a
PostgreSQL server for many). Reading commands (``report``, ``status``) never create a store.
Imports Optuna and SQLAlchemy, never torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import sqlalchemy
from filelock import FileLock
from optuna.trial import FrozenTrial

from kdsweep.compat.optuna import insert_user_attr_once
from kdsweep.errors import UsageError, first_line
from kdsweep.paths import sqlite_file, store_missing
from kdsweep.redact import redact
from kdsweep.study.config import StudyConfig

HEARTBEAT_SECONDS = 30
# A RUNNING trial whose worker was silent this long is failed by the next worker.
GRACE_SECONDS = 120


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


def open_storage(
    url: str, *, on_stale_trial: Callable[[optuna.Study, FrozenTrial], None] | None = None
) -> optuna.storages.RDBStorage:
    """The storage at ``url``, its tables created on first use.

    The heartbeat lets any worker mark a killed worker's trial FAIL instead of RUNNING forever,
    and call ``on_stale_trial`` for it (``recovery.retry_once``). A missing driver or a server
    that does not let us in is a :class:`UsageError` (see :func:`check_storage`), not Optuna's
    "Failed to import DB access module".
    """
    # workers starting together must not create the tables twice
    with (
        first_use_lock(url),
        _storage_errors(url),
    ):
        for pause in (0.2, 0.5, 1.0):
            try:
                return _rdb_storage(url, on_stale_trial)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # Workers creating a new server database's tables at once: the losers of the race
                # see "duplicate key value violates unique constraint" or "relation already
                # exists". The winner's tables are there for the next attempt to find.
                time.sleep(pause)
        return _rdb_storage(url, on_stale_trial)


def _rdb_storage(url: str, on_stale_trial) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(
        url,
        heartbeat_interval=HEARTBEAT_SECONDS,
        grace_period=GRACE_SECONDS,
        heartbeat_stale_trial_callback=on_stale_trial,
    )


CONNECT_TIMEOUT_SECONDS = 10  # a wrong host is reported in seconds, not after TCP's two minutes

# The module SQLAlchemy imports for a URL's driver -> what to pip install for it. A plain
# postgresql:// imports psycopg2 up to SQLAlchemy 2.0 and psycopg from 2.1 on: the extra has both.
_DRIVER_PACKAGES = {
    "psycopg2": '"kdsweep[postgres]"',
    "psycopg": '"kdsweep[postgres]"',
    "MySQLdb": "mysqlclient",
    "pymysql": "PyMySQL",
}
# The connect timeout argument of the drivers that take one, by SQLAlchemy's driver name.
_TIMEOUT_ARGS = {
    "psycopg2": "connect_timeout",
    "psycopg": "connect_timeout",
    "mysqldb": "connect_timeout",
    "pymysql": "connect_timeout",
    "pg8000": "timeout",
}


def check_storage(url: str) -> None:
    """Raise :class:`UsageError` unless the server storage at ``url`` can be used: its driver
    imports, and the server answers and lets this user into this database.

    ``kdsweep run`` calls it before it writes anything or loads a model, so a bad ``storage``
    costs seconds, not a model load, and leaves nothing behind. A SQLite URL is left alone: the
    file is created by the first write, and there is nothing to reach before that.
    """
    with _storage_errors(url):
        parsed = sqlalchemy.make_url(url)
        if parsed.get_backend_name() == "sqlite":
            return
        timeout = _TIMEOUT_ARGS.get(parsed.get_driver_name())
        engine = sqlalchemy.create_engine(
            parsed, connect_args={timeout: CONNECT_TIMEOUT_SECONDS} if timeout else {}
        )
        try:
            engine.connect().close()
        finally:
            engine.dispose()


@contextmanager
def _storage_errors(url: str) -> Iterator[None]:
    """A bad storage URL, a missing driver or an unreachable server as one line that names the
    key and the fix, the URL's password masked (a driver's message may quote the URL)."""
    try:
        yield
    except ImportError as exc:  # Optuna re-raises the driver's ImportError as its own
        raise UsageError(
            _missing_driver(url, exc.__cause__ if isinstance(exc.__cause__, ImportError) else exc)
        ) from None
    except sqlalchemy.exc.NoSuchModuleError:
        scheme = url.split(":", 1)[0]
        raise UsageError(
            f"storage: SQLAlchemy knows no database {scheme!r} in {redact(url)}; write e.g. "
            "postgresql://USER:PASSWORD@HOST:5432/DB (not postgres://) or sqlite:///kdsweep.db"
        ) from None
    except sqlalchemy.exc.ArgumentError:
        raise UsageError(
            f"storage: {redact(url)} is not a database URL; write e.g. "
            "postgresql://USER:PASSWORD@HOST:5432/DB "
            "or sqlite:///kdsweep.db"
        ) from None
    except sqlalchemy.exc.DBAPIError as exc:
        if url.startswith("sqlite"):
            raise  # a local file's problems are not a server's; leave them as they were
        raise UsageError(_unreachable(url, exc)) from None


def _missing_driver(url: str, exc: ImportError) -> str:
    module = exc.name or sqlalchemy.make_url(url).get_driver_name()
    package = _DRIVER_PACKAGES.get(module, module)
    return (
        f"storage: {redact(url)} needs the database driver {module}, which does not import "
        f"({first_line(exc)}): pip install {package}"
    )


def _unreachable(url: str, exc: sqlalchemy.exc.DBAPIError) -> str:
    reason = first_line(exc.orig if exc.orig is not None else exc)
    if "does not exist" in reason:
        fix = "create that database on the server (e.g. createdb), or name an existing one"
    elif "authentication" in reason or "password" in reason or "Access denied" in reason:
        fix = "fix the user or password"
    else:
        fix = "start the server, or fix the host and port"
    return (
        f"storage: cannot connect to {redact(url)} ({reason}); {fix} in storage (the "
        "study file, or --set storage=...)"
    )


def load_existing_study(study: StudyConfig) -> optuna.Study:
    """The study as stored, for reading; a study that was never run is a usage error, and
    reading never creates a database."""
    name, url = study.name, study.storage_url
    if store_missing(url):
        raise UsageError(
            f"no Optuna storage at {url}: run `kdsweep run` on this study first (or set storage)"
        )
    try:
        with _storage_errors(url):
            return optuna.load_study(study_name=name, storage=url)
    except KeyError:
        raise UsageError(
            f"no study named {name!r} in {url}: run `kdsweep run` on it first"
        ) from None


def set_user_attr_once(optuna_study: optuna.Study, key: str, value) -> object:
    """Store ``value`` as the study's user attr ``key`` unless one is there; return the stored one.

    A compare-and-set for workers racing to create the same thing (the MLflow parent run): the
    storage keeps the first value written, across processes and machines (SQLite, PostgreSQL,
    MySQL). ``Study.set_user_attr`` would overwrite instead.
    """
    stored = optuna_study.user_attrs.get(key)
    if stored is not None:
        return stored
    insert_user_attr_once(optuna_study, key, value)
    return optuna_study.user_attrs[key]
