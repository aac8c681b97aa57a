"""The report's sections on trade-offs: the student's form (full fine-tuning against a LoRA
adapter, when a study searches it) and a multi-objective study's Pareto front."""

from __future__ import annotations

import pandas as pd

from kdsweep.names import Metric
from kdsweep.report.collect import ReportData
from kdsweep.report.figures import Figure, markdown_image
from kdsweep.report.text import (
    as_float,
    fmt,
    markdown_table,
    measure_text,
    params_cell,
    pct,
    percent_of,
)
from kdsweep.study.space import form


def other_objectives(data: ReportData) -> list[tuple[int, str]]:
    """The objectives a table of trials shows beside perplexity, exact match and the ratio to the
    teacher (a cost, ROUGE-L, ...), with their places in a trial's values."""
    shown = (Metric.STUDENT_PPL, Metric.EXACT_MATCH, Metric.PPL_RATIO)
    return [(i, name) for i, name in enumerate(data.study.objectives) if name not in shown]


def render_forms(data: ReportData) -> str:
    """Full fine-tuning against LoRA: each form's best trial of each kind, the learning rate it
    trained at, what it trained; then a line comparing the best full and the best LoRA
    configurations."""
    if not data.has_lora:
        return ""
    ranked = data.ranked.assign(rank=data.ranked.lora_rank.fillna(0).astype(int))
    rows = []
    for (rank, baseline), trials in ranked.groupby(["rank", "baseline"], sort=True):
        best = trials.iloc[0]
        rows.append(
            {
                "form": form(rank),
                "kind": "baseline" if baseline else "distilled",
                "trials": str(len(trials)),
                "best trial": data.trial_cell(best),
                "student ppl": fmt(best.student_ppl),
                **(
                    {"exact match": pct(percent_of(best.exact_match))} if data.has_accuracy else {}
                ),
                "learning rate (trained at)": f"{_trained_rate(data, best):.2e}",
                "trainable parameters": measure_text(
                    Metric.TRAINABLE_PARAMETERS, best.trainable_parameters
                ),
            }
        )
    scale = data.study.student.lora.learning_rate_scale
    parts = [
        "## Student form",
        "Each form's best complete trial of each kind, on the validation split. A LoRA trial "
        f"trains at its `learning_rate` times {scale:g} (`student.lora.learning_rate_scale`).",
        markdown_table(pd.DataFrame(rows)),
    ]
    if line := _full_against_lora(data, ranked):
        parts.append(line)
    return "\n\n".join(parts)


def _full_against_lora(data: ReportData, ranked: pd.DataFrame) -> str:
    distilled = ranked[~ranked.baseline]
    full, lora = distilled[distilled["rank"] == 0], distilled[distilled["rank"] > 0]
    if full.empty or lora.empty:
        tried = "LoRA" if full.empty else "full fine-tuning"
        return f"The complete distilled trials tried only {tried}, so nothing compares the two."
    best_full, best_lora = full.iloc[0], lora.iloc[0]
    change = 100 * (best_lora.student_ppl - best_full.student_ppl) / best_full.student_ppl
    share = ""
    trained, whole = (as_float(t.trainable_parameters) for t in (best_lora, best_full))
    if trained and whole:
        share = f", training {pct(100 * trained / whole)} of the parameters"
    return (
        f"**Full fine-tuning against LoRA:** the best LoRA configuration "
        f"({form(best_lora['rank'])}, trial {data.trial_cell(best_lora)}) reaches perplexity "
        f"{fmt(best_lora.student_ppl)} against {fmt(best_full.student_ppl)} for the best full "
        f"fine-tuning one (trial {data.trial_cell(best_full)}), {pct(abs(change))} "
        f"{'higher' if change > 0 else 'lower'}{share}."
    )


def _trained_rate(data: ReportData, trial) -> float:
    return data.study.student.lora.learning_rate(trial.learning_rate, int(trial["rank"]))


def render_pareto(data: ReportData, figures: dict[str, Figure]) -> str:
    """A multi-objective study's trade-off: the trials no other beats in every objective."""
    if not data.study.multi_objective:
        return ""
    front = data.pareto
    objectives = data.study.objectives
    rows = [
        {
            "trial": data.trial_cell(trial) + (" (baseline)" if trial.baseline else ""),
            "parameters": params_cell(trial),
            **{
                f"{name} ({direction[:3]})": measure_text(name, value)
                for name, direction, value in zip(
                    objectives, data.study.directions, trial["values"]
                )
            },
        }
        for _, trial in front.iterrows()
    ]
    complete = len(data.ranked)
    intro = (
        f"{len(front)} of the {complete} complete{' feasible' if data.study.constraints else ''} "
        f"trials (baselines included) {'is' if len(front) == 1 else 'are'} on the Pareto front: "
        "no other trial is as good in every "
        f"objective and better in one ({', '.join(objectives)}; min: minimized, max: "
        "maximized). Sorted by the first objective, which the verdict uses."
    )
    parts = [
        "## Pareto front",
        intro,
        markdown_table(pd.DataFrame(rows)),
        markdown_image(figures["pareto"]),
    ]
    return "\n\n".join(p for p in parts if p)
