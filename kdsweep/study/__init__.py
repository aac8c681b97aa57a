"""What a study is, before anything runs: the study file read and checked into frozen
dataclasses (``config``, ``reader``), the search space (``space``) and the measures a study may
optimize, constrain or report (``measures``).

Imports neither torch, transformers, Optuna nor MLflow (an import-linter contract keeps it so):
``kdsweep check`` and ``kdsweep --help`` answer in a second.
"""
