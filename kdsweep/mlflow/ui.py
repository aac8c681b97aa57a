"""``kdsweep ui``: the MLflow UI on a study's tracking store, opened on the study's runs.

MLflow 3's UI opens an experiment's plain URL on a GenAI "Overview" page with no runs on it:
its workflow switch (GenAI / Model training, remembered by the browser) decides which pages an
experiment shows. The URL printed here names the runs table and the model-training workflow.

``mlflow server`` starts helper processes (web workers, a job runner) that outlive a plain kill
of the server, so the server runs in its own process group and the whole group is stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

from mlflow.tracking import MlflowClient

from kdsweep.errors import UsageError
from kdsweep.mlflow.links import resolved_tracking_uri, runs_url
from kdsweep.paths import store_missing
from kdsweep.redact import redact
from kdsweep.study.config import StudyConfig

HOST = "127.0.0.1"


def serve(study: StudyConfig, port: int) -> int:
    """Start the MLflow UI on the study's tracking store, print its runs URL, and wait.

    Ctrl-C or SIGTERM stops it (and its helpers). With an ``http(s)://`` tracking URI the UI is
    already there: print its URL and return.
    """
    uri = store_uri(study)
    if uri.startswith(("http://", "https://")):
        print(redact(runs_url(uri, experiment_id(study, uri))))
        return 0
    experiment = experiment_id(study, uri)  # read before the server opens the store too
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # before the server exists
    server = None
    try:
        server = start_server(uri, port=port)
        wait_until_up(server, port)
        print(redact(f"MLflow UI on {uri} (Ctrl-C stops it):"))
        print(runs_url(f"http://{HOST}:{port}", experiment), flush=True)
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server is not None:
            stop_server(server)


def store_uri(study: StudyConfig) -> str:
    """The tracking store ``kdsweep run`` writes to: MLFLOW_TRACKING_URI, the study's, or
    MLflow's own default (which depends on what the current folder holds)."""
    return resolved_tracking_uri(study.tracking.uri)


def experiment_id(study: StudyConfig, uri: str) -> str | None:
    """The study's experiment in the store at ``uri``; None if it has not run there (and then
    no store is created: opening a SQLite store that is not there would make one)."""
    if store_missing(uri):
        return None
    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(study.experiment_name)
    return experiment.experiment_id if experiment else None


def start_server(uri: str, *, port: int) -> subprocess.Popen:
    """``mlflow server`` on ``uri``, bound to the loopback address, in its own process group."""
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",  # one user on one machine; each worker costs a Python process
    ]
    # The job runner serves GenAI features (judges, evaluations), not training runs: without it
    # the server starts some ten Python processes fewer. An explicit setting is kept.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    return subprocess.Popen(command, start_new_session=True, env=env)


def wait_until_up(server: subprocess.Popen, port: int, *, timeout: float = 180.0) -> None:
    """Until the server answers its health check; raises UsageError if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise UsageError(
                f"mlflow server exited with status {server.returncode} (is port {port} in use? "
                "try --port)"
            )
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise UsageError(f"mlflow server did not answer on port {port} within {timeout:.0f} s")


def stop_server(server: subprocess.Popen, *, grace: float = 10.0) -> None:
    """Stop the server and every helper it started: SIGTERM to its process group, then SIGKILL
    to whatever is left after ``grace`` seconds."""
    _signal_group(server.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _signal_group(server.pid, 0) and time.monotonic() < deadline:
        server.poll()  # reap the leader, or it lingers as a zombie in the group
        time.sleep(0.2)
    _signal_group(server.pid, signal.SIGKILL)
    server.wait()


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to the group; False when no process of it is left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
