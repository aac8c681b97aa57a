"""The metrics a study may optimize, each with the direction that makes it better.

The study's Optuna direction, the best trial, the MLflow best tags, pruning and the report all
read them from here. Imports nothing but the names.
"""

from __future__ import annotations

from kdsweep.names import Metric

MINIMIZE, MAXIMIZE = "minimize", "maximize"

OBJECTIVES: dict[str, str] = {
    Metric.STUDENT_PPL: MINIMIZE,
    Metric.PPL_RATIO: MINIMIZE,  # student perplexity / teacher perplexity
    Metric.EXACT_MATCH: MAXIMIZE,
    Metric.ROUGE_L: MAXIMIZE,
}
ACCURACY_OBJECTIVES = (Metric.EXACT_MATCH, Metric.ROUGE_L)  # need decoded answers (eval.accuracy)


def better(direction: str, value: float, than: float) -> bool:
    """Whether ``value`` beats ``than`` for an objective with ``direction``."""
    return value < than if direction == MINIMIZE else value > than
