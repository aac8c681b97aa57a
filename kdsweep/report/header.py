"""The report's Study section: what was distilled into what, on which data and splits, under
which objectives, how many trials ended how, and the settings the trials ran with."""

from __future__ import annotations

import pandas as pd

from kdsweep.names import StudyAttr
from kdsweep.report.collect import ReportData
from kdsweep.report.text import STATE_WORDS, objective_label, set_text, train_reasoning_note
from kdsweep.study.config import StudyConfig
from kdsweep.version import __version__


def render_header(data: ReportData) -> str:
    study, attrs, trials = data.study, data.attrs, data.sweep
    counts = trials.state.value_counts()
    states = ", ".join(
        f"{counts.get(s, 0)} {word}"
        for s, word in STATE_WORDS.items()
        if s != "WAITING" or counts.get(s, 0)
    )
    checks = (
        f", plus {len(data.seed_check_runs)} seed-check runs" if len(data.seed_check_runs) else ""
    )
    retries = trials.retry_of.notna().sum()
    checks += (
        f"; {retries} retr{'y' if retries == 1 else 'ies'} of trials whose worker died or ran "
        "out of memory"
        if retries
        else ""
    )
    if infeasible := len(data.infeasible):
        checks += f"; {infeasible} infeasible (over a ceiling, or out of memory), not ranked"
    train = study.train  # as the trials ran
    lines = [
        "## Study",
        "",
        f"- **Teacher**: `{study.teacher.label}`; **student**: `{study.student.label}`",
        f"- **Dataset**: `{study.data.dataset}` ({_sizes(attrs, study)})",
        *_reasoning(attrs),
        f"- **{'Objectives' if study.multi_objective else 'Objective'}**: {_objectives(study)}"
        + _constraints(study),
        f"- **Trials**: {len(trials)} ({states}); target {data.settings.target}{checks}",
        f"- **Trials ran**: {_period(data.trials)}",
        f"- **Fixed settings** (as run): {train.max_steps} steps of batch "
        f"{train.batch_size} x {train.grad_accum_steps}, eval every {train.eval_every} steps, "
        f"precision {train.precision}, seed {train.seed}",
        f"- **Settings**: {_settings(data)}; **kdsweep** {__version__}",
    ]
    return "\n".join(lines)


def _settings(data: ReportData) -> str:
    """Which settings the trials ran with: their fingerprints, and what differs from the study
    file as it reads now (a run's ``--set``, or the file edited since)."""
    runs = data.settings.runs
    if len(runs) > 1:
        each = "; ".join(f"`{key}` for trials {_numbers(numbers)}" for key, numbers in runs)
        ran = f"the trials ran under {len(runs)} settings ({each}); this report shows the latest"
    else:
        ran = f"fingerprint `{runs[0][0] if runs else data.study.fingerprint()}`"
    changed = data.settings.overrides
    if not changed:
        return f"{ran}, as the study file reads now"
    listed = ", ".join(
        f"`{key}: {set_text(now)}` (the file: `{set_text(before)}`)"
        for key, (before, now) in changed.items()
    )
    return f"{ran}; set for the run or changed in the file since: {listed}"


def _numbers(numbers: list[int]) -> str:
    """0-5, 8, 10-11."""
    spans, start = [], numbers[0]
    for previous, number in zip(numbers, [*numbers[1:], None]):
        if number != previous + 1:
            spans.append(f"{start}-{previous}" if previous > start else str(start))
            start = number
    return ", ".join(spans)


def _objectives(study: StudyConfig) -> str:
    """`student_ppl` (student perplexity), minimized; several: each, and which one decides."""
    each = ", ".join(
        f"`{name}` ({objective_label(name)}), {direction[:-1]}ed"
        if objective_label(name) != name
        else f"`{name}`, {direction[:-1]}ed"
        for name, direction in zip(study.objectives, study.directions)
    )
    if not study.multi_objective:
        return each
    return (
        f"{each}; the first chooses each trial's checkpoint, the best trial and the verdict, "
        "and the [Pareto front](#pareto-front) shows the trade-off"
    )


def _constraints(study: StudyConfig) -> str:
    if not study.constraints:
        return ""
    ceilings = ", ".join(f"`{name}` <= {ceiling:g}" for name, ceiling in study.constraints.items())
    return f"\n- **Constraints**: {ceilings}; only trials within them are ranked"


def _reasoning(attrs: dict) -> list[str]:
    """The train answers' reasoning: what is trained on, and why some is not."""
    note = train_reasoning_note(attrs)
    return [f"- **Reasoning** (train split): {note}"] if note else []


def _sizes(attrs: dict, study: StudyConfig) -> str:
    data = study.data
    if StudyAttr.TRAIN_ROWS not in attrs:
        return f"splits `{data.train_split}` / `{data.eval_split}`"
    splits = [
        f"training split `{data.train_split}`: {attrs[StudyAttr.TRAIN_ROWS]:,} rows, "
        f"{attrs.get(StudyAttr.TRAIN_SCORED_TOKENS, 0):,} scored tokens",
        f"validation split `{data.eval_split}`: {attrs[StudyAttr.EVAL_ROWS]:,} rows, "
        f"{attrs.get(StudyAttr.EVAL_SCORED_TOKENS, 0):,} scored tokens"
        + _decoded(attrs.get(StudyAttr.ACCURACY_ROWS)),
    ]
    if StudyAttr.TEST_ROWS in attrs:
        splits.append(
            f"test split `{data.test_split}`: {attrs[StudyAttr.TEST_ROWS]:,} rows"
            + _decoded(attrs.get(StudyAttr.TEST_ACCURACY_ROWS))
            + ", for the verdict only"
        )
    return "; ".join(splits) + f"; max length {data.max_length}"


def _decoded(rows: int | None) -> str:
    return "" if rows is None else f" ({rows:,} of them decoded for accuracy)"


def _period(trials: pd.DataFrame) -> str:
    start, end = trials.started.dropna(), trials.ended.dropna()
    if start.empty:
        return "none started"
    last = f" to {end.max():%Y-%m-%d %H:%M}" if len(end) else ""
    return f"{start.min():%Y-%m-%d %H:%M}{last} (local time of the workers)"
