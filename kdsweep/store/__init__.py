"""The Optuna store as shared state: opening it (``storage``), what every worker reads of the
trials (``trials``: one view of them), dead workers' trials and retries (``recovery``), and what
the study cost (``cost``).

Imports Optuna and SQLAlchemy, never torch (an import-linter contract keeps it so): ``kdsweep
status`` and ``kdsweep report`` read a study without loading a model library.
"""
