"""kdsweep from Python, and a study end to end: run it, then read its report from the real
stores."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

import kdsweep
from kdsweep.errors import StudyError
from kdsweep.names import REPORT_ARTIFACTS, Metric, StudyAttr, Tag, TrialAttr
from kdsweep.store.storage import load_existing_study
from kdsweep.study.reader import load_study


def table_rows(text: str, heading: str) -> list[dict[str, str]]:
    """The first Markdown table under ``## heading``, as dicts keyed by column."""
    lines = text[text.index(f"## {heading}\n") :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = lines[
        start : start
        + next((i for i, line in enumerate(lines[start:]) if not line.startswith("|")), len(lines))
    ]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    return [
        dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in table[2:]
    ]


def test_importing_kdsweep_is_light():
    code = (
        "import sys, kdsweep; assert not {'torch', 'transformers', 'optuna', 'mlflow'} & "
        "set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_bad_study_raises_the_clis_error(tiny_study):
    with pytest.raises(StudyError) as info:
        kdsweep.run_study(tiny_study, overrides={"train.batch_size": 0})
    assert info.value.problems == [f"{tiny_study}: train.batch_size: must be >= 1, got 0"]


def test_run_study_then_its_report_from_the_real_stores(tiny_study):
    """Three trials (a plain fine-tuning baseline first) through the Python API, the report
    written at the end as `kdsweep run` writes it; every number it shows is checked against the
    Optuna storage and the MLflow runs it was read from."""
    tiny_study.write_text(tiny_study.read_text() + "baselines:\n  - {alpha: 0.0, top_k: 4}\n")
    summary = kdsweep.run_study(
        tiny_study, n_trials=3, overrides={"train.max_steps": 6, "train.eval_every": 3}
    )

    study = load_study(tiny_study)
    optuna_study = load_existing_study(study)
    trials = {t.number: t for t in optuna_study.get_trials()}
    best = optuna_study.best_trial
    assert (summary.finished, summary.ran, summary.target) == (3, 3, 3)
    assert (summary.best_trial, summary.best_values) == (best.number, [best.value])
    assert summary.best_params == best.user_attrs[TrialAttr.PARAMS]
    assert summary.best_run_id == best.user_attrs[TrialAttr.MLFLOW_RUN_ID]
    assert summary.directions == ["minimize"] and summary.report.is_file()

    text = summary.report.read_text()
    client = MlflowClient(tracking_uri=study.tracking.uri)
    rows = table_rows(text, "Top configurations")
    ranked = sorted(trials.values(), key=lambda t: (t.value, t.number))
    assert [int(r["trial"].split()[0]) for r in rows] == [t.number for t in ranked]
    for row in rows:
        trial = trials[int(row["trial"].split()[0])]
        run = client.get_run(trial.user_attrs[TrialAttr.MLFLOW_RUN_ID])
        assert float(row["student ppl"]) == pytest.approx(
            run.data.metrics[Metric.STUDENT_PPL], rel=1e-3
        )
        assert float(row["student ppl"]) == pytest.approx(trial.value, rel=1e-3)
        assert run.info.run_id[:8] in row["MLflow run"]
        assert float(row["alpha"]) == pytest.approx(
            trial.user_attrs[TrialAttr.PARAMS]["alpha"], rel=1e-3
        )
    assert (
        trials[0].user_attrs[TrialAttr.BASELINE]
        and trials[0].user_attrs[TrialAttr.PARAMS]["alpha"] == 0
    )
    assert "0 (baseline)" in [r["trial"] for r in rows]

    references = {r["reference"]: r for r in table_rows(text, "Reference points")}
    assert float(references["teacher"]["perplexity"]) == pytest.approx(
        optuna_study.user_attrs[StudyAttr.TEACHER_PPL], rel=1e-3
    )
    assert references["best plain fine-tuning (alpha 0)"]["trial"].startswith("[0]")

    parent = client.get_run(optuna_study.user_attrs[StudyAttr.PARENT_RUN_ID])
    assert parent.data.tags[Tag.BEST_TRIAL] == str(best.number)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, REPORT_ARTIFACTS)}
    assert f"{REPORT_ARTIFACTS}/{study.name}.md" in logged
    assert re.search(r"\*\*Trials\*\*: 3 \(3 complete", text)
