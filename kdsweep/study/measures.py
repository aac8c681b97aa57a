"""The measures a study may optimize or constrain, each with the direction that makes it better.

A trial's measures come in two kinds. Quality is measured at each evaluation on the validation
split, and a trial's value is taken at the checkpoint ``train.select`` chooses; cost is measured
once the trial has ended (its device-seconds and their parts, its peak memory, its trainable
parameters). An objective is any of them; the first objective is a quality measure, since it
chooses each trial's checkpoint and decides the verdict and the seed check. A constraint is a
ceiling on a measure that is better lower.

The study's Optuna directions, the best trial, the MLflow best tags, pruning and the report all
read them from here. Imports nothing but the names.
"""

from __future__ import annotations

from kdsweep.names import Metric

MINIMIZE, MAXIMIZE = "minimize", "maximize"

QUALITY: dict[str, str] = {
    Metric.STUDENT_PPL: MINIMIZE,
    Metric.PPL_RATIO: MINIMIZE,  # student perplexity / teacher perplexity
    Metric.KL_TO_TEACHER: MINIMIZE,
    Metric.EXACT_MATCH: MAXIMIZE,
    Metric.ROUGE_L: MAXIMIZE,
}
COST: dict[str, str] = {
    Metric.DEVICE_SECONDS: MINIMIZE,
    Metric.TRAIN_SECONDS: MINIMIZE,
    Metric.EVAL_SECONDS: MINIMIZE,
    Metric.GENERATION_SECONDS: MINIMIZE,
    Metric.CHECKPOINT_SECONDS: MINIMIZE,
    Metric.PEAK_MEMORY_GB: MINIMIZE,
    Metric.TRAINABLE_PARAMETERS: MINIMIZE,
}
OBJECTIVES: dict[str, str] = QUALITY | COST
ACCURACY_OBJECTIVES = (Metric.EXACT_MATCH, Metric.ROUGE_L)  # need decoded answers (eval.accuracy)
# What a constraint may cap: the measures that are better lower.
CONSTRAINABLE = tuple(name for name, direction in OBJECTIVES.items() if direction == MINIMIZE)
# The constraint an out-of-memory trial breaks, whatever the study constrains: it is infeasible.
OUT_OF_MEMORY = "out_of_memory"


def better(direction: str, value: float, than: float) -> bool:
    """Whether ``value`` beats ``than`` for an objective with ``direction``."""
    return value < than if direction == MINIMIZE else value > than


def violations(measures: dict[str, float], constraints: dict[str, float]) -> dict[str, float]:
    """Each constraint's value as Optuna takes it (``Trial.set_constraint``): the measure minus
    its ceiling, so a trial is feasible when every value is 0 or less."""
    return {name: measures[name] - ceiling for name, ceiling in constraints.items()}


def feasible(constraints: dict[str, float]) -> bool:
    """Whether a trial's stored constraint values (``FrozenTrial.constraints``) all hold."""
    return all(value <= 0 for value in constraints.values())
