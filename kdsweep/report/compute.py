"""The report's Compute section: what the answer cost in device-hours, part by part, and what
pruning saved (``cost`` reads it from the study's store)."""

from __future__ import annotations

import pandas as pd

from kdsweep.names import Group, StudyAttr
from kdsweep.report.collect import ReportData
from kdsweep.report.text import device_hours, duration, fmt, markdown_table, pct
from kdsweep.store.cost import StudyCost


def cost_sentence(data: ReportData) -> str:
    """The verdict's last sentence: what finding the answer cost."""
    spent = data.cost
    if not spent.total:
        return ""
    share = spent.teacher_cache_percent
    cache = f", {pct(share)} of it the teacher cache" if share is not None else ""
    return f"Found in {device_hours(spent.total)}{cache} (see Compute)."


def render_compute(data: ReportData) -> str:
    spent = data.cost
    counts = _counts(data)
    rows = [
        ("teacher cache (the teacher scoring the data once)", spent.teacher_cache, ""),
        ("preparation (models, data, references; every worker)", spent.preparation, ""),
        ("distilled trials, complete", spent.distilled, counts["distilled"]),
        ("baselines, complete", spent.baselines, counts["baselines"]),
        ("control (the winner at alpha 0)", spent.control, counts["control"]),
        ("seed check", spent.seed_check, counts["seed_check"]),
        ("pruned or failed trials", spent.pruned_or_failed, counts["lost"]),
        ("finals (the test split)", spent.finals, ""),
    ]
    table = [
        {
            "part": part,
            "trials": str(n),
            "device-hours": f"{seconds / 3600:.4f}",
            "share": pct(100 * seconds / spent.total) if spent.total else "",
        }
        for part, seconds, n in rows
        if seconds or n
    ]
    table.append(
        {
            "part": "**total**",
            "trials": "",
            "device-hours": f"{spent.total / 3600:.4f}",
            "share": "",
        }
    )
    lines = [
        "## Compute",
        "",
        "Device-hours are wall hours times the devices held (one per trial: its worker's GPU, or "
        f"the CPU); {device_hours(spent.total)} in all.",
        "",
        markdown_table(pd.DataFrame(table)),
        "",
        *(f"- {line}" for line in _facts(data, spent)),
    ]
    return "\n".join(lines)


def _facts(data: ReportData, spent: StudyCost) -> list[str]:
    facts = []
    if spent.median_complete is not None:
        facts.append(f"**Median complete trial**: {duration(spent.median_complete)}.")
    if spent.on_policy_step is not None and spent.cached_step:
        facts.append(
            f"**On-policy steps**: {fmt(1000 * spent.on_policy_step)} ms each against "
            f"{fmt(1000 * spent.cached_step)} ms for a step on the teacher cache "
            f"({spent.on_policy_step / spent.cached_step:.1f}x), the student's generation "
            "included."
        )
    facts.append(_pruning(data, spent))
    if reused := data.attrs.get(StudyAttr.TEACHER_CACHE_REUSED):
        facts.append(
            f"**Teacher cache**: reused, built for {', '.join(reused)}: it cost this study "
            "nothing."
        )
    if spent.unmeasured:
        facts.append(
            f"**Not counted**: {spent.unmeasured} trials ended with their worker (killed, a lost "
            "machine) before they could record their cost."
        )
    return facts


def _pruning(data: ReportData, spent: StudyCost) -> str:
    pruner = data.study.pruner.name
    rule = (
        "each arm is judged against its own (baselines against baselines, distilled trials "
        "against distilled trials, at the same step): a distilled trial is never pruned against "
        "plain fine-tuning's curves, and neither arm before it has peers of its own"
    )
    pruned = int((data.trials.state == "PRUNED").sum())
    if pruner == "none" and not pruned:
        return "**Pruning**: off (`pruner.name: none`): every trial ran all its steps."
    if pruner == "none":
        return (
            f"**Pruning**: off for the latest run's trials (`pruner.name: none`); {pruned} trials "
            f"of earlier runs were pruned, {spent.pruned_steps_not_run:,} steps short."
        )
    if not pruned:
        return f"**Pruning** (`{pruner}`): no trial was pruned; {rule}."
    return (
        f"**Pruning** (`{pruner}`): {pruned} trials stopped {spent.pruned_steps_not_run:,} steps "
        f"short, which saved about {device_hours(spent.pruning_saved)} (each one's steps not run "
        f"times its measured seconds per step); {rule}."
    )


def _counts(data: ReportData) -> dict[str, int]:
    trials = data.trials
    complete = trials[trials.state == "COMPLETE"]
    sweep = complete[~complete.group.isin([Group.SEED_CHECK, Group.CONTROL])]
    return {
        "distilled": int((~sweep.baseline.astype(bool)).sum()),
        "baselines": int(sweep.baseline.astype(bool).sum()),
        "control": int((complete.group == Group.CONTROL).sum()),
        "seed_check": int((complete.group == Group.SEED_CHECK).sum()),
        "lost": int(trials.state.isin(["PRUNED", "FAIL"]).sum()),
    }
