"""The measures a study may optimize, constrain or report, declared once.

A trial's measures come in two kinds. *Quality* is measured at each evaluation on the validation
split, and a trial's value is taken at the checkpoint ``train.select`` chooses; a finalist's is
also measured once on the test split, under its ``test`` name. *Cost* is measured once the trial
has ended (its device-seconds and their parts, its peak memory, its trainable parameters). An
objective is any measure; the first objective is a quality measure, since it chooses each
trial's checkpoint and decides the verdict and the seed check. A constraint is a ceiling on a
measure that is better lower.

Each :class:`Measure` says its direction, its kind, how it is named in words and in a terminal
column, and how its values are shown: the study's Optuna directions, the checks of the study
file, the best trial, pruning, ``kdsweep status`` and the report all read :data:`MEASURES`.
Adding a measure is one declaration here plus the code that measures it. Imports nothing but
the names.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdsweep.names import Metric

MINIMIZE, MAXIMIZE = "minimize", "maximize"
QUALITY, COST = "quality", "cost"
# The constraint an out-of-memory trial breaks, whatever the study constrains (it is infeasible),
# and the reason its trial failed with.
OUT_OF_MEMORY = "out_of_memory"


@dataclass(frozen=True)
class Measure:
    """One measure of a trial."""

    name: str  # as MLflow logs it and a study file names it
    direction: str  # MINIMIZE or MAXIMIZE: what makes it better
    kind: str  # QUALITY (at the selected checkpoint) or COST (once the trial has ended)
    label: str  # in words, for a report's sentences and axes
    short: str  # a terminal column's header (``kdsweep status``'s legend names it)
    format: str = ".4g"  # a value as tables show it
    fraction: bool = False  # a share in [0, 1], shown as a percentage in sentences
    accuracy: bool = False  # needs the answers decoded (eval.accuracy)
    test: str | None = None  # its name on the test split, for a quality measure scored there

    def better(self, value: float, than: float) -> bool:
        """Whether ``value`` beats ``than``."""
        return value < than if self.direction == MINIMIZE else value > than

    def show(self, value: float) -> str:
        """A value as tables show it: 4 significant digits, a count in full (78,080)."""
        return format(value, self.format)


MEASURES: tuple[Measure, ...] = (
    Measure(
        Metric.STUDENT_PPL,
        MINIMIZE,
        QUALITY,
        "student perplexity",
        "ppl",
        test=Metric.TEST_STUDENT_PPL,
    ),
    Measure(Metric.PPL_RATIO, MINIMIZE, QUALITY, "student / teacher perplexity", "ratio"),
    Measure(Metric.KL_TO_TEACHER, MINIMIZE, QUALITY, "KL to the teacher", "kl"),
    Measure(
        Metric.EXACT_MATCH,
        MAXIMIZE,
        QUALITY,
        "exact match",
        "em",
        fraction=True,
        accuracy=True,
        test=Metric.TEST_EXACT_MATCH,
    ),
    Measure(
        Metric.ROUGE_L,
        MAXIMIZE,
        QUALITY,
        "ROUGE-L",
        "rouge",
        accuracy=True,
        test=Metric.TEST_ROUGE_L,
    ),
    Measure(Metric.DEVICE_SECONDS, MINIMIZE, COST, "device-seconds", "dev s"),
    Measure(Metric.TRAIN_SECONDS, MINIMIZE, COST, "training seconds", "train s"),
    Measure(Metric.EVAL_SECONDS, MINIMIZE, COST, "evaluation seconds", "eval s"),
    Measure(Metric.GENERATION_SECONDS, MINIMIZE, COST, "generation seconds", "gen s"),
    Measure(Metric.CHECKPOINT_SECONDS, MINIMIZE, COST, "checkpoint seconds", "ckpt s"),
    Measure(Metric.PEAK_MEMORY_GB, MINIMIZE, COST, "peak memory (GB)", "mem GB"),
    Measure(
        Metric.TRAINABLE_PARAMETERS,
        MINIMIZE,
        COST,
        "trainable parameters",
        "params",
        format=",.0f",
    ),
)
BY_NAME: dict[str, Measure] = {m.name: m for m in MEASURES}
OBJECTIVES = tuple(BY_NAME)  # every measure may be an objective
QUALITY_MEASURES = tuple(m.name for m in MEASURES if m.kind == QUALITY)
ACCURACY_MEASURES = tuple(m.name for m in MEASURES if m.accuracy)
# What a constraint may cap: the measures that are better lower.
CONSTRAINABLE = tuple(m.name for m in MEASURES if m.direction == MINIMIZE)
# A finalist's scores on the test split, and the validation measure each one mirrors.
TEST_METRICS = {m.test: m.name for m in MEASURES if m.test}


def better(name: str, value: float, than: float) -> bool:
    """Whether ``value`` of the measure ``name`` beats ``than``."""
    return BY_NAME[name].better(value, than)


def violations(measures: dict[str, float], constraints: dict[str, float]) -> dict[str, float]:
    """Each constraint's value as Optuna takes it (``Trial.set_constraint``): the measure minus
    its ceiling, so a trial is feasible when every value is 0 or less."""
    return {name: measures[name] - ceiling for name, ceiling in constraints.items()}


def feasible(constraints: dict[str, float]) -> bool:
    """Whether a trial's stored constraint values (``FrozenTrial.constraints``) all hold."""
    return all(value <= 0 for value in constraints.values())
