"""A study a team can trust, end to end on tiny models: task accuracy on every run and the parent,
a baseline that tunes its own learning rate, and the seed check's runs, present in MLflow and
in the report, absent from what the sampler learned from."""

from __future__ import annotations

import contextlib
import io

import pytest
from mlflow.tracking import MlflowClient

from kdsweep.cli import main
from kdsweep.names import Group, Metric, StudyAttr, Tag, TrialAttr
from kdsweep.store.storage import load_existing_study
from kdsweep.store.trials import group_of
from kdsweep.study.reader import load_study

from conftest import isolate, write_tiny_study

TRUST = """
eval: {accuracy: true, max_rows: 8, max_new_tokens: 6, batch_size: 4}
baselines:
  - {alpha: 0.0, trials: 2}
seed_check: {top: 1, seeds: 1}
"""


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_models, tiny_data):
    """2 baseline trials and 2 sampled ones, then the best of each again at seed 1: (the study
    file, what `kdsweep run` printed on stdout). Its stores and report are in the study's
    folder."""
    root = tmp_path_factory.mktemp("trust")
    path = write_tiny_study(root, tiny_models, tiny_data)
    path.write_text(path.read_text().replace("top_k: [4, all]", "top_k: [4, 8]") + TRUST)
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        isolate(patch, root)
        assert main(["run", str(path), "--n-trials", "4"]) == 0
    return path, out.getvalue()


def test_trials_groups_and_the_seed_check(swept):
    path, _ = swept
    study = load_study(path)
    optuna_study = load_existing_study(study)
    trials = optuna_study.get_trials()
    assert [group_of(t) for t in trials] == [Group.baseline(0)] * 2 + [Group.SEARCH] * 2 + [
        Group.SEED_CHECK
    ] * 2
    baselines, search, checks = trials[:2], trials[2:4], trials[4:]
    assert {t.user_attrs[TrialAttr.PARAMS]["alpha"] for t in baselines} == {0.0}
    # tuned, not repeated
    assert baselines[0].params["learning_rate"] != baselines[1].params["learning_rate"]
    best_distilled = min(search, key=lambda t: (t.value, t.number))
    best_plain = min(baselines, key=lambda t: (t.value, t.number))
    assert sorted(t.user_attrs[TrialAttr.SEED_CHECK_OF] for t in checks) == sorted(
        [best_distilled.number, best_plain.number]
    )
    for check in checks:
        original = trials[check.user_attrs[TrialAttr.SEED_CHECK_OF]]
        assert check.user_attrs[TrialAttr.SEED] == study.train.seed + 1
        assert check.params == original.params and check.state.name == "COMPLETE"
        assert check.value != original.value  # another seed, another run


def test_accuracy_and_seed_checks_in_mlflow(swept):
    path, _ = swept
    study = load_study(path)
    optuna_study = load_existing_study(study)
    client = MlflowClient(tracking_uri=study.tracking.uri)
    parent = client.get_run(optuna_study.user_attrs[StudyAttr.PARENT_RUN_ID])
    for key in (
        Metric.TEACHER_EXACT_MATCH,
        Metric.TEACHER_ROUGE_L,
        Metric.UNTRAINED_EXACT_MATCH,
        Metric.UNTRAINED_ROUGE_L,
    ):
        assert 0.0 <= parent.data.metrics[key] <= 1.0
    runs = client.search_runs(
        [parent.info.experiment_id], f"tags.`{Tag.PARENT}` = '{parent.info.run_id}'"
    )
    assert len(runs) == 6
    for run in runs:
        history = {
            key: [m.step for m in client.get_metric_history(run.info.run_id, key)]
            for key in (Metric.EXACT_MATCH, Metric.ROUGE_L)
        }
        # decoded at the last evaluation
        assert history == {
            Metric.EXACT_MATCH: [8],
            Metric.ROUGE_L: [8],
        }
        assert 0.0 <= run.data.metrics[Metric.EXACT_MATCH] <= 1.0
    checks = [r for r in runs if Tag.SEED_CHECK_OF in r.data.tags]
    assert len(checks) == 2 and all(r.data.params["seed"] == "1" for r in checks)
    assert all("seed check of" in r.info.run_name for r in checks)
    assert parent.data.tags[Tag.BEST_TRIAL] in {
        r.data.tags[Tag.TRIAL] for r in runs if Tag.SEED_CHECK_OF not in r.data.tags
    }


def test_the_report_and_the_last_lines_answer_the_question(swept):
    path, output = swept
    text = (path.parent / "reports" / "tiny.md").read_text()
    verdict = text[text.index("## Verdict") : text.index("## Study")]
    assert ("Distillation beats the tuned baseline." in verdict) != (
        "Plain fine-tuning wins" in verdict
    )
    assert "best of 2 plain fine-tuning trials" in verdict and "Exact match (over the" in verdict
    assert "**Seed check:** over 2 seeds" in verdict
    header = (
        "| trial | parameters | student_ppl by seed | exact match by seed | mean | std | range |"
    )
    assert "## Seed check" in text and header in text
    # The command's last lines: a short table, then where the report is.
    lines = output.strip().splitlines()
    assert lines[-1] == "report: reports/tiny.md"
    assert any(line.startswith("teacher") for line in lines) and any(
        "best baseline, trial" in line for line in lines
    )
    assert "{" not in output  # no raw dict
    assert all(len(line) <= 80 for line in lines)


def test_a_finished_study_with_its_seed_check_has_nothing_to_do(swept, capsys):
    path, _ = swept
    assert main(["run", str(path), "--n-trials", "4", "--no-report"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert len(load_existing_study(load_study(path)).get_trials()) == 6


def test_status_reads_whole_in_80_columns(swept, capsys):
    path, _ = swept
    assert main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert all(len(line) <= 80 for line in out.splitlines()), out
    assert "…" not in out and "seed check of" in out and "baseline" in out
    assert "a = alpha" in out  # the legend names the short headers
