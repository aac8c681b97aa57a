"""Everything the report shows, read once from the Optuna storage and the study's MLflow runs.

``collect`` gathers the trials (a pandas DataFrame), the reference numbers, the eval curves and
the parameter importances into one :class:`ReportData`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import optuna
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial

from kdsweep.errors import first_line
from kdsweep.mlflow.links import compare_url, run_url, tracking_uri
from kdsweep.names import Group, Metric, StudyAttr, Tag, TrialAttr
from kdsweep.paths import store_missing
from kdsweep.report.analyses import Importances, compute_importances, pareto_front
from kdsweep.report.text import as_float, finite
from kdsweep.store.cost import StudyCost, study_cost
from kdsweep.store.settings import AsRun, as_run
from kdsweep.store.trials import Trials, group_of, is_baseline, params_of, retry_of
from kdsweep.study.config import StudyConfig
from kdsweep.study.measures import TEST_METRICS, feasible
from kdsweep.study.space import SEARCHED, is_plain_fine_tuning

LOCAL_UI = "http://127.0.0.1:5000"  # where `kdsweep ui` serves a local tracking store


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
        if self.problem or not (self.link_base and self.experiment_id and isinstance(run_id, str)):
            return None
        return run_url(self.link_base, self.experiment_id, run_id)

    def compare_link(self, run_ids: list) -> str | None:
        """MLflow's side-by-side view of the runs."""
        run_ids = [r for r in run_ids if isinstance(r, str)]
        if self.problem or not (self.link_base and self.experiment_id and len(run_ids) >= 2):
            return None
        return compare_url(self.link_base, self.experiment_id, run_ids)


@dataclass
class ReportData:
    """Everything the report shows, read once from the Optuna storage and MLflow."""

    study: StudyConfig  # as the trials ran (the latest run's settings)
    attrs: dict  # the Optuna study's user attrs
    settings: AsRun  # ... the target, and what differs from the study file as it reads now
    view: Trials  # which trial is what (baselines, ranked, ...), as every part reads it
    trials: pd.DataFrame  # one row per trial, by number (see trials_frame)
    tracking: Tracking
    cost: StudyCost  # what the study's store says it cost
    curves: dict[int, pd.DataFrame] = field(default_factory=dict)  # trial -> student_ppl by step
    importances: Importances | None = None
    front: list[int] = field(default_factory=list)  # a multi-objective study's Pareto front

    @property
    def pareto(self) -> pd.DataFrame:
        """The Pareto front's trials, best first by the first objective."""
        rows = self.trials.set_index("number", drop=False)
        return rows.loc[self.front] if self.front else rows.iloc[0:0]

    @property
    def sweep(self) -> pd.DataFrame:
        """The sweep's trials (baselines included): the seed check's and the control's runs left
        out."""
        return self.trials[~self.trials.group.isin([Group.SEED_CHECK, Group.CONTROL])]

    @property
    def seed_check_runs(self) -> pd.DataFrame:
        """The seed check's trials."""
        return self.trials[self.trials.group == Group.SEED_CHECK]

    @property
    def lower_is_better(self) -> bool:
        return self.view.minimize

    def rows(self, trials: list[FrozenTrial]) -> pd.DataFrame:
        """The rows of ``trials``, in their order."""
        position = {number: i for i, number in enumerate(self.trials.number)}
        return self.trials.iloc[[position[t.number] for t in trials]]

    @property
    def ranked(self) -> pd.DataFrame:
        """Complete, feasible sweep trials, best first by the first objective (``Trials``)."""
        return self.rows(self.view.ranked)

    @property
    def infeasible(self) -> pd.DataFrame:
        """Sweep trials that broke a constraint: over a ceiling, or out of memory."""
        return self.sweep[~self.sweep.feasible]

    @property
    def top(self) -> pd.DataFrame:
        return self.ranked.head(self.study.report_top_n)

    @property
    def baselines(self) -> pd.DataFrame:
        """The baselines the verdict compares with, best first: what distillation must beat
        (``Trials.compared_baselines``: those of the best distilled trial's student form)."""
        return self.rows(self.view.compared_baselines)

    @property
    def baseline_kind(self) -> str:
        """What the baselines are, in words: "plain fine-tuning" when every one trained at
        alpha 0, else "baseline" (distillation at settings the study fixed, say)."""
        baselines = self.rows(self.view.baselines)
        plain = len(baselines) and is_plain_fine_tuning(baselines.alpha).all()
        return "plain fine-tuning" if plain else "baseline"

    @property
    def has_lora(self) -> bool:
        """Whether any trial trained a LoRA adapter (search.lora_rank above 0)."""
        return bool((self.trials.lora_rank.fillna(0) > 0).any())

    @property
    def best_baseline(self) -> pd.Series | None:
        return self.baselines.iloc[0] if len(self.baselines) else None

    @property
    def distilled(self) -> pd.DataFrame:
        """Ranked trials of the sweep's own search (not baselines), best first."""
        return self.rows(self.view.distilled)

    @property
    def best_distilled(self) -> pd.Series | None:
        return self.distilled.iloc[0] if len(self.distilled) else None

    @property
    def control(self) -> pd.Series | None:
        """The best distilled configuration trained again at alpha 0 (``sweep.control``)."""
        control = self.view.control(self.view.best_distilled)
        return None if control is None else self.rows([control]).iloc[0]

    def draws(self) -> tuple[int, int]:
        """How many trials each arm's search ran to the end (complete, pruned or failed):
        (distilled, baseline). The best of more draws is better by chance alone."""
        ended = self.sweep[self.sweep.state.isin(["COMPLETE", "PRUNED", "FAIL"])]
        baseline = ended.baseline.astype(bool)
        return int((~baseline).sum()), int(baseline.sum())

    @property
    def teacher_ppl(self) -> float | None:
        return as_float(self.attrs.get(StudyAttr.TEACHER_PPL))

    @property
    def untrained_ppl(self) -> float | None:
        return as_float(self.attrs.get(StudyAttr.UNTRAINED_PPL))

    @property
    def has_accuracy(self) -> bool:
        return StudyAttr.TEACHER_EXACT_MATCH in self.attrs

    def ratio(self, ppl, stored=None) -> float | None:
        """Student over teacher perplexity: ``stored`` when the trial recorded it."""
        if as_float(stored) is not None:
            return float(stored)
        teacher, ppl = self.teacher_ppl, as_float(ppl)
        return None if teacher is None or ppl is None else ppl / teacher

    def trial_cell(self, trial) -> str:
        """The trial's number, linked to its MLflow run when the UI's address is known."""
        link = self.tracking.run_link(trial.mlflow_run_id)
        return f"[{trial.number}]({link})" if link else str(trial.number)

    @property
    def study_file(self) -> str:
        """The study file, as a command in the report names it."""
        return self.study.source

    def changed_settings(self) -> dict:
        """Settings the trials ran with that differ from the study file as it reads now (a
        ``--set`` of the run, or a file edited since) and change what a trial computes: what a
        command that reproduces a trial must set."""
        return {
            key: ran
            for key, (_, ran) in self.settings.overrides.items()
            if key.split(".")[0] not in _NOT_REPRODUCED
        }

    @property
    def on_test(self) -> bool:
        """Whether the verdict reads the test split: the study has one, and the best distilled
        trial and the best baseline were scored on it (else: the validation split)."""
        if StudyAttr.TEST_TEACHER_PPL not in self.attrs:
            return False
        finalists = [t for t in (self.best_distilled, self.best_baseline) if t is not None]
        return bool(finalists) and all(as_float(t.test_student_ppl) is not None for t in finalists)

    @property
    def accuracy_rows(self) -> int | None:
        """How many rows of the verdict's split were decoded for accuracy."""
        key = StudyAttr.TEST_ACCURACY_ROWS if self.on_test else StudyAttr.ACCURACY_ROWS
        return self.attrs.get(key)

    def split_label(self) -> str:
        """Where the verdict's numbers come from, as the report says it."""
        data = self.study.data
        if self.on_test:
            rows = self.attrs.get(StudyAttr.TEST_ROWS)
            return f"the test split `{data.test_split}` ({rows:,} rows, never selected on)"
        return f"the validation split `{data.eval_split}` (the one the sweep selected on)"

    def shown(self, trial, metric: str):
        """A trial's ``student_ppl``, ``exact_match`` or ``rouge_l`` on the verdict's split."""
        return trial[f"test_{metric}"] if self.on_test else trial[metric]

    def shown_value(self, trial) -> float | None:
        """A trial's objective on the verdict's split."""
        if not self.on_test:
            return trial.value
        objective = self.study.primary_objective
        if objective == Metric.PPL_RATIO:
            ppl, teacher = as_float(trial.test_student_ppl), self.shown_teacher_ppl
            return None if ppl is None or not teacher else ppl / teacher
        return as_float(trial.get(f"test_{objective}"))

    @property
    def shown_teacher_ppl(self) -> float | None:
        key = StudyAttr.TEST_TEACHER_PPL if self.on_test else StudyAttr.TEACHER_PPL
        return as_float(self.attrs.get(key))

    def gap_closed(self, ppl, *, test: bool | None = None) -> float | None:
        """Share (in %) of the perplexity gap between the best baseline trial and the
        teacher that ``ppl`` closes: 0 at the baseline, 100 at the teacher, negative when worse.
        On the test split or the validation split (default: the verdict's)."""
        test = self.on_test if test is None else test
        baseline = self.best_baseline
        key = StudyAttr.TEST_TEACHER_PPL if test else StudyAttr.TEACHER_PPL
        teacher, ppl = as_float(self.attrs.get(key)), as_float(ppl)
        start = (
            None
            if baseline is None
            else as_float(baseline.test_student_ppl if test else baseline.student_ppl)
        )
        if teacher is None or start is None or ppl is None or start <= teacher:
            return None
        return 100 * (start - ppl) / (start - teacher)


# Settings the reproduce command sets itself, or that do not change what a trial computes.
_NOT_REPRODUCED = (
    "name",
    "n_trials",
    "baselines",
    "seed_check",
    "search",
    "storage",
    "tracking",
    "sampler",
    "pruner",
    "report_top_n",
    "save_best",
    "control",
)


def collect(file: StudyConfig, optuna_study: optuna.Study) -> ReportData:
    """Read the study's trials, MLflow runs, curves and importances into one ReportData. What
    it says of the settings is what the trials ran with (``store.settings``), beside the study
    file as it reads now (``file``)."""
    trials = optuna_study.get_trials(deepcopy=False)
    attrs = dict(optuna_study.user_attrs)
    settings = as_run(optuna_study, file)
    study = settings.study
    data = ReportData(
        study,
        attrs,
        settings,
        Trials(trials, optuna_study.directions),
        trials_frame(trials, attrs),
        _tracking(study, optuna_study),
        cost=study_cost(optuna_study, max_steps=study.train.max_steps),
    )
    runs = _read_runs(data.tracking)
    data.trials = _merge_runs(data.trials, runs)
    data.curves = _read_curves(data)
    data.importances = compute_importances(trials, study)
    if study.multi_objective:
        data.front = [t.number for t in pareto_front(optuna_study)]
    return data


def trials_frame(trials: list[FrozenTrial], study_attrs: dict | None = None) -> pd.DataFrame:
    """One row per trial: state, objective, the parameters, final metrics (at its selected
    checkpoint, and on the test split for a finalist), timing, reasons."""
    attrs = study_attrs or {}
    rows = [_trial_row(t, attrs.get(f"{StudyAttr.TEST_PREFIX}{t.number}", {})) for t in trials]
    frame = pd.DataFrame(rows, columns=list(_trial_row(None).keys()))
    # Object columns keep top_k's ints (and "all"), run ids, values and constraints as they are,
    # even beside a None.
    for column in ("top_k", "mlflow_run_id", "values", "constraints"):
        frame[column] = pd.Series([row[column] for row in rows], index=frame.index, dtype=object)
    return frame.sort_values("number", kind="mergesort").reset_index(drop=True)


def _trial_row(trial: FrozenTrial | None, test: dict | None = None) -> dict:
    attrs = trial.user_attrs if trial else {}
    test = test or {}
    params = params_of(trial) if trial else {}
    steps = sorted(trial.intermediate_values.items()) if trial else []
    values = trial.values if trial and trial.values else None
    constraints = trial.constraints if trial else {}
    return {
        "number": trial.number if trial else 0,
        "state": trial.state.name if trial else "",
        "value": values[0] if values else None,  # the first objective's
        "values": values,  # every objective's, in the study's order
        "feasible": feasible(constraints),
        "constraints": constraints,  # each one's measure minus its ceiling (0 or less: kept)
        "baseline": is_baseline(trial) if trial else False,
        "group": group_of(trial) if trial else Group.SEARCH,
        "seed_check_of": attrs.get(TrialAttr.SEED_CHECK_OF),
        "retry_of": retry_of(trial) if trial else None,
        "seed": attrs.get(TrialAttr.SEED),
        **{name: params.get(name) for name in SEARCHED},
        "student_ppl": attrs.get(Metric.STUDENT_PPL),
        "ppl_ratio": attrs.get(Metric.PPL_RATIO),
        "kl_to_teacher": attrs.get(Metric.KL_TO_TEACHER),
        "exact_match": attrs.get(Metric.EXACT_MATCH),
        "rouge_l": attrs.get(Metric.ROUGE_L),
        "best_step": attrs.get(TrialAttr.BEST_STEP),
        **{name: test.get(name) for name in TEST_METRICS},
        Metric.DEVICE_SECONDS: attrs.get(TrialAttr.COST, {}).get(Metric.DEVICE_SECONDS),
        Metric.PEAK_MEMORY_GB: attrs.get(TrialAttr.PEAK_MEMORY_GB),
        Metric.TRAINABLE_PARAMETERS: attrs.get(TrialAttr.TRAINABLE_PARAMETERS),
        "duration_s": trial.duration.total_seconds() if trial and trial.duration else None,
        "started": trial.datetime_start if trial else None,
        "ended": trial.datetime_complete if trial else None,
        "mlflow_run_id": attrs.get(TrialAttr.MLFLOW_RUN_ID),
        "fail_reason": attrs.get(TrialAttr.FAIL_REASON),
        "pruned_step": attrs.get(TrialAttr.PRUNED_STEP, steps[-1][0] if steps else None),
        "last_reported": steps[-1][1] if steps else None,
        "topk_mass": attrs.get(TrialAttr.TOPK_MASS),
    }


def _tracking(study: StudyConfig, optuna_study: optuna.Study) -> Tracking:
    uri = tracking_uri(study.tracking.uri)
    attrs = optuna_study.user_attrs
    tracking = Tracking(
        uri, attrs.get(StudyAttr.EXPERIMENT_ID), attrs.get(StudyAttr.PARENT_RUN_ID)
    )
    if uri and uri.startswith(("http://", "https://")):
        tracking.link_base, tracking.local = uri.rstrip("/"), False
    else:
        tracking.link_base = LOCAL_UI
    if tracking.parent_run_id is None or tracking.experiment_id is None:
        tracking.problem = "the study has no MLflow parent run (it was never attached to MLflow)"
    elif store_missing(uri):
        # Opening a missing SQLite store would create an empty one; a report only reads.
        tracking.problem = f"the MLflow store {uri} does not exist"
    return tracking


def mlflow_client(tracking: Tracking) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking.uri)


def _read_runs(tracking: Tracking) -> pd.DataFrame:
    """The parent's nested runs as a DataFrame shaped like ``mlflow.search_runs``' (run_id,
    status, tags.*, metrics.*), read through a client bound to the study's tracking URI rather
    than MLflow's process-wide one."""
    if tracking.problem:
        return pd.DataFrame(columns=["run_id", "status"])
    client, runs, token = mlflow_client(tracking), [], None
    query = f"tags.`{Tag.PARENT}` = '{tracking.parent_run_id}'"
    try:
        while True:
            page = client.search_runs(
                [tracking.experiment_id], filter_string=query, max_results=1000, page_token=token
            )
            runs += list(page)
            token = page.token
            if not token:
                break
    except MlflowException as exc:
        tracking.problem = f"the MLflow runs could not be read: {first_line(exc)}"
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
    return (
        pd.DataFrame(rows).sort_values("run_id", kind="mergesort")
        if rows
        else pd.DataFrame(columns=["run_id", "status"])
    )


def _merge_runs(trials: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Add each trial's MLflow status, recorded reason and whether any latest metric is not
    finite."""
    keep = runs.reindex(columns=["run_id", "status", f"tags.{Tag.REASON}"])
    keep.columns = ["mlflow_run_id", "run_status", "run_reason"]
    keep = keep.astype(object)
    metric_columns = [c for c in runs.columns if c.startswith("metrics.")]
    keep["nonfinite_metrics"] = [
        ", ".join(
            c.removeprefix("metrics.")
            for c in metric_columns
            if not finite(row[c]) and not pd.isna(row[c])
        )
        for _, row in runs.iterrows()
    ]
    return trials.merge(keep, on="mlflow_run_id", how="left")


def _read_curves(data: ReportData) -> dict[int, pd.DataFrame]:
    """student_ppl by eval step for the top trials and the best baseline."""
    if data.tracking.problem:
        return {}
    client = mlflow_client(data.tracking)
    wanted = list(data.top.itertuples())
    baseline = data.best_baseline
    if baseline is not None and baseline.number not in data.top.number.values:
        wanted.append(baseline)
    curves = {}
    for trial in wanted:
        if not isinstance(trial.mlflow_run_id, str):
            continue
        history = client.get_metric_history(trial.mlflow_run_id, Metric.STUDENT_PPL)
        points = pd.DataFrame(
            [(m.step, m.value) for m in history], columns=["step", "student_ppl"]
        )
        if len(points):
            curves[int(trial.number)] = points.sort_values(
                "step", kind="mergesort"
            ).drop_duplicates("step", keep="last")
    return curves
