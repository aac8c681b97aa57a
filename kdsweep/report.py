"""`kdsweep report`: study + runs -> pandas -> Markdown + plots.

The report is read from the Optuna storage (trials, their user attrs, the study's reference
perplexities) and from the study's MLflow runs (eval curves, run status and reasons). It is
built in three steps, each testable on its own:

1. ``collect`` gathers everything into one :class:`ReportData` (a pandas DataFrame of trials,
   the reference numbers, the eval curves and the parameter importances);
2. ``draw_figures`` writes the PNGs next to the Markdown file;
3. ``render`` turns the data into Markdown, one short function per section.

The output depends only on the storage: no generation time, stable sort orders (ties broken by
trial number), fixed matplotlib settings and no PNG software tag, so generating it twice gives
identical bytes. Imports optuna, mlflow, pandas and matplotlib (lazily), never torch.
"""

from __future__ import annotations

import json
import math
import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import optuna
import pandas as pd
import yaml
from optuna.trial import FrozenTrial, TrialState

from kdsweep import __version__
from kdsweep.config import SEARCHED, WHOLE_VOCAB, StudyConfig

SECTIONS = ("Reference points", "Top configurations", "What mattered", "What went wrong")
LOCAL_UI = "http://127.0.0.1:5000"  # where `kdsweep ui` serves a local tracking store
TOPK_MASS_WARN = 0.90  # a top-k that keeps less of the teacher's probability mass is worth a warning
STABLE_TOP_TRIALS = 5  # PED-ANOVA wants about this many trials in its top quantile
RANGE_EDGE = 0.05  # a best value this close to a range's end (as a share of the range) suggests widening it
_STATE_WORDS = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


def write_report(study: StudyConfig, output: str | None = None) -> Path:
    """Write ``reports/<study>.md`` (or ``output``) and its figures; log both on the parent run.

    Raises UsageError (exit 2) when the study was never run; creates nothing in that case.
    """
    from kdsweep.sweep import load_existing_study

    optuna_study = load_existing_study(study)
    path = Path(output) if output else Path("reports") / f"{study.name}.md"
    figure_dir = path.parent / path.stem
    data = collect(study, optuna_study)
    figures = draw_figures(optuna_study, data, figure_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(data, figures))
    _log_artifacts(data, path, figure_dir)
    return path


# ================================================================ collecting the data


@dataclass
class Tracking:
    """Where the study's MLflow runs live, and how the report links to them."""

    uri: str | None
    experiment_id: str | None
    parent_run_id: str | None
    link_base: str | None = None  # http(s) address of the MLflow UI
    local: bool = True  # a local store: links assume `kdsweep ui` is serving it
    problem: str | None = None  # why the runs could not be read

    def run_link(self, run_id) -> str | None:
        if not (self.link_base and self.experiment_id and isinstance(run_id, str)):
            return None
        # The query keeps MLflow 3's UI on its model-training pages rather than its GenAI ones.
        return f"{self.link_base}/#/experiments/{self.experiment_id}/runs/{run_id}?workflowType=machine_learning"


@dataclass
class Importances:
    """Parameter importances, or why there are none."""

    values: pd.Series | None  # parameter -> importance, largest first
    evaluator: str
    n_trials: int
    skipped: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class ReportData:
    """Everything the report shows, read once from the Optuna storage and MLflow."""

    study: StudyConfig
    attrs: dict  # the Optuna study's user attrs
    trials: pd.DataFrame  # one row per trial, by number (see trials_frame)
    tracking: Tracking
    curves: dict[int, pd.DataFrame] = field(default_factory=dict)  # trial -> student_ppl by step
    importances: Importances | None = None

    @property
    def ranked(self) -> pd.DataFrame:
        """Complete trials, best first; ties go to the earlier trial."""
        complete = self.trials[self.trials.state == "COMPLETE"]
        return complete.sort_values(["value", "number"], kind="mergesort")

    @property
    def top(self) -> pd.DataFrame:
        return self.ranked.head(self.study.report_top_n)

    @property
    def best_plain(self) -> pd.Series | None:
        """The best plain fine-tuning trial (alpha 0), the baseline distillation has to beat."""
        plain = self.ranked[self.ranked.alpha == 0]
        return plain.iloc[0] if len(plain) else None

    @property
    def best_distilled(self) -> pd.Series | None:
        distilled = self.ranked[self.ranked.alpha != 0]
        return distilled.iloc[0] if len(distilled) else None

    @property
    def teacher_ppl(self) -> float | None:
        return _float(self.attrs.get("teacher_ppl"))

    @property
    def untrained_ppl(self) -> float | None:
        return _float(self.attrs.get("student_ppl_untrained"))

    def gap_closed(self, ppl) -> float | None:
        """Share (in %) of the untrained-student-to-teacher perplexity gap that ``ppl`` closes."""
        teacher, untrained, ppl = self.teacher_ppl, self.untrained_ppl, _float(ppl)
        if teacher is None or untrained is None or ppl is None or untrained <= teacher:
            return None
        return 100 * (untrained - ppl) / (untrained - teacher)


def collect(study: StudyConfig, optuna_study: optuna.Study) -> ReportData:
    """Read the study's trials, MLflow runs, curves and importances into one ReportData."""
    trials = optuna_study.get_trials(deepcopy=False)
    data = ReportData(study, dict(optuna_study.user_attrs), trials_frame(trials), _tracking(study, optuna_study))
    runs = _read_runs(data.tracking)
    data.trials = _merge_runs(data.trials, runs)
    data.curves = _read_curves(data)
    data.importances = compute_importances(trials)
    return data


def trials_frame(trials: list[FrozenTrial]) -> pd.DataFrame:
    """One row per trial: state, objective, the four parameters, final metrics, timing, reasons."""
    rows = [_trial_row(t) for t in trials]
    frame = pd.DataFrame(rows, columns=list(_trial_row(None).keys()))
    # Object columns keep top_k's ints (and "all") and run ids as they are, even beside a None.
    for column in ("top_k", "mlflow_run_id"):
        frame[column] = pd.Series([row[column] for row in rows], index=frame.index, dtype=object)
    return frame.sort_values("number", kind="mergesort").reset_index(drop=True)


def _trial_row(trial: FrozenTrial | None) -> dict:
    attrs = trial.user_attrs if trial else {}
    params = attrs.get("params") or (trial.params if trial else {})
    steps = sorted(trial.intermediate_values.items()) if trial else []
    return {
        "number": trial.number if trial else 0,
        "state": trial.state.name if trial else "",
        "value": trial.value if trial else None,
        "baseline": bool(attrs.get("baseline", False)),
        **{name: params.get(name) for name in SEARCHED},
        "student_ppl": attrs.get("student_ppl"),
        "ppl_ratio": attrs.get("ppl_ratio"),
        "kl_to_teacher": attrs.get("kl_to_teacher"),
        "duration_s": trial.duration.total_seconds() if trial and trial.duration else None,
        "started": trial.datetime_start if trial else None,
        "ended": trial.datetime_complete if trial else None,
        "mlflow_run_id": attrs.get("mlflow_run_id"),
        "fail_reason": attrs.get("fail_reason"),
        "pruned_step": attrs.get("pruned_step", steps[-1][0] if steps else None),
        "last_reported": steps[-1][1] if steps else None,
        "topk_mass": attrs.get("topk_mass"),
    }


def _tracking(study: StudyConfig, optuna_study: optuna.Study) -> Tracking:
    from kdsweep.tracking import tracking_uri

    uri = tracking_uri(study.tracking.uri)
    attrs = optuna_study.user_attrs
    tracking = Tracking(uri, attrs.get("mlflow_experiment_id"), attrs.get("mlflow_parent_run_id"))
    if uri and uri.startswith(("http://", "https://")):
        tracking.link_base, tracking.local = uri.rstrip("/"), False
    else:
        tracking.link_base = LOCAL_UI
    if tracking.parent_run_id is None or tracking.experiment_id is None:
        tracking.problem = "the study has no MLflow parent run (it was never attached to MLflow)"
    elif uri and uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        # Opening a missing SQLite store would create an empty one; a report only reads.
        tracking.problem = f"the MLflow store {uri} does not exist"
    return tracking


def _client(tracking: Tracking):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking.uri)


def _read_runs(tracking: Tracking) -> pd.DataFrame:
    """The parent's nested runs as a DataFrame shaped like ``mlflow.search_runs``' (run_id,
    status, tags.*, metrics.*), read through a client bound to the study's tracking URI rather
    than MLflow's process-wide one."""
    if tracking.problem:
        return pd.DataFrame(columns=["run_id", "status"])
    from mlflow.exceptions import MlflowException

    client, runs, token = _client(tracking), [], None
    query = f"tags.`mlflow.parentRunId` = '{tracking.parent_run_id}'"
    try:
        while True:
            page = client.search_runs([tracking.experiment_id], filter_string=query, max_results=1000, page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                break
    except MlflowException as exc:
        tracking.problem = f"the MLflow runs could not be read: {str(exc).splitlines()[0]}"
        return pd.DataFrame(columns=["run_id", "status"])
    rows = [
        {
            "run_id": r.info.run_id,
            "status": r.info.status,
            **{f"tags.{k}": v for k, v in r.data.tags.items()},
            **{f"metrics.{k}": v for k, v in r.data.metrics.items()},
        }
        for r in runs
    ]
    return pd.DataFrame(rows).sort_values("run_id", kind="mergesort") if rows else pd.DataFrame(columns=["run_id", "status"])


def _merge_runs(trials: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Add each trial's MLflow status, recorded reason and whether any latest metric is not finite."""
    keep = runs.reindex(columns=["run_id", "status", "tags.kdsweep.reason"])
    keep.columns = ["mlflow_run_id", "run_status", "run_reason"]
    keep = keep.astype(object)
    metric_columns = [c for c in runs.columns if c.startswith("metrics.")]
    keep["nonfinite_metrics"] = [
        ", ".join(c.removeprefix("metrics.") for c in metric_columns if not _finite(row[c]) and not pd.isna(row[c]))
        for _, row in runs.iterrows()
    ]
    return trials.merge(keep, on="mlflow_run_id", how="left")


def _read_curves(data: ReportData) -> dict[int, pd.DataFrame]:
    """student_ppl by eval step for the top trials and the best plain baseline."""
    if data.tracking.problem:
        return {}
    client = _client(data.tracking)
    wanted = list(data.top.itertuples())
    if (plain := data.best_plain) is not None and plain.number not in data.top.number.values:
        wanted.append(plain)
    curves = {}
    for trial in wanted:
        if not isinstance(trial.mlflow_run_id, str):
            continue
        history = client.get_metric_history(trial.mlflow_run_id, "student_ppl")
        points = pd.DataFrame([(m.step, m.value) for m in history], columns=["step", "student_ppl"])
        if len(points):
            curves[int(trial.number)] = points.sort_values("step", kind="mergesort").drop_duplicates("step", keep="last")
    return curves


# ================================================================ parameter importances


def compute_importances(trials: list[FrozenTrial]) -> Importances:
    """PED-ANOVA importances (Optuna's default evaluator: deterministic, handles categorical
    top_k) over the complete trials the sampler chose. Baselines are left out: their fixed
    values (alpha 0) lie outside the search space and would dominate the estimate."""
    evaluator_name = "PED-ANOVA (optuna.importance.PedAnovaImportanceEvaluator, Optuna's default)"
    sampled = sampled_trials(trials)
    result = Importances(None, evaluator_name, len(sampled))
    searched = {name for t in sampled for name, dist in t.distributions.items() if not dist.single()}
    if len(sampled) < 2:
        result.skipped = f"importances need at least 2 complete non-baseline trials; this study has {len(sampled)}"
    elif not searched:
        result.skipped = "no parameter is searched (every one is fixed), so there is nothing to rank"
    if result.skipped:
        return result
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = optuna.importance.get_param_importances(
            importance_study(sampled), evaluator=optuna.importance.PedAnovaImportanceEvaluator()
        )
    result.values = pd.Series(values, dtype=float).rename_axis("parameter").rename("importance")
    result.warnings = sorted({str(w.message) for w in caught if "optuna" in w.filename})
    return result


def sampled_trials(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The complete trials whose parameters the sampler chose (baselines were fixed by hand)."""
    return [t for t in trials if t.state == TrialState.COMPLETE and not t.user_attrs.get("baseline")]


def importance_study(trials: list[FrozenTrial]) -> optuna.Study:
    """An in-memory copy of the study holding only ``trials``, for the evaluators and plots."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created in memory" line
    try:
        copy = optuna.create_study(direction="minimize")
    finally:
        optuna.logging.set_verbosity(verbosity)
    copy.add_trials(trials)
    return copy


# ================================================================ figures

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


def draw_figures(optuna_study: optuna.Study, data: ReportData, folder: Path) -> dict[str, Figure]:
    """Write the report's PNGs into ``folder``; a figure that cannot be drawn says why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plans = {
        "importances": ("Parameter importances", lambda: _plot_importances(optuna_study, data)),
        "history": ("Optimization history", lambda: _plot_history(optuna_study, data)),
        "slice": ("Objective against each parameter", lambda: _plot_slice(optuna_study, data)),
        "curves": ("Eval perplexity of the top trials", lambda: _plot_curves(data)),
    }
    figures = {}
    for name, (title, plot) in plans.items():
        target = folder / f"{name}.png"
        with plt.style.context(["ggplot", _RC]), warnings.catch_warnings():
            # Optuna's plots are experimental, and one-trial axes warn about their limits: noise here.
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
    if name == "curves" and not data.curves:
        return f"no student_ppl history in MLflow ({data.tracking.problem or 'no run logged one'})"
    return None


def _objective_label(study: StudyConfig) -> str:
    return {"student_ppl": "student perplexity", "ppl_ratio": "student / teacher perplexity"}[study.objective]


def _plot_importances(optuna_study: optuna.Study, data: ReportData):
    from optuna.visualization.matplotlib import plot_param_importances

    sampled = sampled_trials(optuna_study.get_trials(deepcopy=False))
    ax = plot_param_importances(
        importance_study(sampled),
        evaluator=optuna.importance.PedAnovaImportanceEvaluator(),
        target_name=_objective_label(data.study),
    )
    ax.set_title(f"Parameter importances (PED-ANOVA over {len(sampled)} complete trials)", loc="left")
    ax.get_legend().remove()  # one objective: the legend only repeats the axis label
    ax.figure.set_size_inches(8.0, 3.5)
    ax.figure.tight_layout()
    return ax.figure


def _plot_history(optuna_study: optuna.Study, data: ReportData):
    from optuna.visualization.matplotlib import plot_optimization_history

    ax = plot_optimization_history(optuna_study, target_name=_objective_label(data.study))
    teacher = {"student_ppl": data.teacher_ppl, "ppl_ratio": 1.0}[data.study.objective]
    if teacher:
        ax.axhline(teacher, color="black", linestyle=":", label=f"teacher {teacher:.4g}")
        ax.legend()
    ax.set_title(f"Optimization history ({data.study.objective}, lower is better)")
    _integer_ticks(ax.xaxis)  # trial numbers
    return ax.figure


def _plot_slice(optuna_study: optuna.Study, data: ReportData):
    from optuna.visualization.matplotlib import plot_slice

    axes = plot_slice(optuna_study, target_name=_objective_label(data.study))
    axes = list(axes.flat) if hasattr(axes, "flat") else [axes]
    for ax in axes:
        _readable_log_axis(ax.xaxis)
    fig = axes[0].figure
    _integer_ticks(fig.axes[-1].yaxis)  # the colour bar of trial numbers
    fig.suptitle(f"{_objective_label(data.study)} of each complete trial against each parameter (darker: later trial)")
    fig.set_size_inches(2.6 * len(axes) + 1.5, 4.5)
    return fig


def _plot_curves(data: ReportData):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ranks = {int(n): i + 1 for i, n in enumerate(data.top.number)}
    trials = data.trials.set_index("number")
    for number, points in sorted(data.curves.items(), key=lambda item: (ranks.get(item[0], 10**9), item[0])):
        trial = trials.loc[number]
        plain = trial.alpha == 0
        rank = f"#{ranks[number]} " if number in ranks else ""
        label = f"{rank}trial {number}{' (plain fine-tuning)' if plain else ''}: {_params_short(trial)}"
        ax.plot(points.step, points.student_ppl, marker="o", markersize=3, linestyle="--" if plain else "-", label=label)
    if data.teacher_ppl:
        ax.axhline(data.teacher_ppl, color="black", linestyle=":", label=f"teacher {data.teacher_ppl:.4g}")
    values = pd.concat([p.student_ppl for p in data.curves.values()])
    log = values.min() > 0 and values.max() / values.min() > 20  # early evals far above the rest
    if log:
        ax.set_yscale("log")
        _readable_log_axis(ax.yaxis)
    ylabel = "student perplexity (eval" + (", log scale)" if log else ")")
    ax.set(xlabel="training step", ylabel=ylabel, title="Eval perplexity: top trials against plain fine-tuning")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _readable_log_axis(axis) -> None:
    """Short labels (5, 2e-3) at 1-2-5 steps on a log axis, instead of matplotlib's 2x10^-4
    labels, which overlap when the axis spans less than a decade."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter

    if axis.get_scale() != "log":
        return
    low, high = sorted(axis.get_view_interval())
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    ticks = [m * 10.0**d for d in decades for m in (1, 2, 5) if low <= m * 10.0**d <= high]
    axis.set_major_locator(FixedLocator(ticks) if len(ticks) >= 2 else MaxNLocator(nbins=3))
    axis.set_major_formatter(FuncFormatter(lambda x, _: _tick(x)))
    axis.set_minor_formatter(NullFormatter())


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _tick(x: float) -> str:
    if x == 0 or 0.001 <= abs(x) < 10_000:
        return f"{x:g}"
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _params_short(trial) -> str:
    if trial.alpha == 0:
        return f"lr={_fmt_lr(trial.learning_rate)}"
    return f"a={_fmt(trial.alpha, 2)} T={_fmt(trial.temperature, 2)} k={trial.top_k} lr={_fmt_lr(trial.learning_rate)}"


# ================================================================ rendering


def render(data: ReportData, figures: dict[str, Figure]) -> str:
    """The whole Markdown report; a study without a complete trial gets a short one."""
    parts = [render_header(data)]
    if data.ranked.empty:
        parts.append(render_no_complete(data))
    else:
        parts += [render_references(data), render_top(data), render_what_mattered(data, figures)]
    parts.append(render_what_went_wrong(data))
    return "\n\n".join(p.strip("\n") for p in parts) + "\n"


def render_header(data: ReportData) -> str:
    study, attrs, trials = data.study, data.attrs, data.trials
    counts = trials.state.value_counts()
    states = ", ".join(f"{counts.get(s, 0)} {word}" for s, word in _STATE_WORDS.items() if s != "WAITING" or counts.get(s, 0))
    durations = trials.duration_s.dropna()
    complete = data.ranked.duration_s.dropna()
    train = (attrs.get("config") or study.to_dict())["train"]  # what the trials ran with, --set included
    lines = [
        f"# kdsweep report: {study.name}",
        "",
        f"- **Teacher**: `{study.teacher.name}`; **student**: `{study.student.name}`",
        f"- **Dataset**: `{study.data.dataset}` ({_sizes(attrs, study)})",
        f"- **Objective**: `{study.objective}` ({_objective_label(study)}), minimized",
        f"- **Trials**: {len(trials)} ({states}); target {study.n_trials}",
        f"- **Compute**: {_duration(durations.sum())} of trial wall time in total; "
        + (f"median {_duration(complete.median())} per complete trial" if len(complete) else "no complete trial"),
        f"- **Trials ran**: {_period(trials)}",
        f"- **Fixed settings** (as run): {train['max_steps']} steps of batch {train['batch_size']} x {train['grad_accum_steps']}, "
        f"eval every {train['eval_every']} steps, precision {train['precision']}, seed {train['seed']}",
        f"- **Config fingerprint**: `{attrs.get('fingerprint', study.fingerprint())}`; **kdsweep** {__version__}",
    ]
    return "\n".join(lines)


def _sizes(attrs: dict, study: StudyConfig) -> str:
    if "train_rows" not in attrs:
        return f"splits {study.data.train_split} / {study.data.eval_split}"
    return (
        f"{study.data.train_split}: {attrs['train_rows']:,} rows, {attrs.get('train_scored_tokens', 0):,} scored tokens; "
        f"{study.data.eval_split}: {attrs['eval_rows']:,} rows, {attrs.get('eval_scored_tokens', 0):,} scored tokens; "
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
        f"The study holds {len(data.trials)} trial(s) and none has completed, so there is nothing to rank yet. "
        "Run `kdsweep run` on it again; the failed and pruned trials are listed below."
    )


def render_references(data: ReportData) -> str:
    rows = [
        ("teacher", "", data.teacher_ppl),
        ("untrained student", "", data.untrained_ppl),
    ]
    plain, distilled = data.best_plain, data.best_distilled
    if plain is not None:
        rows.append(("best plain fine-tuning (alpha 0)", _trial_cell(data, plain), plain.student_ppl))
    if distilled is not None:
        rows.append(("best distilled trial", _trial_cell(data, distilled), distilled.student_ppl))
    frame = pd.DataFrame(
        [
            {
                "reference": name,
                "trial": trial,
                "perplexity": _fmt(ppl),
                "ratio to teacher": _fmt(_ratio(data, ppl)),
                "gap closed": _pct(data.gap_closed(ppl)) if trial else "",
            }
            for name, trial, ppl in rows
        ]
    )
    return "\n\n".join(["## Reference points", markdown_table(frame), _reference_verdict(data)])


def _reference_verdict(data: ReportData) -> str:
    best = data.ranked.iloc[0]
    gap = data.gap_closed(best.student_ppl)
    text = (
        f"The best trial (trial {best.number}) reaches perplexity {_fmt(best.student_ppl)}, "
        f"closing {_pct(gap)} of the gap between the untrained student and the teacher."
        if gap is not None
        else f"The best trial (trial {best.number}) reaches perplexity {_fmt(best.student_ppl)}."
    )
    plain, distilled = data.best_plain, data.best_distilled
    if plain is None:
        return text + " The study has no plain fine-tuning baseline (`baselines: [{alpha: 0}]`), so it cannot tell whether distillation beats it."
    if distilled is None:
        return text + " No distilled trial has completed yet."
    delta = plain.student_ppl - distilled.student_ppl
    verdict = "beats" if delta > 0 else "does not beat"
    return text + (
        f" Distillation {verdict} plain fine-tuning on the same budget: "
        f"{_fmt(distilled.student_ppl)} against {_fmt(plain.student_ppl)} ({_signed(-delta)} perplexity)."
    )


def render_top(data: ReportData) -> str:
    frame = top_table(data)
    best = data.ranked.iloc[0]
    intro = f"The {len(frame)} best of {len(data.ranked)} complete trials by `{data.study.objective}`."
    if (data.top.alpha == 0).any():
        intro += " Temperature and top_k do nothing at alpha 0, so plain fine-tuning rows leave them blank."
    parts = ["## Top configurations", intro, markdown_table(frame)]
    if data.tracking.local:
        parts.append(
            f"Run links point at a local MLflow store: they open while `kdsweep ui {_study_file(data.study)}` serves it on {LOCAL_UI}."
        )
    parts += [
        f"**Best configuration** (trial {best.number}, {data.study.objective} {_fmt(best.value)}), ready to paste into a study file:",
        "```yaml\n" + best_config_yaml(best) + "```",
        "Reproduce it alone, as a new one-trial study:",
        "```bash\n" + reproduce_command(data, best) + "\n```",
    ]
    return "\n\n".join(parts)


def top_table(data: ReportData) -> pd.DataFrame:
    """The top-N table as strings: what the Markdown shows."""
    rows = []
    for rank, trial in enumerate(data.top.itertuples(), start=1):
        plain = trial.alpha == 0
        link = data.tracking.run_link(trial.mlflow_run_id)
        rows.append(
            {
                "rank": str(rank),
                "trial": f"{trial.number}" + (" (baseline)" if trial.baseline else ""),
                "alpha": _fmt(trial.alpha),
                "temperature": "" if plain else _fmt(trial.temperature),
                "top_k": "" if plain else str(trial.top_k),
                "learning rate": _fmt_lr(trial.learning_rate),
                "student ppl": _fmt(trial.student_ppl),
                "ratio to teacher": _fmt(_ratio(data, trial.student_ppl, trial.ppl_ratio)),
                "gap closed": _pct(data.gap_closed(trial.student_ppl)),
                "duration": _duration(trial.duration_s),
                "MLflow run": f"[{trial.mlflow_run_id[:8]}]({link})" if link else "",
            }
        )
    return pd.DataFrame(rows)


def best_config_yaml(best) -> str:
    """The best trial's parameters as a ``search:`` block, at full precision."""
    values = {name: _plain_value(getattr(best, name)) for name in SEARCHED}
    return yaml.safe_dump({"search": values}, sort_keys=False)


def reproduce_command(data: ReportData, best) -> str:
    """``kdsweep run`` with every setting of the best trial fixed, as a new one-trial study."""
    study = data.study
    settings = {
        "name": f"{study.name}-trial{best.number}",
        "n_trials": 1,
        "baselines": [],
        **{f"search.{name}": _plain_value(getattr(best, name)) for name in SEARCHED},
        **_changed_settings(data.attrs.get("config"), study.to_dict()),
    }
    args = [f"--set {shlex.quote(f'{key}={_set_text(value)}')}" for key, value in settings.items()]
    return " \\\n    ".join([f"kdsweep run {shlex.quote(_study_file(study))}", *args])


# Settings the reproduce command sets itself, or that do not change what a trial computes.
_NOT_REPRODUCED = ("name", "n_trials", "baselines", "search", "storage", "tracking", "sampler", "pruner", "report_top_n", "save_best")


def _changed_settings(as_run: dict | None, now: dict) -> dict:
    """Settings the sweep ran with that differ from the study file as it reads now (--set overrides)."""
    if not as_run:
        return {}
    ran, current = _flatten(as_run), _flatten(now)
    return {k: v for k, v in ran.items() if current.get(k) != v and k.split(".")[0] not in _NOT_REPRODUCED}


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _study_file(study: StudyConfig) -> str:
    candidate = Path(study.base_dir) / f"{study.name}.yaml"
    return str(candidate) if candidate.exists() else "STUDY.yaml"


def render_what_mattered(data: ReportData, figures: dict[str, Figure]) -> str:
    imp = data.importances
    parts = ["## What mattered", "### Parameter importances"]
    if imp.values is None:
        parts.append(f"Skipped: {imp.skipped}.")
    else:
        frame = pd.DataFrame({"parameter": imp.values.index, "importance": [_fmt(v, 3) for v in imp.values]})
        parts += [
            f"Evaluator: {imp.evaluator}, over the {imp.n_trials} complete non-baseline trials; "
            "the importances sum to 1 and say which parameters the best trials concentrate on.",
            markdown_table(frame),
        ]
    parts.append(_image(figures["importances"]))
    parts += ["### Optimization history", _image(figures["history"])]
    parts += ["### Objective against each parameter", _image(figures["slice"])]
    parts += [
        "### Eval curves",
        "Eval perplexity of the top trials (solid) and the best plain fine-tuning trial (dashed) "
        "at every evaluation, with the teacher's perplexity on the same tokens (dotted).",
        _image(figures["curves"]),
    ]
    return "\n\n".join(p for p in parts if p)


def _image(figure: Figure) -> str:
    if figure.path is None:
        return f"*{figure.title}: not drawn ({figure.skipped}).*" if figure.skipped and figure.name != "importances" else ""
    relative = f"{quote(figure.path.parent.name)}/{quote(figure.path.name)}"
    return f"![{figure.title}]({relative})"


def render_what_went_wrong(data: ReportData) -> str:
    parts = ["## What went wrong"]
    for title, frame in (("Failed trials", failed_table(data)), ("Pruned trials", pruned_table(data))):
        if len(frame):
            parts += [f"### {title}", markdown_table(frame)]
    found = warnings_for(data)
    if found:
        parts += ["### Warnings", "\n".join(f"- {w}" for w in found)]
    if len(parts) == 1:
        parts.append(f"Nothing: all {len(data.trials)} trials completed and no check raised a warning.")
    return "\n\n".join(parts)


def failed_table(data: ReportData) -> pd.DataFrame:
    failed = data.trials[data.trials.state == "FAIL"]
    return pd.DataFrame(
        [{"trial": str(t.number), "parameters": _params_cell(t), "reason": _cell_text(_fail_reason(t))} for t in failed.itertuples()],
        columns=["trial", "parameters", "reason"],
    )


def _fail_reason(trial) -> str:
    for reason in (trial.fail_reason, trial.run_reason):
        if isinstance(reason, str) and reason:
            return reason
    return "no reason recorded (its worker may have died; the heartbeat marks such trials failed)"


def pruned_table(data: ReportData) -> pd.DataFrame:
    pruned = data.trials[data.trials.state == "PRUNED"]
    rows = []
    for t in pruned.itertuples():
        step = "" if _float(t.pruned_step) is None else str(int(t.pruned_step))
        rows.append(
            {
                "trial": str(t.number),
                "parameters": _params_cell(t),
                "pruned at step": step,
                f"last {data.study.objective}": _fmt(t.last_reported),
                "reason": _cell_text(t.run_reason if isinstance(t.run_reason, str) else "below the pruner's bar"),
            }
        )
    return pd.DataFrame(rows, columns=["trial", "parameters", "pruned at step", f"last {data.study.objective}", "reason"])


def _params_cell(trial) -> str:
    if _float(trial.alpha) is None:
        return ""
    return _params_short(trial)


# ---------------------------------------------------------------- warnings


def warnings_for(data: ReportData) -> list[str]:
    """What a careful engineer would raise before trusting the numbers, in a fixed order."""
    checks = (
        _warn_tracking,
        _warn_importances,
        _warn_topk_mass,
        _warn_nonfinite,
        _warn_teacher_weaker,
        _warn_running,
        _warn_range_edges,
        _warn_vocab_padding,
        _warn_padding_share,
        _warn_config_changed,
    )
    return [w for check in checks for w in check(data)]


def _warn_tracking(data: ReportData) -> list[str]:
    return [f"MLflow: {data.tracking.problem}; curves, run links and MLflow reasons are missing."] if data.tracking.problem else []


def _warn_importances(data: ReportData) -> list[str]:
    imp = data.importances
    if imp is None or data.ranked.empty:
        return []
    if imp.values is None:
        return [f"Parameter importances skipped: {imp.skipped}."]
    top = math.ceil(0.1 * imp.n_trials)
    found = []
    if top < STABLE_TOP_TRIALS:
        found.append(
            f"Too few complete trials for stable importances: {imp.n_trials} trials put {top} in PED-ANOVA's top 10%, "
            f"which wants at least {STABLE_TOP_TRIALS} (about {10 * STABLE_TOP_TRIALS} trials); read them as hints."
        )
    return found + [f"Optuna, computing importances: {w}" for w in imp.warnings]


def _warn_topk_mass(data: ReportData) -> list[str]:
    """Top-k values that keep little of the teacher's probability mass (from the sweep's
    ``topk_mass`` attrs, when it recorded them)."""
    masses = {str(k): float(v) for k, v in (data.attrs.get("topk_mass") or {}).items()}
    for t in data.trials.itertuples():
        if _float(t.topk_mass) is not None and t.top_k not in (None, WHOLE_VOCAB):
            masses.setdefault(str(t.top_k), float(t.topk_mass))
    used = {str(k) for k in data.trials.top_k.dropna() if k != WHOLE_VOCAB}
    low = sorted((int(k), m) for k, m in masses.items() if k in used and m < TOPK_MASS_WARN)
    return [
        f"top_k={k} keeps only {100 * m:.1f}% of the teacher's probability mass (T=1); "
        f"its KL term ignores the rest, so trials with it distil a truncated teacher."
        for k, m in low
    ]


def _warn_nonfinite(data: ReportData) -> list[str]:
    found = []
    for t in data.trials.itertuples():
        reason = t.fail_reason if isinstance(t.fail_reason, str) else ""
        values = [t.value, t.student_ppl, t.ppl_ratio, t.last_reported]
        bad = any(v is not None and not pd.isna(v) and not _finite(v) for v in values)
        if "nan" in reason.lower() or "TrainingDiverged" in reason or bad:
            found.append(f"Trial {t.number} diverged (NaN or infinite loss or perplexity): {_cell_text(reason or 'non-finite value')}")
        elif isinstance(t.nonfinite_metrics, str) and t.nonfinite_metrics:
            found.append(f"Trial {t.number} logged non-finite MLflow metrics: {t.nonfinite_metrics}")
    return found


def _warn_teacher_weaker(data: ReportData) -> list[str]:
    """A student that beats its teacher means the teacher is weak on these tokens."""
    teacher = data.teacher_ppl
    if teacher is None or data.ranked.empty or not data.ranked.iloc[0].student_ppl < teacher:
        return []
    best = data.ranked.iloc[0]
    return [
        f"The best student (trial {best.number}, perplexity {_fmt(best.student_ppl)}) beats the teacher ({_fmt(teacher)}) "
        "on the eval tokens: the teacher is weak on this data, and distilling toward it can pull a student back; "
        "check the teacher before trusting the distillation ranking."
    ]


def _warn_running(data: ReportData) -> list[str]:
    running = data.trials[data.trials.state == "RUNNING"].number.tolist()
    if not running:
        return []
    return [
        f"Trial(s) {', '.join(map(str, running))} still running, or their worker died "
        "(the next `kdsweep run` marks dead ones failed after the heartbeat's grace period)."
    ]


def _warn_range_edges(data: ReportData) -> list[str]:
    """The best distilled value of a searched range sits at its end: the optimum may lie beyond."""
    best = data.best_distilled
    if best is None:
        return []
    found = []
    for name in ("alpha", "temperature", "learning_rate"):
        param = getattr(data.study.search, name)
        if param.low is None or param.high is None or param.low == param.high:
            continue
        scale = math.log if param.log else (lambda x: x)
        position = (scale(best[name]) - scale(param.low)) / (scale(param.high) - scale(param.low))
        if position <= RANGE_EDGE or position >= 1 - RANGE_EDGE:
            end = "low" if position <= RANGE_EDGE else "high"
            found.append(
                f"The best distilled trial's {name} ({_fmt(best[name])}) sits at the {end} end of its range "
                f"[{_fmt(param.low)}, {_fmt(param.high)}]: widen `search.{name}` to see past it."
            )
    return found


def _warn_vocab_padding(data: ReportData) -> list[str]:
    if not data.attrs.get("vocab_padded"):
        return []
    size = data.attrs.get("vocab_size")
    return [
        f"Teacher and student embeddings have padding rows beyond the tokenizer's {f'{size:,}' if size else '?'} tokens; "
        "perplexities and the KL are computed over the tokenizer's ids only (padding rows are never targets)."
    ]


def _warn_padding_share(data: ReportData) -> list[str]:
    share = _float(data.attrs.get("train_padding_share"))
    if share is None or share < 0.25:
        return []
    fix = "a shorter `data.max_length`" + ("" if data.study.data.group_by_length else " or `data.group_by_length: true`")
    return [f"{100 * share:.0f}% of the training tokens are padding: {fix} would save compute."]


def _warn_config_changed(data: ReportData) -> list[str]:
    changed = _changed_settings(data.attrs.get("config"), data.study.to_dict())
    if not changed:
        return []
    listed = ", ".join(f"{k}={_set_text(v)}" for k, v in changed.items())
    return [f"The sweep ran with settings the study file no longer has ({listed}); the reproduce command sets them."]


# ================================================================ artifacts


def _log_artifacts(data: ReportData, path: Path, figure_dir: Path) -> None:
    """Log the report and its figures on the study's parent run, keeping their relative links."""
    tracking = data.tracking
    if tracking.problem:
        return
    from mlflow.exceptions import MlflowException

    client = _client(tracking)
    try:
        client.get_run(tracking.parent_run_id)
    except MlflowException:
        return
    client.log_artifact(tracking.parent_run_id, str(path), artifact_path="report")
    if figure_dir.is_dir() and any(figure_dir.iterdir()):
        client.log_artifacts(tracking.parent_run_id, str(figure_dir), artifact_path=f"report/{figure_dir.name}")


# ================================================================ small formatting helpers


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table of a DataFrame of strings (pandas' to_markdown needs tabulate)."""
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    rows = ["| " + " | ".join(_cell_text(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def _cell_text(value) -> str:
    text = "" if value is None else str(value)
    return " ".join(text.split()).replace("|", "\\|")


def _float(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _finite(value) -> bool:
    number = _float(value)
    return number is not None and math.isfinite(number)


def _fmt(value, digits: int = 4) -> str:
    number = _float(value)
    return "" if number is None else f"{number:.{digits}g}"


def _fmt_lr(value) -> str:
    number = _float(value)
    return "" if number is None else f"{number:.2e}"


def _pct(value) -> str:
    number = _float(value)
    return "" if number is None else f"{number:.1f}%"


def _signed(value: float) -> str:
    return f"{value:+.4g}"


def _ratio(data: ReportData, ppl, stored=None) -> float | None:
    if _float(stored) is not None:
        return float(stored)
    teacher, ppl = data.teacher_ppl, _float(ppl)
    return None if teacher is None or ppl is None else ppl / teacher


def _duration(seconds) -> str:
    number = _float(seconds)
    if number is None:
        return ""
    if number < 120:
        return f"{number:.0f} s"
    return f"{number / 60:.1f} min" if number < 7200 else f"{number / 3600:.1f} h"


def _trial_cell(data: ReportData, trial) -> str:
    link = data.tracking.run_link(trial.mlflow_run_id)
    return f"[{trial.number}]({link})" if link else str(trial.number)


def _plain_value(value):
    """A parameter as YAML and --set take it: ints stay ints, "all" stays a string."""
    if isinstance(value, str):
        return value
    number = float(value)
    return int(number) if number.is_integer() and not isinstance(value, float) else number


def _set_text(value) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)
