"""The report's figures: Optuna's importance, history and slice plots, and the eval curves.

Figures are drawn with fixed settings and saved without a software tag, so the same storage
gives the same PNG bytes. No backend is forced: nothing is shown, every figure is closed.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import matplotlib.pyplot as plt
import optuna
import pandas as pd
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter
from optuna.visualization.matplotlib import plot_param_importances, plot_pareto_front, plot_slice

from kdsweep.compat.optuna import FilteredStudy
from kdsweep.names import Metric
from kdsweep.report.analyses import complete_sweep, sampled_trials, study_of
from kdsweep.report.collect import ReportData
from kdsweep.report.text import objective_label, params_short
from kdsweep.store.trials import in_sweep, primary_value
from kdsweep.study.measures import MAXIMIZE, feasible

# Fixed figure settings: the same storage gives the same PNG bytes.
_RC = {
    "figure.figsize": (8.0, 4.5),
    "figure.dpi": 100,
    "savefig.dpi": 110,
    "font.size": 10,
    "axes.titlesize": 11,
    "path.simplify": False,
}


@dataclass(frozen=True)
class Figure:
    """A written figure (``path``) or why it was skipped."""

    name: str
    title: str
    path: Path | None = None
    skipped: str | None = None


def markdown_image(figure: Figure) -> str:
    """The figure as the report links it (relative to the report), or why it was not drawn
    (importances say why in their own words)."""
    if figure.path is None:
        return (
            f"*{figure.title}: not drawn ({figure.skipped}).*"
            if figure.skipped and figure.name != "importances"
            else ""
        )
    relative = f"{quote(figure.path.parent.name)}/{quote(figure.path.name)}"
    return f"![{figure.title}]({relative})"


def draw_figures(optuna_study: optuna.Study, data: ReportData, folder: Path) -> dict[str, Figure]:
    """Write the report's PNGs into ``folder``; a figure that cannot be drawn says why."""
    plans = {
        "importances": ("Parameter importances", lambda: _plot_importances(optuna_study, data)),
        "history": ("Optimization history", lambda: _plot_history(optuna_study, data)),
        "slice": ("Objective against each parameter", lambda: _plot_slice(optuna_study, data)),
        "curves": ("Eval perplexity of the top trials", lambda: _plot_curves(data)),
    }
    if data.study.multi_objective:
        plans["pareto"] = ("Pareto front", lambda: _plot_pareto(optuna_study, data))
    figures = {}
    for name, (title, plot) in plans.items():
        target = folder / f"{name}.png"
        with plt.style.context(["ggplot", _RC]), warnings.catch_warnings():
            # Optuna's plots are experimental, and one-trial axes warn about their limits: noise
            # here.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)
            skipped = _skip_reason(name, data)
            fig = None if skipped else plot()
            if fig is not None:
                folder.mkdir(parents=True, exist_ok=True)
                fig.savefig(target, metadata={"Software": None})
                plt.close(fig)
        if fig is None:
            target.unlink(missing_ok=True)  # no stale figure from an earlier report
        figures[name] = Figure(name, title, target if fig is not None else None, skipped)
    return figures


def _skip_reason(name: str, data: ReportData) -> str | None:
    if data.ranked.empty:
        return "no complete trial"
    if name == "importances" and data.importances.skipped:
        return data.importances.skipped
    if name == "pareto" and (count := len(data.study.objectives)) > 3:
        return f"Optuna draws the front of 2 or 3 objectives; this study has {count}"
    if name == "curves" and not data.curves:
        return f"no student_ppl history in MLflow ({data.tracking.problem or 'no run logged one'})"
    return None


def _plot_importances(optuna_study: optuna.Study, data: ReportData):
    sampled = sampled_trials(optuna_study.get_trials(deepcopy=False))
    ax = plot_param_importances(
        study_of(sampled, data.study.directions),
        evaluator=optuna.importance.PedAnovaImportanceEvaluator(),
        target=_first_objective(data),
        target_name=objective_label(data.study.primary_objective),
    )
    ax.set_title(
        f"Parameter importances (PED-ANOVA over {len(sampled)} complete trials)", loc="left"
    )
    ax.get_legend().remove()  # one objective: the legend only repeats the axis label
    ax.figure.set_size_inches(8.0, 3.5)
    ax.figure.tight_layout()
    return ax.figure


def _plot_history(optuna_study: optuna.Study, data: ReportData):
    """Each complete sweep trial's value at its number, and the best so far. Drawn here, not by
    Optuna's ``plot_optimization_history``: it indexes values by trial number, and a study whose
    seed-check trials are left out has gaps in its numbers (an IndexError)."""
    ranked = data.ranked.sort_values("number")
    fig, ax = plt.subplots()
    ax.scatter(
        ranked.number, ranked.value, s=18, label=objective_label(data.study.primary_objective)
    )
    best = ranked.value.cummin() if data.lower_is_better else ranked.value.cummax()
    ax.step(ranked.number, best, where="post", color="tab:red", label="best so far")
    teacher = {Metric.STUDENT_PPL: data.teacher_ppl, Metric.PPL_RATIO: 1.0}.get(
        data.study.primary_objective
    )
    if teacher:
        ax.axhline(teacher, color="black", linestyle=":", label=f"teacher {teacher:.4g}")
    if data.study.primary_objective in (Metric.STUDENT_PPL, Metric.PPL_RATIO):
        ax.set_yscale("log")
    ax.set_xlabel("trial")
    ax.set_ylabel(objective_label(data.study.primary_objective))
    ax.legend()
    better = "higher" if data.study.direction == MAXIMIZE else "lower"
    ax.set_title(f"Optimization history ({data.study.primary_objective}, {better} is better)")
    _integer_ticks(ax.xaxis)  # trial numbers
    return fig


def _plot_slice(optuna_study: optuna.Study, data: ReportData):
    axes = plot_slice(
        _feasible_sweep(optuna_study),
        target=_first_objective(data),
        target_name=objective_label(data.study.primary_objective),
    )
    axes = list(axes.flat) if hasattr(axes, "flat") else [axes]
    for ax in axes:
        _readable_log_axis(ax.xaxis)
    fig = axes[0].figure
    _integer_ticks(fig.axes[-1].yaxis)  # the colour bar of trial numbers
    fig.suptitle(
        f"{objective_label(data.study.primary_objective)} of each complete trial against each "
        "parameter (darker: later trial)"
    )
    fig.set_size_inches(2.6 * len(axes) + 1.5, 4.5)
    return fig


def _feasible_sweep(optuna_study: optuna.Study) -> FilteredStudy:
    """The study without its seed-check runs, which repeat configurations already shown, and
    without its infeasible trials, which the best and the report leave out."""
    return FilteredStudy(optuna_study, lambda t: in_sweep(t) and feasible(t.constraints))


def _first_objective(data: ReportData):
    """What a plot of one value shows: the only objective, or the first of several (Optuna's
    plots take a ``target`` for a multi-objective study)."""
    return primary_value if data.study.multi_objective else None


def _plot_pareto(optuna_study: optuna.Study, data: ReportData):
    """Optuna's Pareto-front plot of the complete, feasible sweep trials (infeasible ones shown
    apart), for 2 or 3 objectives."""
    sweep = complete_sweep(optuna_study)
    ax = plot_pareto_front(
        sweep, target_names=[objective_label(name) for name in data.study.objectives]
    )
    figure = ax.figure
    count = len(sweep.get_trials(deepcopy=False))
    # replaces Optuna's own title ("Pareto-front Plot"); "Best Trial" in its legend: the front
    ax.set_title(f"Pareto front of {count} complete trials")
    figure.set_size_inches(7.0, 5.0)
    figure.tight_layout()
    return figure


def _plot_curves(data: ReportData):
    fig, ax = plt.subplots()
    ranks = {int(n): i + 1 for i, n in enumerate(data.top.number)}
    trials = data.trials.set_index("number")
    for number, points in sorted(
        data.curves.items(), key=lambda item: (ranks.get(item[0], 10**9), item[0])
    ):
        trial = trials.loc[number]
        baseline = bool(trial.baseline)
        rank = f"#{ranks[number]} " if number in ranks else ""
        label = f"{rank}trial {number}{' (baseline)' if baseline else ''}: {params_short(trial)}"
        ax.plot(
            points.step,
            points.student_ppl,
            marker="o",
            markersize=3,
            linestyle="--" if baseline else "-",
            label=label,
        )
    if data.teacher_ppl:
        ax.axhline(
            data.teacher_ppl, color="black", linestyle=":", label=f"teacher {data.teacher_ppl:.4g}"
        )
    values = pd.concat([p.student_ppl for p in data.curves.values()])
    log = values.min() > 0 and values.max() / values.min() > 20  # early evals far above the rest
    if log:
        ax.set_yscale("log")
        _readable_log_axis(ax.yaxis)
    ylabel = "student perplexity (eval" + (", log scale)" if log else ")")
    ax.set(
        xlabel="training step",
        ylabel=ylabel,
        title="Eval perplexity: top trials against the best baseline",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _readable_log_axis(axis) -> None:
    """Short labels (5, 2e-3) at 1-2-5 steps on a log axis, instead of matplotlib's 2x10^-4
    labels, which overlap when the axis spans less than a decade."""
    if axis.get_scale() != "log":
        return
    low, high = sorted(axis.get_view_interval())
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    ticks = [m * 10.0**d for d in decades for m in (1, 2, 5) if low <= m * 10.0**d <= high]
    axis.set_major_locator(FixedLocator(ticks) if len(ticks) >= 2 else MaxNLocator(nbins=3))
    axis.set_major_formatter(FuncFormatter(lambda x, _: _tick(x)))
    axis.set_minor_formatter(NullFormatter())


def _integer_ticks(axis) -> None:
    axis.set_major_locator(MaxNLocator(integer=True))


def _tick(x: float) -> str:
    if x == 0 or 0.001 <= abs(x) < 10_000:
        return f"{x:g}"
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"
