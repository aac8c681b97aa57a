"""kdsweep: sweep knowledge-distillation hyperparameters with Optuna, tracked in MLflow.

From Python (see ``kdsweep.api``)::

    import kdsweep
    summary = kdsweep.run_study("studies/demo.yaml", n_trials=4)
    kdsweep.write_report("studies/demo.yaml")

Importing the package is cheap: torch and transformers load only when a study runs.
"""

from __future__ import annotations

from kdsweep.version import __version__

__all__ = ["StudySummary", "__version__", "load", "run_study", "write_report"]


def __getattr__(name: str):
    # The API pulls in Optuna, MLflow and torch: loaded on first use, not by `import kdsweep`.
    if name in ("StudySummary", "load", "run_study", "write_report"):
        from kdsweep import api

        return getattr(api, name)
    raise AttributeError(f"module 'kdsweep' has no attribute {name!r}")
