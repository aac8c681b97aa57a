"""Small formatting helpers: numbers, cells and Markdown tables as the report writes them."""

from __future__ import annotations

import json
import math

import pandas as pd

from kdsweep.names import StudyAttr
from kdsweep.study.measures import BY_NAME
from kdsweep.study.space import SEARCH_SPACE, describe

# How the report names a trial's state.
STATE_WORDS = {
    "COMPLETE": "complete",
    "PRUNED": "pruned",
    "FAIL": "failed",
    "RUNNING": "running",
    "WAITING": "waiting",
}


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table of a DataFrame of strings (pandas' to_markdown needs tabulate)."""
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    rows = [
        "| " + " | ".join(cell_text(v) for v in row) + " |"
        for row in frame.itertuples(index=False)
    ]
    return "\n".join([header, rule, *rows])


def cell_text(value) -> str:
    text = "" if value is None else str(value)
    return " ".join(text.split()).replace("|", "\\|")


def as_float(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def finite(value) -> bool:
    number = as_float(value)
    return number is not None and math.isfinite(number)


def fmt(value, digits: int = 4) -> str:
    number = as_float(value)
    return "" if number is None else f"{number:.{digits}g}"


def pct(value) -> str:
    number = as_float(value)
    return "" if number is None else f"{number:.1f}%"


def points(value: float) -> str:
    """A difference of percentages: +13.0 points."""
    return f"{value:+.1f} points"


def duration(seconds) -> str:
    """45s, 3m05s, 2h10m: never a fraction of a minute ("" for none)."""
    number = as_float(seconds)
    if number is None:
        return ""
    seconds = round(number)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def device_hours(seconds: float) -> str:
    """0.0831 device-hours (4m59s)."""
    return f"{seconds / 3600:.3g} device-hours ({duration(seconds)})"


def plain_value(value):
    """A parameter as YAML and --set take it: ints stay ints, "all" stays a string."""
    if isinstance(value, str):
        return value
    number = float(value)
    return int(number) if number.is_integer() and not isinstance(value, float) else number


def set_text(value) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)


def params_of(trial) -> dict:
    """A trial row's declared parameters, as a dict."""
    return {p.name: getattr(trial, p.name) for p in SEARCH_SPACE}


def params_short(trial) -> str:
    """A trial's parameters that mattered, in run-name form: a=0.52 T=2.1 k=64 lr=3.1e-04."""
    return describe(params_of(trial), short=True)


def objective_label(objective: str) -> str:
    """The objective in words, for axis labels."""
    return BY_NAME[objective].label


def percent_of(fraction) -> float | None:
    """A fraction (exact match 0.31) as a percentage (31.0), or None."""
    value = as_float(fraction)
    return None if value is None else 100 * value


def params_cell(trial) -> str:
    """A trial row's parameters in run-name form, or "" when it has none recorded."""
    if as_float(trial.alpha) is None:
        return ""
    return params_short(trial)


def measure_text(name: str, value) -> str:
    """A measure as tables show it (``Measure.show``); "" when there is none."""
    number = as_float(value)
    return "" if number is None else BY_NAME[name].show(number)


def reasoning_note(
    answers: int,
    reasoned: int,
    trained: int,
    left_out: int,
    stripped: int,
    unlike_generation: int,
) -> str | None:
    """What became of a split's answers' reasoning, and why some is not scored (None when there
    is nothing to say: no reasoning, and every answer scored as it is generated)."""
    if not reasoned and not unlike_generation:
        return None
    parts = [f"{answers:,} answers, {reasoned:,} with reasoning: {trained:,} scored with it"]
    if left_out:
        parts.append(
            f"{left_out:,} left out by the chat template (it renders reasoning in later turns "
            "only)"
        )
    if stripped:
        parts.append(f"{stripped:,} stripped (`data.reasoning: strip`)")
    text = ", ".join(parts)
    if unlike_generation:
        text += (
            f"; {unlike_generation:,} answers scored in another context than they are generated "
            "in (the template renders earlier turns unlike a last one)"
        )
    if left_out or unlike_generation:
        text += "; `data.each_turn_as_last: true` trains each answer as it is generated"
    return text


def train_reasoning_note(attrs: dict) -> str | None:
    """:func:`reasoning_note` of the train split, from the study's attrs (None before a study
    that records it has measured its references)."""
    if StudyAttr.TRAIN_ANSWERS not in attrs:
        return None
    return reasoning_note(
        attrs[StudyAttr.TRAIN_ANSWERS],
        attrs[StudyAttr.TRAIN_REASONED],
        attrs[StudyAttr.TRAIN_REASONING_TRAINED],
        attrs[StudyAttr.TRAIN_REASONING_LEFT_OUT],
        attrs[StudyAttr.TRAIN_REASONING_STRIPPED],
        attrs[StudyAttr.TRAIN_UNLIKE_GENERATION],
    )
