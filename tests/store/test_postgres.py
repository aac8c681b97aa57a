"""Workers sharing a study through a PostgreSQL storage, and a bad server storage stopped early.

The server tests run two ``kdsweep run`` workers against the database named by
``KDSWEEP_TEST_POSTGRES`` (``postgresql://USER:PASSWORD@HOST:PORT/DB``, one the tests may write
to; ``.ci/run`` starts a server and sets it). Without it they skip, except where
``KDSWEEP_REQUIRE_POSTGRES=1`` (set by ``.ci/run``), where a missing server is a failure. The
tests of a missing driver and an unreachable server need no server and run everywhere.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import sqlalchemy

from kdsweep.names import StudyAttr, Tag
from kdsweep.store.storage import open_storage

from conftest import Child, child_env, isolate, mlflow_runs, write_tiny_study

TRIALS = 4


def postgres_url() -> str:
    """The test database's URL, or a skip (a failure where CI requires the server)."""
    url = os.environ.get("KDSWEEP_TEST_POSTGRES")
    if url:
        return url
    if os.environ.get("KDSWEEP_REQUIRE_POSTGRES") == "1":
        pytest.fail(
            "the PostgreSQL tests must run here: KDSWEEP_TEST_POSTGRES is not set (.ci/run sets "
            "it)"
        )
    pytest.skip(
        "KDSWEEP_TEST_POSTGRES is not set (postgresql://USER:PASSWORD@HOST:PORT/DB of a database "
        "to write to)"
    )


@dataclass(frozen=True)
class Sweep:
    study: Path  # the study file; its MLflow store and reports are in its folder
    name: str
    url: str
    codes: list[int]  # the workers' exit statuses, then the report's
    outputs: list[str]  # the workers' and the report's stdout and stderr


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_models, tiny_data) -> Sweep:
    """Two worker processes on one tiny study stored in PostgreSQL (a name of its own, as the
    database is shared), then ``kdsweep report`` on it. The Optuna study is deleted afterwards."""
    url = postgres_url()
    root = tmp_path_factory.mktemp("postgres")
    name = f"tiny-pg-{uuid.uuid4().hex[:8]}"
    study = write_tiny_study(root, tiny_models, tiny_data, name=name, n_trials=TRIALS)
    storage = ["--set", f"storage={url}"]
    try:
        # The per-test isolation of conftest, for the module.
        with pytest.MonkeyPatch.context() as patch:
            isolate(patch, root)
            workers = [
                Child(
                    "run",
                    str(study),
                    "--no-report",
                    "--set",
                    "train.max_steps=16",
                    *storage,
                    cwd=root,
                )
                for _ in range(2)
            ]
            codes = [worker.finish(timeout=600) for worker in workers]
            report = Child("report", str(study), *storage, cwd=root)
            codes.append(report.finish(timeout=300))
        yield Sweep(study, name, url, codes, [child.output for child in [*workers, report]])
    finally:
        try:
            optuna.delete_study(study_name=name, storage=url)
        except KeyError:
            pass  # the workers never created it


def test_workers_creating_the_tables_at_once_all_open_the_storage():
    """Six workers open a new server database together (a fresh schema stands for it): each
    creates Optuna's tables, and the losers of that race (PostgreSQL's "duplicate key value
    violates unique constraint") open the winner's tables instead of failing."""
    url = postgres_url()
    schema = f"race_{uuid.uuid4().hex[:8]}"
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text(f"CREATE SCHEMA {schema}"))
    at_once = threading.Barrier(6)

    def open_together(_) -> str:
        at_once.wait(timeout=60)
        try:
            open_storage(f"{url}?options=-csearch_path%3D{schema}")
            return ""
        except Exception as exc:  # noqa: BLE001 - the test reports every worker's failure
            return f"{type(exc).__name__}: {exc}"

    try:
        with ThreadPoolExecutor(6) as pool:
            assert [error for error in pool.map(open_together, range(6)) if error] == []
    finally:
        with engine.begin() as connection:
            connection.execute(sqlalchemy.text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()


@pytest.mark.slow
def test_two_workers_on_postgres_share_one_study_and_one_parent(swept):
    assert swept.codes == [0, 0, 0], "\n\n".join(swept.outputs)
    assert all(re.search(r"trial \d started", out) for out in swept.outputs[:2]), (
        "a worker ran no trial"
    )

    optuna_study = optuna.load_study(study_name=swept.name, storage=swept.url)
    trials = optuna_study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == [
        "COMPLETE"
    ] * TRIALS  # none RUNNING, none beyond the target
    _, parents, runs = mlflow_runs(swept.study, overrides=[f"storage={swept.url}"])
    assert len(parents) == 1 and sorted(runs) == list(range(TRIALS))
    assert parents[0].info.run_id == optuna_study.user_attrs[StudyAttr.PARENT_RUN_ID]
    assert {r.data.tags[Tag.PARENT] for r in runs.values()} == {parents[0].info.run_id}
    assert {r.info.status for r in [*parents, *runs.values()]} == {"FINISHED"}


@pytest.mark.slow
def test_the_storage_password_is_in_nothing_kdsweep_writes(swept, tmp_path):
    password = sqlalchemy.make_url(swept.url).password
    assert password and len(password) >= 8, (
        "KDSWEEP_TEST_POSTGRES needs a password of 8+ characters to search for"
    )
    assert swept.codes == [0, 0, 0], "\n\n".join(swept.outputs)

    places = {
        f"output of {label}": out
        for label, out in zip(["worker 1", "worker 2", "kdsweep report"], swept.outputs)
    }
    places |= mlflow_places(swept, tmp_path / "artifacts")
    places |= optuna_places(swept)
    # stores, reports, anything else
    places |= {f"file {path}": path.read_bytes() for path in files(swept.study.parent)}
    assert any(name.endswith("/study.yaml") for name in places), "the parent run has no study.yaml"
    assert any(
        name.startswith("file ") and name.endswith(f"{swept.name}.md") for name in places
    ), "no report written"
    leaks = [where for where, text in places.items() if _contains(text, password)]
    assert not leaks, f"the storage password is in: {leaks}"


def mlflow_places(sweep: Sweep, downloads: Path) -> dict[str, str | bytes]:
    """Each parent and trial run's params, tags and downloaded artifact files, by name."""
    client, parents, trials = mlflow_runs(sweep.study, overrides=[f"storage={sweep.url}"])
    places: dict[str, str | bytes] = {}
    for label, run in [("parent", parents[0]), *((f"trial {n}", r) for n, r in trials.items())]:
        places[f"{label} run params"] = json.dumps(run.data.params)
        places[f"{label} run tags"] = json.dumps(run.data.tags)
        folder = Path(
            client.download_artifacts(run.info.run_id, "", str(downloads / run.info.run_id))
        )
        for path in files(folder):
            places[f"{label} run artifact {path.relative_to(folder).as_posix()}"] = (
                path.read_bytes()
            )
    return places


def optuna_places(sweep: Sweep) -> dict[str, str]:
    """The Optuna study's user attrs, and each trial's user and system attrs, by name."""
    optuna_study = optuna.load_study(study_name=sweep.name, storage=sweep.url)
    places = {"Optuna study user attrs": json.dumps(optuna_study.user_attrs, default=str)}
    for trial in optuna_study.get_trials(deepcopy=False):
        places[f"Optuna trial {trial.number} attrs"] = json.dumps(
            [trial.user_attrs, trial.system_attrs], default=str
        )
    return places


def files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file())


def _contains(text: str | bytes, secret: str) -> bool:
    return secret.encode() in text if isinstance(text, bytes) else secret in text


# ---------------------------------------------------------------- a bad server storage, no server
# needed


# The drivers SQLAlchemy may import for postgresql:// (psycopg2 up to 2.0, psycopg from 2.1) made
# unimportable, as on a machine without the postgres extra.
WITHOUT_DRIVERS = (
    "import sys; sys.modules['psycopg'] = sys.modules['psycopg2'] = None; "
    "from kdsweep.cli import main; sys.exit(main(sys.argv[1:]))"
)


def run_cli(*args: str, cwd: Path, without_drivers: bool = False) -> subprocess.CompletedProcess:
    """``kdsweep ARGS`` in a process of its own, stdout and stderr apart, ended within 300 s."""
    command = ["-c", WITHOUT_DRIVERS] if without_drivers else ["-m", "kdsweep"]
    return subprocess.run(
        [sys.executable, *command, *args],
        env=child_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def study_folder(tmp_path, tiny_models, tiny_data) -> Path:
    """A tiny study alone in a folder of its own (the caches conftest isolates are beside it)."""
    folder = tmp_path / "study"
    folder.mkdir()
    write_tiny_study(folder, tiny_models, tiny_data)
    return folder


def assert_one_line_and_nothing_written(result, folder: Path, secret: str) -> str:
    """The one ``kdsweep:`` line of a run stopped at its storage, after checking that nothing
    was written (no store, report, MLflow run, cache) and that ``secret`` is nowhere."""
    output = result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("kdsweep:")]
    assert result.returncode == 2, output
    assert len(lines) == 1 and "Traceback" not in output, output
    assert secret not in output, output
    assert [p.name for p in folder.iterdir()] == ["tiny.yaml"], sorted(
        p.name for p in folder.iterdir()
    )
    assert [p.name for p in folder.parent.iterdir()] == ["study"], (
        "written beside the study (caches?)"
    )
    return lines[0]


@pytest.mark.slow  # a `kdsweep run` process: torch and MLflow import
def test_a_missing_postgres_driver_is_one_line_naming_the_extra(study_folder):
    study = study_folder / "tiny.yaml"
    study.write_text(
        re.sub(
            r"(?m)^storage: .*$",
            "storage: postgresql://user:secret@127.0.0.1:1/db",
            study.read_text(),
        )
    )
    result = run_cli("run", str(study), "--no-report", cwd=study_folder, without_drivers=True)
    line = assert_one_line_and_nothing_written(result, study_folder, "secret")
    assert 'pip install "kdsweep[postgres]"' in line and "storage" in line, line


@pytest.mark.slow  # a `kdsweep run` process: torch and MLflow import
def test_an_unreachable_postgres_server_is_one_line_naming_storage(study_folder):
    with socket.socket() as s:  # a port that nothing listens on once it is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = "n0t-the-real-pw"
    url = f"postgresql://kdsweep:{secret}@127.0.0.1:{port}/kdsweep"
    result = run_cli(
        "run",
        str(study_folder / "tiny.yaml"),
        "--no-report",
        "--set",
        f"storage={url}",
        cwd=study_folder,
    )
    line = assert_one_line_and_nothing_written(result, study_folder, secret)
    assert line.startswith("kdsweep: storage:") and f"kdsweep:***@127.0.0.1:{port}" in line, line
    assert "start the server" in line, line
