"""What the study benchmarks share: one variant of a study, run to its end in a store of its own
(Optuna and MLflow under ``folder``), read back as its Optuna study."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import optuna  # noqa: E402

import kdsweep  # noqa: E402

# What does not bear on comparing samplers or pruners, and costs time: turned off.
QUIET = {"seed_check.top": 0, "data.test_split": None, "eval.accuracy": False}


def arguments(doc: str, *, n_trials: int) -> argparse.ArgumentParser:
    """The options every study benchmark takes: the study, the sampler seeds, the trial count."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("study", nargs="?", type=Path, default=REPO / "studies" / "demo.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-trials", type=int, default=n_trials, help="a smoke test")
    return parser


def run_variant(study: Path, name: str, overrides: dict, folder: Path) -> optuna.Study:
    """``study`` with ``overrides``, named ``name``: run, then loaded from its store."""
    storage = f"sqlite:///{folder / name}.db"
    overrides = overrides | {
        "name": name,
        "storage": storage,
        "tracking.uri": f"sqlite:///{folder / name}-mlflow.db",
        "tracking.system_metrics": False,
    }
    kdsweep.run_study(study, overrides=overrides, report=False)
    return optuna.load_study(study_name=name, storage=storage)


def each(choices: list[str], seeds: list[int], run: Callable[[str, int, Path], object]) -> dict:
    """``run(choice, seed, folder)`` for every choice and seed, all in one temporary folder:
    {choice: [its results, seed by seed]}."""
    results: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="kdsweep-benchmark-") as folder:
        for choice in choices:
            for seed in seeds:
                results.setdefault(choice, []).append(run(choice, seed, Path(folder)))
    return results
