"""The report's Markdown: one short function per section.

The output depends only on the storage: no generation time, stable sort orders (ties broken by
trial number), so generating it twice gives identical bytes.
"""

from __future__ import annotations

import shlex

import pandas as pd
import yaml

from kdsweep.names import StudyAttr
from kdsweep.report.checks import warnings_for
from kdsweep.report.collect import LOCAL_UI, ReportData
from kdsweep.report.compute import render_compute
from kdsweep.report.figures import Figure, markdown_image
from kdsweep.report.text import (
    as_float,
    cell_text,
    duration,
    fmt,
    markdown_table,
    measure_text,
    objective_label,
    params_cell,
    pct,
    percent_of,
    plain_value,
    set_text,
)
from kdsweep.report.tradeoffs import other_objectives, render_forms, render_pareto
from kdsweep.report.verdict import describe, render_seed_check, render_verdict
from kdsweep.study.config import StudyConfig
from kdsweep.study.measures import OUT_OF_MEMORY
from kdsweep.study.space import columns, is_plain_fine_tuning
from kdsweep.version import __version__

SECTIONS = (
    "Verdict",
    "Study",
    "Reference points",
    "Top configurations",
    "What mattered",
    "Compute",
    "What went wrong",
)
_STATE_WORDS = {
    "COMPLETE": "complete",
    "PRUNED": "pruned",
    "FAIL": "failed",
    "RUNNING": "running",
    "WAITING": "waiting",
}


def render(data: ReportData, figures: dict[str, Figure]) -> str:
    """The whole Markdown report; a study without a complete trial gets a short one."""
    parts = [f"# kdsweep report: {data.study.name}"]
    if data.ranked.empty:
        parts += [render_header(data), render_no_complete(data), render_compute(data)]
    else:
        parts += [
            render_verdict(data),
            render_header(data),
            render_references(data),
            render_seed_check(data),
            render_top(data),
            render_forms(data),
            render_pareto(data, figures),
            render_what_mattered(data, figures),
            render_compute(data),
        ]
    parts.append(render_what_went_wrong(data))
    return "\n\n".join(p.strip("\n") for p in parts if p) + "\n"


def render_header(data: ReportData) -> str:
    study, attrs, trials = data.study, data.attrs, data.sweep
    counts = trials.state.value_counts()
    states = ", ".join(
        f"{counts.get(s, 0)} {word}"
        for s, word in _STATE_WORDS.items()
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
    # what the trials ran with, --set included
    train = (attrs.get(StudyAttr.CONFIG) or study.to_dict())["train"]
    lines = [
        "## Study",
        "",
        f"- **Teacher**: `{study.teacher.label}`; **student**: `{study.student.label}`",
        f"- **Dataset**: `{study.data.dataset}` ({_sizes(attrs, study)})",
        f"- **{'Objectives' if study.multi_objective else 'Objective'}**: {_objectives(study)}"
        + _constraints(study),
        f"- **Trials**: {len(trials)} ({states}); target {study.n_trials}{checks}",
        f"- **Trials ran**: {_period(data.trials)}",
        f"- **Fixed settings** (as run): {train['max_steps']} steps of batch "
        f"{train['batch_size']} x {train['grad_accum_steps']}, "
        f"eval every {train['eval_every']} steps, precision {train['precision']}, seed "
        f"{train['seed']}",
        f"- **Config fingerprint**: `{attrs.get(StudyAttr.FINGERPRINT, study.fingerprint())}`; "
        f"**kdsweep** {__version__}",
    ]
    return "\n".join(lines)


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


def _sizes(attrs: dict, study: StudyConfig) -> str:
    if StudyAttr.TRAIN_ROWS not in attrs:
        return f"splits {study.data.train_split} / {study.data.eval_split}"
    decoded = (
        f", {attrs[StudyAttr.ACCURACY_ROWS]:,} of them decoded for accuracy"
        if StudyAttr.ACCURACY_ROWS in attrs
        else ""
    )
    test = ""
    if StudyAttr.TEST_ROWS in attrs:
        test = (
            f"; test {study.data.test_split}: {attrs[StudyAttr.TEST_ROWS]:,} rows, for the "
            "verdict only"
        )
    return (
        f"{study.data.train_split}: {attrs[StudyAttr.TRAIN_ROWS]:,} rows, "
        f"{attrs.get(StudyAttr.TRAIN_SCORED_TOKENS, 0):,} scored tokens; "
        f"validation {study.data.eval_split}: {attrs[StudyAttr.EVAL_ROWS]:,} rows, "
        f"{attrs.get(StudyAttr.EVAL_SCORED_TOKENS, 0):,} scored tokens{decoded}{test}; "
        f"max length {study.data.max_length}"
    )


def _period(trials: pd.DataFrame) -> str:
    start, end = trials.started.dropna(), trials.ended.dropna()
    if start.empty:
        return "none started"
    last = f" to {end.max():%Y-%m-%d %H:%M}" if len(end) else ""
    return f"{start.min():%Y-%m-%d %H:%M}{last} (local time of the workers)"


def render_no_complete(data: ReportData) -> str:
    return (
        "## No complete trial\n\n"
        f"The study holds {len(data.trials)} trial(s) and none has completed, so there is "
        "nothing to rank yet. "
        "Run `kdsweep run` on it again; the failed and pruned trials are listed below."
    )


def render_references(data: ReportData) -> str:
    """Teacher, untrained student, best baseline and best distilled trial, side by side,
    on the verdict's split (the untrained student on the validation split)."""
    attrs, test = data.attrs, data.on_test
    split = "test" if test else "validation"
    teacher = ("TEST_TEACHER_PPL", "TEST_TEACHER_EXACT_MATCH", "TEST_TEACHER_ROUGE_L")
    if not test:
        teacher = ("TEACHER_PPL", "TEACHER_EXACT_MATCH", "TEACHER_ROUGE_L")
    rows = [
        ("teacher", None, split, *(attrs.get(getattr(StudyAttr, key)) for key in teacher)),
        (
            "untrained student",
            None,
            "validation",
            data.untrained_ppl,
            attrs.get(StudyAttr.UNTRAINED_EXACT_MATCH),
            attrs.get(StudyAttr.UNTRAINED_ROUGE_L),
        ),
    ]
    for name, trial in (
        (_best_baseline_label(data), data.best_baseline),
        ("best distilled trial", data.best_distilled),
    ):
        if trial is not None:
            metrics = (data.shown(trial, m) for m in ("student_ppl", "exact_match", "rouge_l"))
            rows.append((name, trial, split, *metrics))
    teacher_ppl = as_float(attrs.get(getattr(StudyAttr, teacher[0])))
    frame = pd.DataFrame(
        [
            {
                "reference": name,
                "trial": "" if trial is None else data.trial_cell(trial),
                "split": where,
                "perplexity": fmt(ppl),
                **(
                    {"exact match": pct(percent_of(em)), "ROUGE-L": fmt(rouge, 3)}
                    if data.has_accuracy
                    else {}
                ),
                "ratio to teacher": fmt(
                    None if not teacher_ppl or ppl is None else ppl / teacher_ppl
                ),
                "gap closed": "" if trial is None else pct(data.gap_closed(ppl)),
                "best step": ""
                if trial is None or pd.isna(trial.best_step)
                else str(int(trial.best_step)),
            }
            for name, trial, where, ppl, em, rouge in rows
        ]
    )
    note = (
        "Perplexity is token-weighted over the held-out answers; teacher and students are scored "
        "on the same tokens. "
        '"Gap closed" is the share of the perplexity gap between the best baseline trial and '
        "the teacher. Each trial is taken at its best checkpoint on the validation "
        "split (`train.select`), its best step."
    )
    return "\n\n".join(["## Reference points", markdown_table(frame), note, _baseline_steps(data)])


def _best_baseline_label(data: ReportData) -> str:
    if data.baseline_kind == "plain fine-tuning":
        return "best plain fine-tuning (alpha 0)"
    return "best baseline"


def _baseline_steps(data: ReportData) -> str:
    """Where each compared baseline trial peaked: a baseline that peaks early is news (it
    overfits its data), and it is compared at its peak, not at its last step."""
    steps = [int(s) for s in data.baselines.best_step.dropna()]
    if not steps:
        return ""
    max_steps = data.study.train.max_steps
    early = sum(s < max_steps for s in steps)
    return (
        f"The baseline's {len(steps)} trial{'s' if len(steps) > 1 else ''} peaked at "
        f"step{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))} of {max_steps}"
        + (f": {early} before the last, so it overfits its data after that." if early else ".")
    )


def render_top(data: ReportData) -> str:
    frame = top_table(data)
    best = data.ranked.iloc[0]
    intro = (
        f"The {len(frame)} best of {len(data.ranked)} complete"
        f"{' feasible' if data.study.constraints else ''} trials by "
        f"`{data.study.primary_objective}`."
    )
    if len(data.infeasible):
        intro += (
            f" {len(data.infeasible)} infeasible trial(s) are left out (see "
            "[What went wrong](#what-went-wrong))."
        )
    if is_plain_fine_tuning(data.top.alpha).any():
        intro += (
            " Parameters that need a teacher do nothing at alpha 0: plain fine-tuning rows "
            "leave them blank."
        )
    parts = ["## Top configurations", intro, markdown_table(frame)]
    if compare := data.tracking.compare_link(list(data.top.mlflow_run_id)):
        parts.append(
            f"[Compare these runs side by side in MLflow]({compare}): parameters, metrics and "
            "curves."
        )
    if data.tracking.local:
        parts.append(
            "Run links point at a local MLflow store: they open while `kdsweep ui "
            f"{data.study_file}` serves it on {LOCAL_UI}."
        )
    parts += [
        f"**Best configuration** (trial {best.number}, {data.study.primary_objective} "
        f"{fmt(best.value)}): {describe(best)}. "
        "Its parameters, ready to paste into a study file:",
        "```yaml\n" + best_config_yaml(data, best) + "```",
        "Reproduce it alone, as a new one-trial study:",
        "```bash\n" + reproduce_command(data, best) + "\n```",
    ]
    return "\n\n".join(parts)


def top_table(data: ReportData) -> pd.DataFrame:
    """The top-N table as strings: what the Markdown shows."""
    rows = []
    for rank, trial in enumerate(data.top.itertuples(), start=1):
        plain = is_plain_fine_tuning(trial.alpha)
        link = data.tracking.run_link(trial.mlflow_run_id)
        rows.append(
            {
                "rank": str(rank),
                "trial": f"{trial.number}" + (" (baseline)" if trial.baseline else ""),
                **{
                    p.title: ""
                    if plain and p.distillation_only
                    else p.show(getattr(trial, p.name))
                    for p in columns(data.study.search)
                },
                "student ppl": fmt(trial.student_ppl),
                **(
                    {"exact match": pct(percent_of(trial.exact_match))}
                    if data.has_accuracy
                    else {}
                ),
                **{
                    name: measure_text(name, trial.values[i]) for i, name in other_objectives(data)
                },
                "ratio to teacher": fmt(data.ratio(trial.student_ppl, trial.ppl_ratio)),
                "gap closed": pct(data.gap_closed(trial.student_ppl, test=False)),
                "best step": "" if pd.isna(trial.best_step) else str(int(trial.best_step)),
                "duration": duration(trial.duration_s),
                "MLflow run": f"[{trial.mlflow_run_id[:8]}]({link})" if link else "",
            }
        )
    return pd.DataFrame(rows)


def best_config_yaml(data: ReportData, best) -> str:
    """The best trial's parameters that mattered as a ``search:`` block, at full precision (at
    alpha 0, those that act without a teacher; never those the study did not touch)."""
    plain = is_plain_fine_tuning(best.alpha)
    shown = [p for p in columns(data.study.search) if not (plain and p.distillation_only)]
    values = {p.name: plain_value(getattr(best, p.name)) for p in shown}
    return yaml.safe_dump({"search": values}, sort_keys=False)


def reproduce_command(data: ReportData, best) -> str:
    """``kdsweep run`` with every setting of the best trial fixed, as a new one-trial study."""
    study = data.study
    params = {p.name: plain_value(getattr(best, p.name)) for p in columns(study.search)}
    settings = {**study.rerun_settings(best.number, params), **data.changed_settings()}
    args = [f"--set {shlex.quote(f'{key}={set_text(value)}')}" for key, value in settings.items()]
    return " \\\n    ".join([f"kdsweep run {shlex.quote(data.study_file)}", *args])


def render_what_mattered(data: ReportData, figures: dict[str, Figure]) -> str:
    imp = data.importances
    parts = ["## What mattered", "### Parameter importances"]
    if imp.values is None:
        parts.append(f"Skipped: {imp.skipped}.")
    else:
        frame = pd.DataFrame(
            {"parameter": imp.values.index, "importance": [fmt(v, 3) for v in imp.values]}
        )
        parts += [
            f"Evaluator: {imp.evaluator}, over the {imp.n_trials} complete non-baseline trials; "
            "the importances sum to 1 and say which parameters the best trials concentrate on.",
            markdown_table(frame),
        ]
    parts.append(markdown_image(figures["importances"]))
    parts += ["### Optimization history", markdown_image(figures["history"])]
    parts += ["### Objective against each parameter", markdown_image(figures["slice"])]
    parts += [
        "### Eval curves",
        "Eval perplexity of the top trials (solid) and the best baseline trial (dashed) "
        "at every evaluation, with the teacher's perplexity on the same tokens (dotted).",
        markdown_image(figures["curves"]),
    ]
    return "\n\n".join(p for p in parts if p)


def render_what_went_wrong(data: ReportData) -> str:
    parts = ["## What went wrong"]
    for title, frame in (
        ("Failed trials", failed_table(data)),
        ("Pruned trials", pruned_table(data)),
        ("Infeasible trials", infeasible_table(data)),
    ):
        if len(frame):
            parts += [f"### {title}", markdown_table(frame)]
    found = warnings_for(data)
    if found:
        parts += ["### Warnings", "\n".join(f"- {w}" for w in found)]
    if len(parts) == 1:
        parts.append(
            f"Nothing: all {len(data.trials)} trials completed and no check raised a warning."
        )
    return "\n\n".join(parts)


def failed_table(data: ReportData) -> pd.DataFrame:
    failed = data.trials[data.trials.state == "FAIL"]
    retries = {
        int(t.retry_of): t.number for t in data.trials.itertuples() if not pd.isna(t.retry_of)
    }
    rows = []
    for t in failed.itertuples():
        retried = f" (retried as trial {retries[t.number]})" if t.number in retries else ""
        rows.append(
            {
                "trial": str(t.number),
                "parameters": params_cell(t),
                "reason": cell_text(_fail_reason(t) + retried),
            }
        )
    return pd.DataFrame(rows, columns=["trial", "parameters", "reason"])


def _fail_reason(trial) -> str:
    for reason in (trial.fail_reason, trial.run_reason):
        if isinstance(reason, str) and reason:
            return reason
    return "no reason recorded (its worker may have died; the heartbeat marks such trials failed)"


def infeasible_table(data: ReportData) -> pd.DataFrame:
    """Trials that broke a constraint: which, and by how much (out of memory: a failure too)."""
    ceilings = data.study.constraints
    rows = []
    for t in data.infeasible.itertuples():
        broken = [
            "out of memory"
            if name == OUT_OF_MEMORY
            else f"{name} {measure_text(name, over + ceilings[name])} > "
            f"{measure_text(name, ceilings[name])}"
            if name in ceilings
            else f"{name} over its ceiling by {fmt(over)}"
            for name, over in t.constraints.items()
            if over > 0
        ]
        rows.append(
            {
                "trial": str(t.number),
                "state": _STATE_WORDS.get(t.state, t.state.lower()),
                "parameters": params_cell(t),
                "over": "; ".join(broken),
            }
        )
    return pd.DataFrame(rows, columns=["trial", "state", "parameters", "over"])


def pruned_table(data: ReportData) -> pd.DataFrame:
    pruned = data.trials[data.trials.state == "PRUNED"]
    rows = []
    for t in pruned.itertuples():
        step = "" if as_float(t.pruned_step) is None else str(int(t.pruned_step))
        rows.append(
            {
                "trial": str(t.number),
                "parameters": params_cell(t),
                "pruned at step": step,
                f"last {data.study.primary_objective}": fmt(t.last_reported),
                "reason": cell_text(
                    t.run_reason if isinstance(t.run_reason, str) else "below the pruner's bar"
                ),
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "trial",
            "parameters",
            "pruned at step",
            f"last {data.study.primary_objective}",
            "reason",
        ],
    )
