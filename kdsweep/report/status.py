"""What a terminal shows of a study: ``kdsweep status``'s trial table, and the short summary
that ends ``kdsweep run``. Both read the Optuna storage only, and fit an 80-column terminal or a
pipe: short headers (a legend names them), short values, long notes wrapped, never cut."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from kdsweep.errors import UsageError
from kdsweep.names import Metric, StudyAttr, TrialAttr
from kdsweep.report.text import device_hours, duration, train_reasoning_note
from kdsweep.store import cost
from kdsweep.store.settings import as_run
from kdsweep.store.storage import load_existing_study
from kdsweep.store.trials import (
    Trials,
    in_sweep,
    is_baseline,
    is_control,
    is_seed_check,
    params_of,
    retry_of,
)
from kdsweep.study.config import StudyConfig
from kdsweep.study.measures import BY_NAME, feasible
from kdsweep.study.space import columns, describe, is_plain_fine_tuning

_STATES = {
    "COMPLETE": "done",
    "PRUNED": "pruned",
    "FAIL": "failed",
    "RUNNING": "running",
    "WAITING": "waiting",
}


def print_status(file: StudyConfig, console: Console | None = None) -> None:
    """Every trial: its state, parameters, objective, duration and a note (baseline, best, seed
    check, control, or why it failed), under the settings the trials ran with."""
    console = console or Console()
    optuna_study = load_existing_study(file)
    settings = as_run(optuna_study, file)
    study = settings.study
    view = Trials.of(optuna_study)
    trials, best = view.all, view.best
    sweep = [t for t in trials if in_sweep(t)]
    title = f"study {study.name!r}: {len(sweep)} trials, target {settings.target}"
    if checks := sum(map(is_seed_check, trials)):
        title += f", {checks} seed-check runs"
    if controls := sum(map(is_control, trials)):
        title += f", {controls} control{'s' * (controls > 1)}"
    if infeasible := sum(not feasible(t.constraints) for t in sweep):
        title += f"; {infeasible} infeasible (over a ceiling, or out of memory)"
    shown = columns(study.search)
    objectives = study.objectives
    headers = [BY_NAME[name].short for name in objectives]
    table = _table(["#", "state", *(p.label for p in shown), *headers, "time", "note"])
    for trial in trials:
        params = params_of(trial)
        values = trial.values or [None] * len(objectives)
        table.add_row(
            str(trial.number),
            _STATES.get(trial.state.name, trial.state.name.lower()),
            *(_param_cell(p, params) for p in shown),
            *(_number(v) for v in values),
            duration(trial.duration.total_seconds() if trial.duration else None) or "-",
            _note(trial, best),
        )
    console.print(title, highlight=False)
    console.print(table)
    console.print(_legend(shown, objectives), highlight=False)
    console.print(_cost_line(optuna_study, study), highlight=False)


def _cost_line(optuna_study, study: StudyConfig) -> str:
    spent = cost.study_cost(optuna_study, max_steps=study.train.max_steps)
    share = spent.teacher_cache_percent
    cache = f", {share:.0f}% of it the teacher cache" if share is not None else ""
    return f"device time: {device_hours(spent.total)} so far{cache}; `kdsweep report` splits it"


def estimate_line(study: StudyConfig) -> str:
    """``kdsweep check``'s estimate of the study's device-hours, from the seconds per step that
    its store measured; or why there is none. Reads the store, never creates it."""
    try:
        optuna_study = load_existing_study(study)
    except UsageError:
        return (
            "estimate: none: the study has no store yet to measure a step from; "
            "`kdsweep run` on it with `--n-trials 1` measures one"
        )
    steps = study.train.max_steps
    measured = cost.trial_time(optuna_study, max_steps=steps)
    if measured is None:
        return (
            "estimate: none: the study's store holds no complete trial that ran from step 0 to "
            "measure a step from; `kdsweep run` on it with `--n-trials 1` measures one"
        )
    after = cost.runs_after_sweep(study)
    runs = study.n_trials + after
    spent = cost.study_cost(optuna_study, max_steps=steps)
    trial = measured.setup + steps * measured.per_step
    total = (
        runs * trial
        + spent.teacher_cache
        + spent.preparation / max(spent.preparations, 1)
        + spent.finals
    )
    return (
        f"estimate: {device_hours(total)}: {study.n_trials} trials and {after} runs after the "
        f"sweep (the control, the seed check) of {steps} steps, each "
        f"{duration(trial)} ({measured.setup:.3g} s to set up, {1000 * measured.per_step:.3g} "
        f"ms a step, evaluations included: the medians of the {measured.trials} complete trials "
        "in the store), with the teacher cache and one preparation as measured, and no trial "
        f"pruned (pruning only lowers it); {device_hours(spent.total)} spent so far"
    )


def print_summary(study: StudyConfig, console: Console | None = None) -> None:
    """The answer in a few lines, on the verdict's split (the test split when the finalists were
    scored there, else the validation split), which it names: teacher, best distilled trial, the
    baseline the verdict compares it with (``Trials.compared_baseline``) and the winner's
    control."""
    console = console or Console()
    optuna_study = load_existing_study(study)
    attrs = optuna_study.user_attrs
    view = Trials.of(optuna_study)
    rows = [
        ("best distilled", view.best_distilled),
        ("best baseline", view.compared_baseline),
        ("control (alpha 0)", view.control(view.best_distilled)),
    ]
    rows = [(name, trial) for name, trial in rows if trial is not None]
    on_test = StudyAttr.TEST_TEACHER_PPL in attrs and all(
        f"{StudyAttr.TEST_PREFIX}{trial.number}" in attrs for _, trial in rows
    )
    accuracy = StudyAttr.TEACHER_EXACT_MATCH in attrs
    others = [(i, name) for i, name in enumerate(study.objectives) if name not in _SHOWN]
    split = study.data.test_split if on_test else study.data.eval_split
    where = f"on the {'test' if on_test else 'validation'} split `{split}`:"
    console.print(where, markup=False, highlight=False)
    table = _table(
        ["", "perplexity", *(["exact match"] if accuracy else []), *dict(others).values()]
        + ["parameters"],
        box_style=None,
    )
    teacher = (
        (attrs.get(StudyAttr.TEST_TEACHER_PPL), attrs.get(StudyAttr.TEST_TEACHER_EXACT_MATCH))
        if on_test
        else (attrs.get(StudyAttr.TEACHER_PPL), attrs.get(StudyAttr.TEACHER_EXACT_MATCH))
    )
    table.add_row("teacher", *_scores(*teacher, accuracy), *("" for _ in others), "")
    for name, trial in rows:
        if on_test:
            test = attrs.get(f"{StudyAttr.TEST_PREFIX}{trial.number}", {})
            ppl, em = test.get(Metric.TEST_STUDENT_PPL), test.get(Metric.TEST_EXACT_MATCH)
        else:
            ppl, em = (trial.user_attrs.get(m) for m in (Metric.STUDENT_PPL, Metric.EXACT_MATCH))
        table.add_row(
            f"{name}, trial {trial.number}",
            *_scores(ppl, em, accuracy),
            *(_number(trial.values[i]) for i, _ in others),
            describe(params_of(trial), short=True),
        )
    console.print(table)
    if note := train_reasoning_note(attrs):
        console.print(f"reasoning (train split): {note}", highlight=False)


_SHOWN = (Metric.STUDENT_PPL, Metric.EXACT_MATCH)  # the summary's own columns


def _scores(ppl, exact_match, accuracy: bool) -> list[str]:
    return [_number(ppl), *([_percent(exact_match)] if accuracy else [])]


def _table(columns: list[str], *, box_style=box.SIMPLE_HEAD) -> Table:
    table = Table(box=box_style, pad_edge=False, show_edge=False)
    for i, column in enumerate(columns):
        last = i == len(columns) - 1
        table.add_column(
            column,
            no_wrap=not last,
            overflow="fold",
            justify="left" if last or i == 0 else "right",
        )
    return table


def _param_cell(p, params: dict) -> str:
    if p.distillation_only and is_plain_fine_tuning(params.get("alpha")):
        return ""
    return p.show(params.get(p.name), short=True) if p.name in params else "-"


def _note(trial, best) -> str:
    attrs = trial.user_attrs
    if attrs.get(TrialAttr.FAIL_REASON):
        return attrs[TrialAttr.FAIL_REASON]
    if is_seed_check(trial):
        return (
            f"seed check of {attrs.get(TrialAttr.SEED_CHECK_OF)}, seed {attrs.get(TrialAttr.SEED)}"
        )
    if is_control(trial):
        return f"control of {attrs.get(TrialAttr.CONTROL_OF)} (alpha 0)"
    notes = ["best"] if best is not None and trial.number == best.number else []
    if is_baseline(trial):
        notes.append("baseline")
    if (retried := retry_of(trial)) is not None:
        notes.append(f"retry of {retried}")  # the failed trial says why
    if over := [_short(name) for name, value in trial.constraints.items() if value > 0]:
        notes.append(f"over {', '.join(over)}")  # infeasible: not ranked
    return ", ".join(notes)


def _short(name: str) -> str:
    """A constraint's measure as the table's headers name it (out of memory by its own name)."""
    return BY_NAME[name].short if name in BY_NAME else name


def _legend(shown, objectives) -> str:
    names = [(p.label, p.name) for p in shown] + [(BY_NAME[o].short, o) for o in objectives]
    return "  ".join(f"{label} = {name}" for label, name in names if label != name)


def _number(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
