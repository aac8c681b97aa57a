"""What MLflow logging costs a trial: time spent in MLflow calls against the trial's wall time.

Run by hand from the repository root::

    python benchmarks/logging_overhead.py                         # the demo study, 2 trials
    python benchmarks/logging_overhead.py studies/demo.yaml --n-trials 3 --set train.max_steps=200
    python benchmarks/logging_overhead.py STUDY.yaml --tracking-uri http://127.0.0.1:5000

The study runs for real (``sweep.run``) with its Optuna and MLflow stores in a temporary
folder (or the tracking URI given). Every public ``MlflowClient`` method is wrapped in a timer, and
so is the objective (one call per trial): the overhead is the time the trial's thread spent
inside MLflow calls (creating its run, dataset inputs, waiting for its batches, statuses) divided
by the trial's wall time. Batches of metrics and params are written by a background thread while
training goes on; that time is reported apart, as is MLflow work outside trials (the parent run,
closing).

The demo teacher is trained on first use (about two minutes on a CPU, then cached in
``$KDSWEEP_CACHE``). The target is at most 2% per trial.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Timers:
    """Seconds the sweep's own thread spends in MLflow calls, inside and outside trials, and in
    trials; and seconds of MLflow writes done by kdsweep's background writer thread."""

    def __init__(self):
        self.in_trials = 0.0
        self.outside = 0.0
        self.background = 0.0
        self.trials = 0.0
        self.calls: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()
        self._in_trial = False
        self._local = threading.local()  # MlflowClient methods call each other: time the outermost

    def wrap_client(self, client_class) -> None:
        for name, method in inspect.getmembers(client_class, inspect.isfunction):
            if not name.startswith("_"):
                setattr(client_class, name, self._timed(name, method))

    def _timed(self, name, method):
        @functools.wraps(method)
        def timed(*args, **kwargs):
            if getattr(self._local, "busy", False):
                return method(*args, **kwargs)
            self._local.busy = True
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                self._local.busy = False
                self.calls[name] += 1
                self.seconds[name] += elapsed
                if threading.current_thread() is not threading.main_thread():
                    self.background += elapsed
                elif self._in_trial:
                    self.in_trials += elapsed
                else:
                    self.outside += elapsed

        return timed

    def wrap_objective(self, objective_class) -> None:
        """The trial itself and its after-trial callback (the best trial, on the parent run)."""
        for name in ("__call__", "after_trial"):
            setattr(objective_class, name, self._trial_part(getattr(objective_class, name)))

    def _trial_part(self, method):
        @functools.wraps(method)
        def timed(*args, **kwargs):
            self._in_trial = True
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.trials += time.perf_counter() - started
                self._in_trial = False

        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", nargs="?", default=str(ROOT / "studies" / "demo.yaml"))
    parser.add_argument("--n-trials", type=int, default=2)
    parser.add_argument(
        "--tracking-uri", help="an MLflow server to log to (default: SQLite in a temp folder)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE"
    )
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    from kdsweep import sweep
    from kdsweep.study.reader import load_study
    from kdsweep.sweep.objective import Objective

    timers = Timers()
    timers.wrap_client(MlflowClient)
    timers.wrap_objective(Objective)
    with tempfile.TemporaryDirectory(prefix="kdsweep-logging-") as folder:
        uri = args.tracking_uri or f"sqlite:///{folder}/mlflow.db"
        stores = [
            f"storage=sqlite:///{folder}/optuna.db",
            f"tracking.uri={uri}",
            "name=logging-overhead",
        ]
        study = load_study(args.study, [*stores, *args.overrides])
        summary = sweep.run(study, n_trials=args.n_trials)
    report(timers, study, summary, uri if args.tracking_uri else "SQLite (local file)")


def report(timers: Timers, study, summary, store: str) -> None:
    share = timers.in_trials / timers.trials if timers.trials else float("nan")
    print()
    print(
        f"study {study.name}: {summary.ran} trials of {study.train.max_steps} steps "
        f"(log every {study.train.log_every}, eval every {study.train.eval_every}), MLflow "
        f"store: {store}"
    )
    print(f"trials' wall time            {timers.trials:9.2f} s")
    print(
        f"MLflow calls inside trials   {timers.in_trials:9.3f} s   = {share:.2%} of the trials' "
        "time (target <= 2%)"
    )
    print(
        f"MLflow calls outside trials  {timers.outside:9.3f} s   (parent run, stale-run checks, "
        "closing)"
    )
    print(
        f"background metric writes     {timers.background:9.3f} s   (kdsweep's writer thread, "
        "while training goes on)"
    )
    print(
        "calls (count, total ms): "
        + ", ".join(
            f"{name} {timers.calls[name]} {1000 * seconds:.0f}"
            for name, seconds in timers.seconds.most_common()
        )
    )


if __name__ == "__main__":
    main()
