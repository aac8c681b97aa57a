"""The report's warnings: what a careful engineer would raise before trusting the numbers."""

from __future__ import annotations

import math

import pandas as pd

from kdsweep.names import StudyAttr
from kdsweep.report.collect import ReportData
from kdsweep.report.text import as_float, cell_text, finite, fmt, set_text
from kdsweep.study.space import SEARCH_SPACE, WHOLE_VOCAB

TOPK_MASS_WARN = (
    0.90  # a top-k that keeps less of the teacher's probability mass is worth a warning
)
TRUNCATED_WARN = 0.10  # a teacher cut off on more of its answers than this needs more new tokens
STABLE_TOP_TRIALS = 5  # PED-ANOVA wants about this many trials in its top quantile
RANGE_EDGE = (
    0.05  # a best value this close to a range's end (as a share of the range) suggests widening it
)


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
        _warn_reasoning_left_out,
        _warn_teacher_truncated,
    )
    return [w for check in checks for w in check(data)]


def _warn_tracking(data: ReportData) -> list[str]:
    return (
        [f"MLflow: {data.tracking.problem}; curves, run links and MLflow reasons are missing."]
        if data.tracking.problem
        else []
    )


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
            f"Too few complete trials for stable importances: {imp.n_trials} trials put {top} in "
            "PED-ANOVA's top 10%, "
            f"which wants at least {STABLE_TOP_TRIALS} (about {10 * STABLE_TOP_TRIALS} trials); "
            "read them as hints."
        )
    return found + [f"Optuna, computing importances: {w}" for w in imp.warnings]


def _warn_topk_mass(data: ReportData) -> list[str]:
    """Top-k values that keep little of the teacher's probability mass (from the sweep's
    ``topk_mass`` attrs, when it recorded them)."""
    masses = {str(k): float(v) for k, v in (data.attrs.get(StudyAttr.TOPK_MASS) or {}).items()}
    for t in data.trials.itertuples():
        if as_float(t.topk_mass) is not None and t.top_k not in (None, WHOLE_VOCAB):
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
        bad = any(v is not None and not pd.isna(v) and not finite(v) for v in values)
        if "nan" in reason.lower() or "TrainingDiverged" in reason or bad:
            found.append(
                f"Trial {t.number} diverged (NaN or infinite loss or perplexity): "
                f"{cell_text(reason or 'non-finite value')}"
            )
        elif isinstance(t.nonfinite_metrics, str) and t.nonfinite_metrics:
            found.append(
                f"Trial {t.number} logged non-finite MLflow metrics: {t.nonfinite_metrics}"
            )
    return found


def _warn_teacher_weaker(data: ReportData) -> list[str]:
    """A student that beats its teacher means the teacher is weak on these tokens."""
    teacher = data.teacher_ppl
    if teacher is None or data.ranked.empty or not data.ranked.iloc[0].student_ppl < teacher:
        return []
    best = data.ranked.iloc[0]
    return [
        f"The best student (trial {best.number}, perplexity {fmt(best.student_ppl)}) beats the "
        f"teacher ({fmt(teacher)}) "
        "on the eval tokens: the teacher is weak on this data, and distilling toward it can pull "
        "a student back; "
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
    for name in (p.name for p in SEARCH_SPACE if not p.whole):
        param = getattr(data.study.search, name)
        if param.low is None or param.high is None or param.low == param.high:
            continue
        scale = math.log if param.log else (lambda x: x)
        position = (scale(best[name]) - scale(param.low)) / (scale(param.high) - scale(param.low))
        if position <= RANGE_EDGE or position >= 1 - RANGE_EDGE:
            end = "low" if position <= RANGE_EDGE else "high"
            found.append(
                f"The best distilled trial's {name} ({fmt(best[name])}) sits at the {end} end of "
                "its range "
                f"[{fmt(param.low)}, {fmt(param.high)}]: widen `search.{name}` to see past it."
            )
    return found


def _warn_vocab_padding(data: ReportData) -> list[str]:
    if not data.attrs.get(StudyAttr.VOCAB_PADDED):
        return []
    size = data.attrs.get(StudyAttr.VOCAB_SIZE)
    return [
        "Teacher and student embeddings have padding rows beyond the tokenizer's "
        f"{f'{size:,}' if size else '?'} tokens; "
        "perplexities and the KL are computed over the tokenizer's ids only (padding rows are "
        "never targets)."
    ]


def _warn_padding_share(data: ReportData) -> list[str]:
    share = as_float(data.attrs.get(StudyAttr.TRAIN_PADDING_SHARE))
    if share is None or share < 0.25:
        return []
    fix = "a shorter `data.max_length`" + (
        "" if data.study.data.group_by_length else " or `data.group_by_length: true`"
    )
    return [f"{100 * share:.0f}% of the training tokens are padding: {fix} would save compute."]


def _warn_config_changed(data: ReportData) -> list[str]:
    changed = data.changed_settings()
    if not changed:
        return []
    listed = ", ".join(f"{k}={set_text(v)}" for k, v in changed.items())
    return [
        f"The sweep ran with settings the study file no longer has ({listed}); the reproduce "
        "command sets them."
    ]


def _warn_reasoning_left_out(data: ReportData) -> list[str]:
    left_out = data.attrs.get(StudyAttr.TRAIN_REASONING_LEFT_OUT)
    if not left_out:
        return []
    return [
        f"The reasoning of {left_out:,} train answers was not trained on: the chat template "
        "leaves it out of earlier turns (Qwen3's renders it after the last user turn only); "
        "`data.each_turn_as_last: true` trains each turn with its own."
    ]


def _warn_teacher_truncated(data: ReportData) -> list[str]:
    """A teacher cut off before its answers: accuracy measures the budget, not the models."""
    share = as_float(data.attrs.get(StudyAttr.TEACHER_TRUNCATED_SHARE))
    if share is None or share <= TRUNCATED_WARN:
        return []
    budget = data.study.eval.max_new_tokens
    return [
        f"The teacher's answers were truncated on {100 * share:.0f}% of the decoded rows (cut "
        f"at eval.max_new_tokens = {budget} before their end, or a think block never closed): "
        "accuracy measures the token budget more than the models; raise `eval.max_new_tokens`."
    ]
