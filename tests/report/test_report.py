"""`kdsweep report` on studies built with ask/tell and real MLflow runs (no model is trained)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from kdsweep.cli import main
from kdsweep.names import StudyAttr, TrialAttr
from kdsweep.report import SECTIONS, collect, render, verdict, write_report
from kdsweep.store.storage import load_existing_study
from kdsweep.study.reader import load_study

from stored_study import (
    EMPTY,
    FULL,
    PNG_SIGNATURE,
    SINGLE,
    TEACHER_PPL,
    UNTRAINED_PPL,
    build_study,
    section,
    table_rows,
)


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stores")
    return {
        name: build_study(root, name, specs)
        for name, specs in (("kd", FULL), ("empty", EMPTY), ("single", SINGLE))
    }


@pytest.fixture(scope="module")
def full_report(studies, tmp_path_factory) -> Path:
    """The full study's report, written once for the tests that only read it."""
    return write_report(
        load_study(studies["kd"]), output=str(tmp_path_factory.mktemp("out") / "reports" / "kd.md")
    )


def cell_number(cell: str) -> float:
    return float(cell.rstrip("%"))


def storage_trials(study_path: Path) -> dict[int, optuna.trial.FrozenTrial]:
    return {t.number: t for t in load_existing_study(load_study(study_path)).get_trials()}


# ---------------------------------------------------------------- the full study


def test_report_has_every_section_and_header_counts(full_report, studies):
    text = full_report.read_text()
    assert text.startswith("# kdsweep report: kd\n")
    for heading in SECTIONS:
        assert f"\n## {heading}\n" in text
    assert "8 (5 complete, 1 pruned, 2 failed, 0 running)" in text
    assert "`teacher-model`" in text and "`student-model`" in text and "400 rows" in text
    fingerprint = load_study(studies["kd"]).fingerprint()
    assert f"**Settings**: fingerprint `{fingerprint}`, as the study file reads now" in text


def test_top_table_numbers_equal_the_storage(full_report, studies):
    trials = storage_trials(studies["kd"])
    rows = table_rows(section(full_report.read_text(), "Top configurations"))
    # The best three by value; trials 1 and 5 tie at 4.0 and the earlier one ranks first.
    assert [int(r["trial"].split()[0]) for r in rows] == [1, 5, 2]
    for rank, row in enumerate(rows, start=1):
        trial = trials[int(row["trial"].split()[0])]
        ppl = trial.user_attrs["student_ppl"]
        assert row["rank"] == str(rank)
        assert cell_number(row["student ppl"]) == pytest.approx(ppl, rel=1e-3)
        assert cell_number(row["ratio to teacher"]) == pytest.approx(
            trial.user_attrs["ppl_ratio"], rel=1e-3
        )
        # The share of the gap between the best plain fine-tuning trial (6.0) and the teacher.
        assert cell_number(row["gap closed"]) == pytest.approx(
            100 * (6.0 - ppl) / (6.0 - TEACHER_PPL), abs=0.05
        )
        for name in ("alpha", "temperature", "learning rate"):
            assert cell_number(row[name]) == pytest.approx(
                trial.params[name.replace(" ", "_")], rel=1e-2
            )
        assert row["top_k"] == str(trial.params["top_k"])
        run_id = trial.user_attrs[TrialAttr.MLFLOW_RUN_ID]
        exp = load_existing_study(load_study(studies["kd"])).user_attrs[StudyAttr.EXPERIMENT_ID]
        assert (
            f"(http://127.0.0.1:5000/#/experiments/{exp}/runs/{run_id}?workflowType=machine_learning)"
            in row["MLflow run"]
        )


def test_reference_points_name_baseline_and_best_distilled(full_report):
    rows = {
        r["reference"]: r for r in table_rows(section(full_report.read_text(), "Reference points"))
    }
    assert cell_number(rows["teacher"]["perplexity"]) == TEACHER_PPL
    assert cell_number(rows["untrained student"]["perplexity"]) == UNTRAINED_PPL
    assert rows["best plain fine-tuning (alpha 0)"]["trial"].startswith("[0]")
    assert cell_number(rows["best plain fine-tuning (alpha 0)"]["perplexity"]) == 6.0
    assert rows["best distilled trial"]["trial"].startswith("[1]")
    assert cell_number(rows["best distilled trial"]["gap closed"]) == pytest.approx(50.0, abs=0.05)
    assert cell_number(rows["best plain fine-tuning (alpha 0)"]["gap closed"]) == 0


def test_the_verdict_comes_first_and_answers_the_question(full_report):
    text = full_report.read_text()
    assert text.startswith(
        "# kdsweep report: kd\n\n## Verdict\n\n**Distillation beats the tuned baseline.**"
    )
    verdict = section(text, "Verdict")
    assert (
        "reaches perplexity 4 against 6 for the best of 1 plain fine-tuning trial" in verdict
        and "On the validation split `test`" in verdict
        and "These numbers are optimistic" in verdict
    )
    assert "33.3% lower" in verdict and "closes 50.0% of the perplexity gap" in verdict
    assert (
        "learning_rate 3.00e-03)" in verdict
        and "temperature" not in verdict.split("plain fine-tuning trial")[1]
    )


def test_top_trials_link_to_mlflows_compare_view(full_report, studies):
    trials = storage_trials(studies["kd"])
    text = section(full_report.read_text(), "Top configurations")
    link = re.search(r"\[Compare these runs side by side in MLflow\]\((\S+)\)", text).group(1)
    # the top three, in rank order
    runs = [trials[n].user_attrs[TrialAttr.MLFLOW_RUN_ID] for n in (1, 5, 2)]
    experiment = load_existing_study(load_study(studies["kd"])).user_attrs[StudyAttr.EXPERIMENT_ID]
    assert link == (
        "http://127.0.0.1:5000/#/compare-runs?runs=[" + ",".join(f'"{r}"' for r in runs) + "]"
        f'&experiments=["{experiment}"]&workflowType=machine_learning'
    )


def test_best_configuration_snippet_and_command_reproduce_the_best_trial(full_report, studies):
    text = section(full_report.read_text(), "Top configurations")
    snippet = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    assert yaml.safe_load(snippet) == {
        "search": {"alpha": 0.5, "temperature": 2.0, "top_k": 32, "learning_rate": 0.003}
    }
    command = re.search(r"```bash\n(.*?)```", text, re.S).group(1).replace("\\\n", " ")
    args = shlex.split(command)
    assert args[:3] == ["kdsweep", "run", str(studies["kd"])]
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    rerun = load_study(studies["kd"], overrides)
    assert rerun.name == "kd-trial1" and rerun.n_trials == 1 and rerun.baselines == ()
    assert {
        n: getattr(rerun.search, n).value
        for n in ("alpha", "temperature", "top_k", "learning_rate")
    } == {"alpha": 0.5, "temperature": 2.0, "top_k": 32, "learning_rate": 0.003}


def test_figures_are_valid_pngs_and_every_relative_link_resolves(full_report):
    import matplotlib.image

    text = full_report.read_text()
    targets = re.findall(r"\]\(([^)]+)\)", text)
    local = [t for t in targets if not t.startswith(("http://", "https://"))]
    assert {Path(t).name for t in local} == {
        "importances.png",
        "history.png",
        "slice.png",
        "curves.png",
    }
    for target in local:
        path = full_report.parent / target
        assert path.is_file(), target
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        height, width, _ = matplotlib.image.imread(path).shape
        assert width >= 400 and height >= 200


def test_two_generations_are_identical(full_report, studies, tmp_path):
    again = write_report(load_study(studies["kd"]), output=str(tmp_path / "kd.md"))
    first, second = full_report.read_text(), again.read_text()
    assert first == second
    for png in sorted((full_report.parent / "kd").glob("*.png")):
        assert png.read_bytes() == (tmp_path / "kd" / png.name).read_bytes(), png.name


def test_what_went_wrong_lists_failures_pruning_and_warnings(full_report):
    text = section(full_report.read_text(), "What went wrong")
    failed = {r["trial"]: r for r in table_rows(text[text.index("### Failed") :])}
    assert failed["4"]["reason"] == "RuntimeError: CUDA out of memory"
    assert "NaN" in failed["7"]["reason"]
    pruned = table_rows(text[text.index("### Pruned") :])
    assert [(r["trial"], r["pruned at step"], r["last student_ppl"]) for r in pruned] == [
        ("3", "20", "25")
    ]
    assert "pruned at step 20" in pruned[0]["reason"]
    warnings = text[text.index("### Warnings") :]
    assert "top_k=8 keeps only 80.0%" in warnings and "top_k=32" not in warnings
    assert "Trial 7 diverged" in warnings
    assert "Too few complete trials for stable importances" in warnings
    assert "padding rows beyond the tokenizer's 1,000 tokens" in warnings


def test_importances_rank_the_searched_parameters(full_report):
    text = section(full_report.read_text(), "What mattered")
    rows = table_rows(text)
    assert {r["parameter"] for r in rows} == {"alpha", "temperature", "top_k", "learning_rate"}
    assert sum(float(r["importance"]) for r in rows) == pytest.approx(1.0, abs=0.01)


def test_report_and_figures_are_logged_on_the_parent_run(full_report, studies):
    study = load_study(studies["kd"])
    client = MlflowClient(tracking_uri=study.tracking.uri)
    parent = load_existing_study(study).user_attrs[StudyAttr.PARENT_RUN_ID]
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert logged == {"report/kd.md", "report/kd"}
    figures = {a.path for a in client.list_artifacts(parent, "report/kd")}
    assert "report/kd/curves.png" in figures and len(figures) == 4


def test_rendering_needs_no_mlflow(studies, tmp_path):
    """A ReportData whose MLflow store is gone still renders, says what is missing, and reading
    it creates no store (opening a SQLite URL would)."""
    gone = tmp_path / "moved" / "mlflow.db"
    study = load_study(studies["kd"], [f"tracking.uri=sqlite:///{gone}"])
    data = collect(study, load_existing_study(study))
    text = render(
        data, {name: _skipped(name) for name in ("importances", "history", "slice", "curves")}
    )
    assert all(f"## {h}" in text for h in SECTIONS)
    assert f"MLflow: the MLflow store sqlite:///{gone} does not exist" in text
    # no links into a store that is not there
    assert "[Compare these runs" not in text and "](http" not in text
    assert not gone.parent.exists()


def _skipped(name):
    from kdsweep.report import Figure

    return Figure(name, name, skipped="not drawn in this test")


# ---------------------------------------------------------------- small and broken studies


def test_study_without_a_complete_trial_gets_a_short_report(studies, capsys):
    assert main(["report", str(studies["empty"])]) == 0
    text = Path("reports/empty.md").read_text()
    assert "## No complete trial" in text and "none has completed" in text
    assert "## Top configurations" not in text and "## What went wrong" in text
    assert "CUDA out of memory" in text
    assert not list(Path("reports").glob("empty/*.png"))
    assert "report: reports/empty.md" in capsys.readouterr().out


def test_one_complete_trial_skips_importances_with_the_reason(studies, tmp_path):
    path = write_report(load_study(studies["single"]))
    text = path.read_text()
    assert (
        "Skipped: importances need at least 2 complete non-baseline trials; this study has 1."
        in text
    )
    assert not (tmp_path / "reports" / "single" / "importances.png").exists()
    assert (tmp_path / "reports" / "single" / "curves.png").is_file()
    assert "**No baseline ran**" in text


def test_cli_report_exit_codes(studies, tmp_path, capsys):
    assert main(["report", str(studies["kd"]), "--output", "out/kd.md"]) == 0
    assert (tmp_path / "out" / "kd.md").is_file() and (
        tmp_path / "out" / "kd" / "history.png"
    ).is_file()
    never_run = tmp_path / "never.yaml"
    never_run.write_text(
        studies["kd"]
        .read_text()
        .replace("name: kd", "name: never")
        .replace(str(studies["kd"].parent) + "/optuna.db", str(tmp_path / "never.db"))
    )
    assert main(["report", str(never_run)]) == 2
    assert "run `kdsweep run` on this study first" in capsys.readouterr().err
    assert not (tmp_path / "never.db").exists() and not (tmp_path / "reports").exists()


def test_settings_overridden_in_the_sweep_are_shown_and_reproduced(studies):
    """The sweep ran with 40 steps; the study file now reads 80: the report shows and keeps 40."""
    study = load_study(studies["kd"], ["train.max_steps=80"])
    data = collect(study, load_existing_study(study))
    text = render(
        data, {name: _skipped(name) for name in ("importances", "history", "slice", "curves")}
    )
    assert "**Fixed settings** (as run): 40 steps" in text
    assert "`train.max_steps: 40` (the file: `80`)" in text
    assert "the study file no longer has (train.max_steps=40)" in text
    assert "--set train.max_steps=40" in section(text, "Top configurations")


def test_a_student_better_than_its_teacher_is_flagged(studies):
    study = load_study(studies["kd"])
    data = collect(study, load_existing_study(study))
    data.attrs["teacher_ppl"] = 4.5  # the best trial reaches 4.0
    text = render(
        data, {name: _skipped(name) for name in ("importances", "history", "slice", "curves")}
    )
    assert "The best student (trial 1, perplexity 4) beats the teacher (4.5)" in section(
        text, "What went wrong"
    )


def test_reasoning_left_out_and_a_truncated_teacher_are_said(studies):
    """The train answers' reasoning the template left out, and a teacher cut off before its
    answers, in the Study section and as warnings."""
    study = load_study(studies["kd"])
    data = collect(study, load_existing_study(study))
    data.attrs |= {
        StudyAttr.TRAIN_ANSWERS: 40,
        StudyAttr.TRAIN_REASONED: 40,
        StudyAttr.TRAIN_REASONING_TRAINED: 20,
        StudyAttr.TRAIN_REASONING_LEFT_OUT: 20,
        StudyAttr.TRAIN_REASONING_STRIPPED: 0,
        StudyAttr.TRAIN_UNLIKE_GENERATION: 20,
        StudyAttr.TEACHER_TRUNCATED_SHARE: 0.25,
    }
    text = render(
        data, {name: _skipped(name) for name in ("importances", "history", "slice", "curves")}
    )
    assert (
        "- **Reasoning** (train split): 40 answers, 40 with reasoning: 20 scored with it, 20 left "
        "out by the chat template" in section(text, "Study")
    )
    wrong = section(text, "What went wrong")
    assert "The reasoning of 20 train answers was not trained on" in wrong
    assert "The teacher's answers were truncated on 25% of the decoded rows" in wrong


@pytest.mark.parametrize(
    ("control_ppl", "said"),
    [
        (8.0, "50.0% lower, exact match 30.0% against 10.0%: the teacher's share of the lead"),
        (
            3.0,
            "33.3% higher, exact match 30.0% against 10.0%: at these settings the teacher made "
            "the student worse (against the tuned baseline it was 20.0% lower)",
        ),
    ],
)
def test_the_control_sentence_says_which_way_the_teacher_moved_the_winner(control_ppl, said):
    """The winner against itself at alpha 0: a lead is the teacher's share; a deficit is said
    as one, not as a share of a lead."""
    winner = pd.Series({"student_ppl": 4.0, "exact_match": 0.3})
    baseline = pd.Series({"student_ppl": 5.0, "exact_match": 0.2})
    control = pd.Series({"student_ppl": control_ppl, "exact_match": 0.1})
    data = SimpleNamespace(
        control=control, shown=lambda row, name: row[name], trial_cell=lambda row: "[9](link)"
    )
    assert said in verdict._control(data, winner, baseline)
