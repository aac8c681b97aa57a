"""The report's answer: does distillation beat the tuned baseline, by how much, and is it real?

The first lines compare the best distilled trial with the best baseline trial (plain
fine-tuning, when the study's baselines fix alpha 0), each the best of its own search at its
best checkpoint (best against best), in perplexity and, when decoded, accuracy, with the share
of the baseline-to-teacher perplexity gap that distillation closes. The numbers come from the
test split when the study has one (``ReportData.on_test``): the validation split chose the
trials and their checkpoints, so its numbers are optimistic, and the verdict says so when it has
nothing else. The seed check then says whether the winner's lead is larger than what a change
of seed alone moves.
"""

from __future__ import annotations

import pandas as pd

from kdsweep.names import Group
from kdsweep.report.collect import ReportData
from kdsweep.report.compute import cost_sentence
from kdsweep.report.text import fmt, markdown_table, params_of, pct, points
from kdsweep.study.space import BY_NAME, form
from kdsweep.study.space import describe as describe_params


def render_verdict(data: ReportData) -> str:
    """The headline paragraph, the seed check's sentence when there was one, and for each newer
    recipe choice the study searched (the divergence, on-policy batches) whether it paid."""
    parts = ["## Verdict", _headline(data)]
    if sentence := seed_check_sentence(data):
        parts.append(f"**Seed check:** {sentence}")
    parts += [line for name in _CHOICES if (line := _choice(data, BY_NAME[name]))]
    return "\n\n".join(parts)


_CHOICES = {
    "beta": ("Divergence", "a divergence other than forward KL (beta > 0)", "forward KL (beta 0)"),
    "lmbda": (
        "On-policy batches",
        "on-policy batches (lmbda > 0)",
        "off-policy training (lmbda 0)",
    ),
}


def _choice(data: ReportData, p) -> str | None:
    """Best distilled trial with ``p`` away from its quiet value against the best at it."""
    if getattr(data.study.search, p.name).is_fixed:
        return None
    distilled = data.distilled
    on, off = (
        distilled[distilled[p.name] != p.quiet_at],
        distilled[distilled[p.name] == p.quiet_at],
    )
    title, with_it, without = _CHOICES[p.name]
    if on.empty or off.empty:
        tried = "only " + (with_it if off.empty else without)
        return (
            f"**{title}:** the complete distilled trials tried {tried}, so nothing compares "
            "the two."
        )
    best_on, best_off = on.iloc[0], off.iloc[0]
    wins = data.view.better(best_on.value, best_off.value)
    accuracy = ""
    if not pd.isna(best_on.exact_match) and not pd.isna(best_off.exact_match):
        accuracy = (
            f", exact match {pct(100 * best_on.exact_match)} against "
            f"{pct(100 * best_off.exact_match)}"
        )
    return (
        f"**{title}:** {with_it} {'beat' if wins else 'did not beat'} {without}: the best such "
        "trial "
        f"({data.trial_cell(best_on)}, {p.name} {p.show(best_on[p.name])}) reaches perplexity "
        f"{fmt(best_on.student_ppl)} "
        f"against {fmt(best_off.student_ppl)} ({data.trial_cell(best_off)}){accuracy}."
    )


def _headline(data: ReportData) -> str:
    baseline, distilled = data.best_baseline, data.best_distilled
    objective = data.study.primary_objective
    if distilled is None:
        return _no_distilled(data)
    if baseline is None:
        return (
            "**No baseline ran**, so nothing says whether distillation beats plain fine-tuning: "
            "add "
            f"`baselines: [{{alpha: 0, trials: 3}}]` to the study. The best distilled trial "
            f"({data.trial_cell(distilled)}: {describe(distilled)}) reaches {objective} "
            f"{fmt(distilled.value)}."
        )
    wins = data.view.better(data.shown_value(distilled), data.shown_value(baseline))
    lead = (
        "**Distillation beats the tuned baseline.**"
        if wins
        else f"**{data.baseline_kind.capitalize()} wins: distillation does not beat it.**"
    )
    sentences = [
        lead,
        _comparison(data, distilled, baseline),
        _forms(data, distilled, baseline),
        _accuracy_comparison(data, distilled, baseline),
        _control(data, distilled, baseline),
        _draws(data),
        _gap(data, distilled),
        _where(data),
        _more_steps(data, distilled),
        cost_sentence(data),
    ]
    return " ".join(s for s in sentences if s)


def _no_distilled(data: ReportData) -> str:
    """Why no distilled trial has completed, and the fix."""
    distilled = data.sweep[~data.sweep.baseline.astype(bool)]
    pruned = distilled[distilled.state == "PRUNED"]
    failed = distilled[distilled.state == "FAIL"]
    causes = []
    if len(pruned):
        steps = ", ".join(str(int(s)) for s in sorted(pruned.pruned_step.dropna().unique()))
        causes.append(f"{len(pruned)} pruned (at step {steps})")
    if len(failed):
        causes.append(f"{len(failed)} failed (see What went wrong)")
    if left := len(distilled) - len(pruned) - len(failed):
        causes.append(f"{left} not finished")
    fix = (
        "; a trial is pruned against its own arm only, after `pruner.n_startup_trials` of its "
        "peers: run more trials (`--n-trials`), or set `pruner.name: none`"
        if len(pruned)
        else ""
    )
    of = f" (of {len(distilled)}: {', '.join(causes)})" if causes else ""
    return (
        f"**No distilled trial has completed**{of}, so nothing says yet whether distillation "
        f"helps on this {data.study.primary_objective}{fix}."
    )


def _control(data: ReportData, distilled: pd.Series, baseline: pd.Series) -> str:
    """The winner against itself without the teacher: the teacher's share of the lead."""
    control = data.control
    if control is None:
        return ""
    ours, theirs = data.shown(distilled, "student_ppl"), data.shown(control, "student_ppl")
    if pd.isna(theirs):
        return ""
    against_baseline = _relative(ours, data.shown(baseline, "student_ppl"))
    share = (
        f"the teacher's share of the lead; against the tuned baseline it was {against_baseline}, "
        "and the rest is the searches'"
        if ours <= theirs
        else f"at these settings the teacher made the student worse (against the tuned baseline "
        f"it was {against_baseline})"
    )
    accuracy = ""
    em, their_em = data.shown(distilled, "exact_match"), data.shown(control, "exact_match")
    if not pd.isna(em) and not pd.isna(their_em):
        accuracy = f", exact match {pct(100 * em)} against {pct(100 * their_em)}"
    return (
        f"Against the same configuration without the teacher (the control, "
        f"{data.trial_cell(control)}: alpha 0 at the winner's learning rate, steps, seed and "
        f"form), the winner's perplexity is {fmt(ours)} against {fmt(theirs)}, "
        f"{_relative(ours, theirs)}{accuracy}: {share}."
    )


def _draws(data: ReportData) -> str:
    """When distillation's search drew more trials than the baselines': say so, with counts."""
    distilled, baseline = data.draws()
    if distilled <= baseline:
        return ""
    return (
        f"Distillation's search drew {distilled} trials against {baseline} for the baselines: "
        "the best of more draws is better by chance alone"
        + (", which the control leaves out." if data.control is not None else ".")
    )


def _comparison(data: ReportData, distilled: pd.Series, baseline: pd.Series) -> str:
    tried = len(data.baselines)
    trials = "trials" if tried > 1 else "trial"
    ppl, theirs = data.shown(distilled, "student_ppl"), data.shown(baseline, "student_ppl")
    return (
        f"On {data.split_label()}, the best distilled trial ({data.trial_cell(distilled)}: "
        f"{describe(distilled)}{_at_step(distilled)}) reaches perplexity {fmt(ppl)} against "
        f"{fmt(theirs)} for the best of {tried} {data.baseline_kind} {trials} "
        f"({data.trial_cell(baseline)}: {describe(baseline)}{_at_step(baseline)}), "
        f"{_relative(ppl, theirs)}."
    )


def _forms(data: ReportData, distilled: pd.Series, baseline: pd.Series) -> str:
    """Whether the two train the same student form (a study that tries LoRA says it)."""
    if not data.has_lora:
        return ""
    ours, theirs = form(distilled.lora_rank), form(baseline.lora_rank)
    if ours == theirs:
        return f"Like with like: both are {ours}."
    return (
        f"The forms differ: the distilled trial is {ours}, the baseline {theirs}, since no "
        f"baseline trained {ours} (add one: `baselines: [{{alpha: 0, lora_rank: "
        f"{int(distilled.lora_rank or 0)}, trials: 3}}]`)."
    )


def _at_step(trial: pd.Series) -> str:
    return "" if pd.isna(trial.best_step) else f"; best checkpoint at step {int(trial.best_step)}"


def _accuracy_comparison(data: ReportData, distilled: pd.Series, baseline: pd.Series) -> str:
    ours, theirs = data.shown(distilled, "exact_match"), data.shown(baseline, "exact_match")
    if pd.isna(ours) or pd.isna(theirs):
        return ""
    rouge_ours, rouge_theirs = data.shown(distilled, "rouge_l"), data.shown(baseline, "rouge_l")
    rows = data.accuracy_rows
    over = f" (over the {rows:,} rows decoded)" if rows else ""
    return (
        f"Exact match{over}: {pct(100 * ours)} against {pct(100 * theirs)} "
        f"({points(100 * (ours - theirs))}); ROUGE-L {fmt(rouge_ours, 3)} against "
        f"{fmt(rouge_theirs, 3)}."
    )


def _gap(data: ReportData, distilled: pd.Series) -> str:
    gap = data.gap_closed(data.shown(distilled, "student_ppl"))
    if gap is None:
        return ""
    return (
        f"It closes {pct(gap)} of the perplexity gap between that baseline and the teacher "
        f"({fmt(data.shown_teacher_ppl)})."
    )


def _where(data: ReportData) -> str:
    """What the numbers can be trusted for."""
    if data.on_test:
        return (
            "The sweep chose the trials and their checkpoints on the validation split "
            f"`{data.study.data.eval_split}`; these numbers are from rows it never saw."
        )
    return (
        "These numbers are optimistic: they come from the split the sweep selected the trials "
        "and their checkpoints on; give the study a `data.test_split` for a verdict on rows "
        "nothing was chosen on."
    )


def _more_steps(data: ReportData, distilled: pd.Series) -> str:
    """A best checkpoint at the last step may be a trial stopped before its best."""
    steps = data.study.train.max_steps
    if pd.isna(distilled.best_step) or int(distilled.best_step) < steps:
        return ""
    return (
        f"The best distilled trial's best checkpoint is its last step ({steps}): it may gain from "
        "more steps (`train.max_steps`)."
    )


def _relative(ppl: float, baseline: float) -> str:
    change = 100 * (ppl - baseline) / baseline
    return f"{pct(abs(change))} {'lower' if change < 0 else 'higher'}"


def describe(trial) -> str:
    """The parameters that mattered, as a reader wants them: at alpha 0 only the learning rate
    (and whatever else acts without a teacher)."""
    return describe_params(params_of(trial), short=False)


# ---------------------------------------------------------------- the seed check


def seed_check(data: ReportData) -> pd.DataFrame:
    """One row per configuration the seed check trained again: its objective (on the verdict's
    split) at the study's seed and each other seed, their mean and spread (standard deviation and
    range), and its exact match by seed when answers are decoded. Empty without a seed check."""
    checked = data.seed_check_runs[data.seed_check_runs.state == "COMPLETE"]
    rows = []
    by_number = data.trials.set_index("number", drop=False)
    for number, runs in checked.groupby("seed_check_of", sort=False):
        original = by_number.loc[int(number)]
        trials = [original, *(row for _, row in runs.sort_values("seed").iterrows())]
        values = pd.Series([data.shown_value(t) for t in trials], dtype=float)
        matches = pd.Series([data.shown(t, "exact_match") for t in trials], dtype=float)
        rows.append(
            {
                "number": int(number),
                "baseline": bool(original.baseline),
                "control": original.group == Group.CONTROL,
                "values": list(values),
                "mean": values.mean(),
                "std": values.std(ddof=1) if len(values) > 1 else 0.0,
                "range": values.max() - values.min(),
                "exact_match": list(matches),
            }
        )
    columns = ["number", "baseline", "control", "values", "mean", "std", "range", "exact_match"]
    frame = pd.DataFrame(rows, columns=columns)
    order = (
        frame["mean"].rank(ascending=data.lower_is_better, method="first") if len(frame) else []
    )
    return (
        frame.assign(order=order).sort_values("order").drop(columns="order")
        if len(frame)
        else frame
    )


def seed_check_sentence(data: ReportData) -> str | None:
    """Whether the best distilled configuration's lead over the best baseline, averaged over
    seeds, is larger than the seed spread (the larger range of the two across seeds)."""
    check = seed_check(data)
    baseline, distilled = data.best_baseline, data.best_distilled
    if check.empty or baseline is None or distilled is None:
        return None
    rows = check.set_index("number")
    if distilled.number not in rows.index or baseline.number not in rows.index:
        return None
    winner, compared = rows.loc[distilled.number], rows.loc[baseline.number]
    seeds = len(winner["values"])
    lead = (compared["mean"] - winner["mean"]) * (1 if data.lower_is_better else -1)
    spread = max(winner["range"], compared["range"])
    mean = (
        f"over {seeds} seeds the best distilled configuration averages {fmt(winner['mean'])} "
        f"and the best {data.baseline_kind} {fmt(compared['mean'])} "
        f"({data.study.primary_objective})"
    )
    accuracy = _accuracy_noise(winner, compared) + _control_noise(data, winner, rows)
    if lead > spread:
        return (
            f"{mean}: distillation's lead ({fmt(lead)}) is larger than the seed spread "
            f"({fmt(spread)}), so the win is not noise.{accuracy}"
        )
    if lead > 0:
        return (
            f"{mean}: distillation's lead ({fmt(lead)}) is within the seed spread "
            f"({fmt(spread)}), so these seeds do not tell the two apart.{accuracy}"
        )
    leads = f"{data.baseline_kind} leads by {fmt(-lead)} (seed spread {fmt(spread)})"
    return f"{mean}: {leads}.{accuracy}"


def _control_noise(data: ReportData, winner: pd.Series, rows: pd.DataFrame) -> str:
    """Whether the winner's lead over its control, over the same seeds, beats their spread."""
    control = data.control
    if control is None or control.number not in rows.index:
        return ""
    theirs = rows.loc[control.number]
    lead = (theirs["mean"] - winner["mean"]) * (1 if data.lower_is_better else -1)
    spread = max(winner["range"], theirs["range"])
    mean = f" The control (the winner at alpha 0) averages {fmt(theirs['mean'])}"
    if lead <= 0:
        return f"{mean}: it leads the winner by {fmt(-lead)} (seed spread {fmt(spread)})."
    verdict = "larger than" if lead > spread else "within"
    return (
        f"{mean}: the teacher's lead ({fmt(lead)}) is {verdict} the seed spread ({fmt(spread)})."
    )


def _accuracy_noise(winner: pd.Series, baseline: pd.Series) -> str:
    """Whether exact match's lead, over the same seeds, is larger than its own seed spread: on a
    few hundred rows a few points of exact match can be noise."""
    ours, theirs = pd.Series(winner["exact_match"]), pd.Series(baseline["exact_match"])
    if ours.isna().any() or theirs.isna().any():
        return ""
    lead = 100 * (ours.mean() - theirs.mean())
    spread = 100 * max(ours.max() - ours.min(), theirs.max() - theirs.min())
    verdict = "larger than" if abs(lead) > spread else "within"
    return (
        f" Exact match averages {pct(100 * ours.mean())} against {pct(100 * theirs.mean())}: its "
        f"lead ({points(lead)}) is {verdict} its seed spread ({spread:.1f} points)."
    )


def render_seed_check(data: ReportData) -> str:
    check = seed_check(data)
    if check.empty:
        return ""
    trials = data.trials.set_index("number", drop=False)
    frame = pd.DataFrame(
        [
            {
                "trial": data.trial_cell(trials.loc[row.number])
                + (" (baseline)" if row.baseline else "")
                + (" (control, alpha 0)" if row.control else ""),
                "parameters": describe(trials.loc[row.number]),
                f"{data.study.primary_objective} by seed": ", ".join(fmt(v) for v in row.values),
                **(
                    {"exact match by seed": ", ".join(pct(100 * v) for v in row.exact_match)}
                    if not pd.isna(row.exact_match).any()
                    else {}
                ),
                "mean": fmt(row.mean),
                "std": fmt(row.std, 3),
                "range": fmt(row.range, 3),
            }
            for row in check.itertuples()
        ]
    )
    intro = (
        f"Each configuration below trained again with {data.study.seed_check.seeds} other seed(s) "
        "(`seed_check` in the study; the first value is the sweep's own, at seed "
        f"{data.study.train.seed}), each at its best checkpoint, scored on {data.split_label()}. "
        "Its runs sit under the same parent run in MLflow, tagged `kdsweep.seed_check_of`, and "
        "never fed the sampler."
    )
    return "\n\n".join(["## Seed check", intro, markdown_table(frame)])
