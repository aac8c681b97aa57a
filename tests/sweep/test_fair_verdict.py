"""A verdict that survives a real study: the control separates the teacher's share of the lead
from the search's, each arm is pruned against its own, a verdict without a distilled trial says
why, the report and status tell what the trials ran with, and the teacher cache holds only what
the trials read and costs a study that reuses it nothing."""

from __future__ import annotations

import json

import optuna
import pytest

from kdsweep.cli import main
from kdsweep.names import StudyAttr, Tag, TrialAttr
from kdsweep.paths import teacher_cache_dir
from kdsweep.report import write_report
from kdsweep.store.storage import load_existing_study
from kdsweep.store.trials import Trials, is_baseline, params_of
from kdsweep.study.reader import load_study

from conftest import mlflow_runs

SPLITS = ["data.eval_split=test[:8]", "data.test_split=test[8:]"]


def run(study_path, sets: list[str], *extra: str) -> int:
    args = [arg for s in sets for arg in ("--set", s)]
    return main(["run", str(study_path), "--no-report", *args, *extra])


@pytest.mark.slow
def test_the_control_trains_the_winner_again_at_alpha_0(tiny_study, capsys):
    sets = [*SPLITS, "baselines=[{alpha: 0.0}]", "n_trials=3", "control=true"]
    sets += ["seed_check.top=1", "seed_check.seeds=1"]
    assert run(tiny_study, sets) == 0
    study = load_study(tiny_study, sets)
    optuna_study = load_existing_study(study)
    view = Trials.of(optuna_study)
    winner = view.best_distilled
    control = view.control(winner)
    assert control is not None and not is_baseline(control)
    ours, theirs = params_of(winner), params_of(control)
    assert theirs == ours | {"alpha": 0.0}  # the winner's learning rate, form, everything
    assert TrialAttr.SEED not in control.user_attrs  # the study's seed, as the winner's
    attrs = optuna_study.user_attrs
    assert f"{StudyAttr.TEST_PREFIX}{control.number}" in attrs  # scored on the test split
    assert [control.number, study.train.seed + 1] in attrs[StudyAttr.SEED_CHECK_JOBS]
    assert control not in view.ranked and len(view.sweep) == 3

    verdict = write_report(study).read_text().split("## Study")[0]
    assert "Against the same configuration without the teacher (the control, [" in verdict
    assert "Distillation's search drew 2 trials against 1 for the baselines" in verdict
    assert "The control (the winner at alpha 0) averages" in verdict  # the seed check's
    _, _, runs = mlflow_runs(tiny_study, overrides=sets)
    assert runs[control.number].data.tags[Tag.CONTROL_OF] == str(winner.number)
    capsys.readouterr()
    assert main(["status", str(tiny_study), *[a for s in sets for a in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert f"control of {winner.number} (alpha 0)" in out and "1 control" in out


def test_a_verdict_without_a_complete_distilled_trial_says_why(tiny_study, monkeypatch):
    """The baselines complete; every distilled trial is pruned at its first evaluation."""

    class PruneDistilled(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            return not trial.user_attrs.get(TrialAttr.BASELINE)

    monkeypatch.setattr("kdsweep.sweep.study.make_pruner", lambda study: PruneDistilled())
    sets = ["baselines=[{alpha: 0.0}]", "n_trials=3"]
    assert run(tiny_study, sets) == 0
    verdict = write_report(load_study(tiny_study, sets)).read_text().split("## Study")[0]
    assert "**No distilled trial has completed** (of 2: 2 pruned (at step 4))" in verdict
    assert "`pruner.name: none`" in verdict


def test_the_report_and_status_read_the_settings_the_trials_ran_with(tiny_study, capsys):
    """The run sets 4 steps and 3 trials; the study file says 8 and 2. Report and status, read
    with the file as it is, say what ran and name the difference."""
    sets = ["train.max_steps=4", "train.eval_every=2"]
    assert run(tiny_study, sets, "--n-trials", "3") == 0
    study = load_study(tiny_study)
    header = write_report(study).read_text().split("## Study")[1].split("\n## ")[0]
    assert "target 3" in header and "**Fixed settings** (as run): 4 steps" in header
    assert "`train.max_steps: 4` (the file: `8`)" in header
    assert "`train.eval_every: 2` (the file: `4`)" in header
    capsys.readouterr()
    assert main(["status", str(tiny_study)]) == 0
    assert "3 trials, target 3" in capsys.readouterr().out


def _train_caches() -> list[dict]:
    manifests = [
        json.loads((folder / "manifest.json").read_text())
        for folder in teacher_cache_dir().glob("[!.]*")
        if folder.is_dir()
    ]
    return [m for m in manifests if m["key"]["data"]["split"] == "train"]


def test_the_cache_holds_the_rows_trials_read_and_a_reusing_study_pays_nothing(tiny_study, capsys):
    """Two steps of 8 rows read 16 of the 64 training rows: the cache holds those, built once
    with a progress line; a second study reading the same rows reuses it at no cost."""
    sets = ["search.top_k=[4]", "train.max_steps=2", "train.eval_every=2", "n_trials=1"]
    assert run(tiny_study, sets) == 0
    (manifest,) = _train_caches()
    assert (manifest["covered_examples"], manifest["examples"]) == (16, 64)
    assert manifest["built_for"].startswith("tiny (")
    err = capsys.readouterr().err
    assert "teacher cache of 'train': 16 rows" in err  # the phase's lines
    assert "the 16 of 64 rows the trials read" in err
    first = load_existing_study(load_study(tiny_study, sets)).user_attrs
    assert first[StudyAttr.TEACHER_CACHE_SECONDS] > 0

    other = [*sets, "name=other"]
    assert run(tiny_study, other) == 0
    assert len(_train_caches()) == 1  # reused
    attrs = load_existing_study(load_study(tiny_study, other)).user_attrs
    assert StudyAttr.TEACHER_CACHE_SECONDS not in attrs
    assert attrs[StudyAttr.TEACHER_CACHE_REUSED] == [manifest["built_for"]]
    report = write_report(load_study(tiny_study, other)).read_text()
    assert f"**Teacher cache**: reused, built for {manifest['built_for']}" in report
