"""kdsweep: sweep knowledge-distillation hyperparameters with Optuna, tracked in MLflow.

Importing the package is cheap: torch and transformers load only when a sweep runs.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
