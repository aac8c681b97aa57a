"""The search space, declared once: each searchable hyperparameter and everything about it.

A declaration (:class:`Searched`) says how the parameter is written in a study file (its default
range, choices or value), which values are allowed, how it reaches a trial (``setting``), and how
it is shown in run names and the report. The study file's ``search:`` section
(:data:`SearchConfig`), its validation, what each trial draws (:func:`suggest`, through Optuna's
trial API), the baselines' trials, the run names, the report's columns and the importances all
follow :data:`SEARCH_SPACE`; adding a parameter is one declaration here plus its use in the loss
or the training loop.

This module imports neither torch nor Optuna (a trial is used through its ``suggest_*`` methods).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from kdsweep.names import Group, TrialAttr

WHOLE_VOCAB = "all"  # the top_k choice that keeps the teacher's whole vocabulary
BASELINE_TRIALS = "trials"  # in a baseline entry: how many trials search what it does not fix


def is_plain_fine_tuning(alpha: Any) -> Any:
    """Whether a trial with this ``alpha`` is plain fine-tuning: no distillation term, only the
    cross-entropy on the data. Takes a number, or a pandas column of them (then a column of
    bools)."""
    return alpha == 0


@dataclass(frozen=True)
class Param:
    """How a study file searches one parameter: a fixed ``value``, a ``low``..``high`` range
    (``log``-uniform or on a ``step`` grid), or a list of ``choices``."""

    value: float | int | str | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None

    @property
    def is_fixed(self) -> bool:
        return self.low is None and self.choices is None

    @property
    def values(self) -> list:
        """Every value a trial may take, for a fixed value or a list of choices."""
        return [self.value] if self.is_fixed else list(self.choices or ())


@dataclass(frozen=True)
class Searched:
    """One searchable hyperparameter."""

    name: str
    default: Param
    help: str
    label: str  # in run names: "a" gives a=0.52
    title: str  # the report's column header
    run_format: str  # format spec in run names
    table_format: str  # format spec in the report's tables
    low: float = 0.0  # allowed values: low (or above it, when low_open) up to high
    high: float = math.inf
    low_open: bool = False
    distillation_only: bool = False  # does nothing without a teacher signal (alpha 0)
    whole: bool = False  # whole numbers (from low), given as a list of choices, not a range
    named: str | None = None  # a word allowed besides whole numbers: top_k's "all"
    # a value that means "as before this parameter existed": not shown
    quiet_at: float | None = None

    def setting(self, value: Any) -> Any:
        """The value as the training loop takes it: ``top_k: all`` is None (no truncation)."""
        if self.whole:
            return None if value == self.named else int(value)
        return float(value)

    def show(self, value: Any, *, short: bool = False) -> str:
        """The value as a run name (``short``) or a report table shows it; "" for None."""
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        if self.whole:
            return str(int(value))
        return format(float(value), self.run_format if short else self.table_format)

    def problem(self, where: str, value: Any) -> str | None:
        """Why ``value`` is not allowed, as a 'key.path: message' line; None when it is."""
        if self.whole:
            if (self.named is not None and value == self.named) or (
                isinstance(value, int) and not isinstance(value, bool) and value >= self.low
            ):
                return None
            word = f" or {self.named!r}" if self.named else ""
            return f"{where}: must be an integer >= {self.low:g}{word}, got {value!r}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{where}: must be a number, got {value!r}"
        if value < self.low or (value == self.low and self.low_open):
            return f"{where}: must be {'>' if self.low_open else '>='} {self.low:g}, got {value}"
        if value > self.high:
            return f"{where}: must be <= {self.high:g}, got {value}"
        return None


SEARCH_SPACE: tuple[Searched, ...] = (
    Searched(
        "alpha",
        Param(low=0.1, high=0.9),
        "weight of the KL term; 1 - alpha weighs the cross-entropy",
        label="a",
        title="alpha",
        run_format=".2f",
        table_format=".4g",
        low=0.0,
        high=1.0,
    ),
    Searched(
        "temperature",
        Param(low=1.0, high=8.0, log=True),
        "softens teacher and student in the KL term",
        label="T",
        title="temperature",
        run_format=".2g",
        table_format=".4g",
        low_open=True,
        distillation_only=True,
    ),
    Searched(
        "top_k",
        Param(choices=(WHOLE_VOCAB,)),
        "the teacher's largest logits kept, or all",
        label="k",
        title="top_k",
        run_format="",
        table_format="",
        low=1,
        whole=True,
        named=WHOLE_VOCAB,
        distillation_only=True,
    ),
    Searched(
        "learning_rate",
        Param(low=1e-5, high=1e-3, log=True),
        "AdamW's peak learning rate",
        label="lr",
        title="learning rate",
        run_format=".1e",
        table_format=".2e",
        high=1.0,
        low_open=True,
    ),
    Searched(
        "beta",
        Param(value=0.0),
        "the divergence, TRL's generalized JSD: 0 forward KL, 1 reverse KL, between: a mix",
        label="b",
        title="beta",
        run_format=".2f",
        table_format=".3g",
        low=0.0,
        high=1.0,
        distillation_only=True,
        quiet_at=0.0,
    ),
    Searched(
        "lmbda",
        Param(value=0.0),
        "the share of steps trained on the student's own generations (on-policy, GKD)",
        label="lmbda",
        title="lmbda",
        run_format=".2f",
        table_format=".3g",
        low=0.0,
        high=1.0,
        distillation_only=True,
        quiet_at=0.0,
    ),
    Searched(
        "lora_rank",
        Param(value=0),
        "the student's form: 0 full fine-tuning, r > 0 a LoRA adapter of rank r (student.lora)",
        label="r",
        title="LoRA rank",
        run_format="",
        table_format="",
        whole=True,
        quiet_at=0,
    ),
)
SEARCHED = tuple(p.name for p in SEARCH_SPACE)
BY_NAME = {p.name: p for p in SEARCH_SPACE}

# The study file's ``search:`` section, one field per declaration (a bare value in YAML fixes it).
SearchConfig = dataclasses.make_dataclass(
    "SearchConfig",
    [(p.name, Param, field(default=p.default)) for p in SEARCH_SPACE],
    frozen=True,
    namespace={
        "__doc__": "The search space: one Param per declared parameter (space.SEARCH_SPACE)."
    },
)


def form(lora_rank: Any) -> str:
    """A student form in words: "full fine-tuning" (rank 0 or unknown), "LoRA rank 16"."""
    rank = 0 if lora_rank is None or lora_rank != lora_rank else int(lora_rank)  # NaN: unknown
    return f"LoRA rank {rank}" if rank else "full fine-tuning"


def settings(params: dict) -> dict[str, Any]:
    """A trial's parameters as the training loop takes them (``Searched.setting``)."""
    return {p.name: p.setting(params[p.name]) for p in SEARCH_SPACE}


def mattered(params: dict) -> list[Searched]:
    """The declared parameters that act in a trial with ``params``: at alpha 0 (plain
    fine-tuning) those that need a teacher do nothing, and a parameter at its quiet value
    (beta 0: forward KL; lmbda 0: off-policy) changes nothing from the classic recipe."""
    plain = is_plain_fine_tuning(params.get("alpha"))
    return [
        p
        for p in SEARCH_SPACE
        if p.name in params
        and not (plain and p.distillation_only)
        and params[p.name] != p.quiet_at
    ]


def describe(params: dict, *, short: bool) -> str:
    """The parameters that mattered: ``a=0.52 T=2.1 k=64 lr=3.1e-04`` (short), or
    ``alpha 0.52, temperature 2.1, top_k 64, learning_rate 3.10e-04``."""
    if short:
        return " ".join(
            f"{p.label}={p.show(params[p.name], short=True)}" for p in mattered(params)
        )
    return ", ".join(f"{p.name} {p.show(params[p.name])}" for p in mattered(params))


def run_name(number: int, params: dict) -> str:
    """A name that reads well in a list of runs: trial 3 a=0.52 T=2.1 k=64 lr=3.1e-04 (and b=,
    lmbda= when they are not 0; at alpha 0, only what acts without a teacher)."""
    return f"trial {number} {describe(params, short=True)}"


def columns(search: Any) -> list[Searched]:
    """The parameters a study's tables show: all but those fixed at their quiet value (a study
    that never touches beta or lmbda shows neither)."""
    return [
        p
        for p in SEARCH_SPACE
        if not (getattr(search, p.name).is_fixed and getattr(search, p.name).value == p.quiet_at)
    ]


def searched_names(search: Any) -> list[str]:
    """The parameters a study actually searches (not fixed to one value)."""
    return [p.name for p in SEARCH_SPACE if not getattr(search, p.name).is_fixed]


def finite_top_ks(search: Any, baselines: tuple[dict, ...] = ()) -> list[int]:
    """The finite top_k values trials may use (baselines included), or [] if any uses the whole
    vocabulary."""
    values = search.top_k.values + [b["top_k"] for b in baselines if "top_k" in b]
    # A plain fine-tuning baseline that does not fix top_k records its first value, which is in
    # `values`.
    return [] if WHOLE_VOCAB in values else sorted(set(values))


def may_be_positive(search: Any, baselines: tuple[dict, ...], name: str) -> bool:
    """Whether some trial may take ``name`` above 0 (a range, a choice or a baseline)."""
    param: Param = getattr(search, name)
    values = param.values or [param.high]  # a range has no values: its top
    values += [b.get(name) for b in baselines if isinstance(b, dict)]
    # Values of the wrong type are the study file's checks to report, not a reason to fail here.
    return any(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values)


def grid(search: Any) -> dict[str, list]:
    """The grid sampler's space: each searched parameter's choices, or its range at its step."""
    space = {}
    for p in SEARCH_SPACE:
        param: Param = getattr(search, p.name)
        if param.choices is not None:
            space[p.name] = list(param.choices)
        elif not param.is_fixed:
            count = int(round((param.high - param.low) / param.step)) + 1
            space[p.name] = [param.low + i * param.step for i in range(count)]
    return space


# ---------------------------------------------------------------- validation


def search_problems(search: Any, baselines: tuple[dict, ...], *, sampler: str) -> list[str]:
    """Every problem with the search space and the baselines, as 'key.path: message' lines."""
    problems = []
    for p in SEARCH_SPACE:
        problems += _param_problems(p, getattr(search, p.name), sampler)
    for i, baseline in enumerate(baselines):
        where = f"baselines[{i}]"
        if not isinstance(baseline, dict):
            problems.append(f"{where}: must be a mapping of parameters, e.g. {{alpha: 0}}")
            continue
        for key, value in baseline.items():
            if key == BASELINE_TRIALS:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    problems.append(f"{where}.{key}: must be an integer >= 1, got {value!r}")
            elif key not in BY_NAME:
                problems.append(
                    f"{where}.{key}: unknown parameter (allowed: "
                    f"{', '.join([*SEARCHED, BASELINE_TRIALS])})"
                )
            elif problem := BY_NAME[key].problem(f"{where}.{key}", value):
                problems.append(problem)
    return problems


def baseline_params(baseline: dict) -> dict:
    """The parameters a baseline entry fixes (without its trial count)."""
    return {k: v for k, v in baseline.items() if k != BASELINE_TRIALS}


def neutral(search: Any, name: str) -> Any:
    """A parameter's first allowed value: what a trial that does not use it records."""
    param: Param = getattr(search, name)
    return param.values[0] if param.values else param.low


def _param_problems(p: Searched, param: Param, sampler: str) -> list[str]:
    where = f"search.{p.name}"
    if param.choices is not None:
        if param.low is not None or param.high is not None:
            return [f"{where}: give either choices or low/high, not both"]
        if not param.choices:
            return [f"{where}.choices: must list at least one value"]
        return _values_problems(
            p, [(f"{where}.choices[{i}]", v) for i, v in enumerate(param.choices)]
        )
    if param.is_fixed:
        if param.value is None:
            return [f"{where}: must be a value, a list of choices or {{low, high}}"]
        return _values_problems(p, [(where, param.value)])
    if p.whole:
        named = f" or {p.named}" if p.named else ""
        return [f"{where}: must be a list of choices (integers{named}), not a range"]
    if param.low is None or param.high is None:
        return [f"{where}: a range needs both low and high"]
    problems = _values_problems(p, [(f"{where}.low", param.low), (f"{where}.high", param.high)])
    if param.low > param.high:
        problems.append(f"{where}: low must be <= high, got {param.low} > {param.high}")
    if param.log and param.low <= 0:
        problems.append(f"{where}.low: must be > 0 for a log range, got {param.low}")
    if param.log and param.step is not None:
        problems.append(f"{where}: step and log cannot be combined")
    if sampler == "grid" and param.step is None:
        problems.append(
            f"{where}: the grid sampler needs choices (or a step) for every searched parameter"
        )
    return problems


def _values_problems(p: Searched, values: list[tuple[str, Any]]) -> list[str]:
    return [problem for where, value in values if (problem := p.problem(where, value))]


# ---------------------------------------------------------------- a trial's parameters


def suggest(trial, search: Any) -> dict:
    """Every declared parameter of the trial: sampled, fixed by the study, or fixed by a
    baseline."""
    baseline = trial.user_attrs.get(TrialAttr.BASELINE_PARAMS, {})
    params = {}
    for p in SEARCH_SPACE:
        param: Param = getattr(search, p.name)
        if param.is_fixed:
            params[p.name] = baseline.get(p.name, param.value)
        elif param.choices is not None:
            params[p.name] = trial.suggest_categorical(p.name, list(param.choices))
        elif param.step is not None:
            params[p.name] = trial.suggest_float(p.name, param.low, param.high, step=param.step)
        else:
            params[p.name] = trial.suggest_float(p.name, param.low, param.high, log=param.log)
    return params


def baseline_trials(search: Any, baselines: tuple[dict, ...]) -> list[tuple[dict, dict]]:
    """(enqueued params, user attrs) of every baseline trial, in the order they run.

    A baseline fixes what it names; at alpha 0 the parameters that need a teacher are fixed too,
    at their first allowed value (they do nothing); the rest (the learning rate) is sampled by
    the baseline's own sampler, over ``trials`` trials.
    """
    trials = []
    for i, entry in enumerate(baselines):
        fixed = baseline_params(entry)
        enqueued = {k: v for k, v in fixed.items() if not getattr(search, k).is_fixed}
        if is_plain_fine_tuning(fixed.get("alpha", neutral(search, "alpha"))):
            for p in SEARCH_SPACE:
                if (
                    p.distillation_only
                    and p.name not in fixed
                    and not getattr(search, p.name).is_fixed
                ):
                    enqueued[p.name] = neutral(search, p.name)
        attrs = {
            TrialAttr.BASELINE: True,
            TrialAttr.BASELINE_PARAMS: fixed,
            TrialAttr.GROUP: Group.baseline(i),
        }
        trials += [(enqueued, attrs)] * entry.get(BASELINE_TRIALS, 1)
    return trials
