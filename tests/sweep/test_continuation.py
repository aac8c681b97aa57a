"""A continued study stays whole: any sequence of ``kdsweep run`` calls (a growing --n-trials,
seed checks in between, another sampler seed) leaves a study that ``report``, ``status`` and the
figures read, and whose seed check covers its current best configurations."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from kdsweep.cli import main
from kdsweep.names import StudyAttr, TrialAttr
from kdsweep.report import write_report
from kdsweep.store.storage import load_existing_study
from kdsweep.store.trials import Trials
from kdsweep.study.reader import load_study

from conftest import Child

SPLITS = ["data.eval_split=test[:8]", "data.test_split=test[8:]"]
CHECKED = [*SPLITS, "baselines=[{alpha: 0.0}]", "seed_check.top=1", "seed_check.seeds=1"]


def run(study_path, n_trials: int, overrides: list[str]) -> int:
    sets = [arg for override in overrides for arg in ("--set", override)]
    return main(["run", str(study_path), "--n-trials", str(n_trials), "--no-report", *sets])


def checked_configurations(optuna_study) -> set[int]:
    return {
        t.user_attrs[TrialAttr.SEED_CHECK_OF]
        for t in optuna_study.trials
        if TrialAttr.SEED_CHECK_OF in t.user_attrs and t.state == TrialState.COMPLETE
    }


@pytest.mark.slow
def test_run_seed_check_continue_continue_then_report(tiny_study, capsys):
    assert run(tiny_study, 3, CHECKED) == 0
    assert "seed check of trial" in capsys.readouterr().err  # not as a new trial number
    assert run(tiny_study, 4, CHECKED) == 0
    assert run(tiny_study, 5, [*CHECKED, "sampler.seed=1"]) == 0  # another sampler seed too
    study = load_study(tiny_study, CHECKED)
    optuna_study = load_existing_study(study)
    view = Trials.of(optuna_study)
    best_distilled, best_baseline = view.best_distilled, view.compared_baseline
    assert len(view.ranked) == 5
    # The seed check follows the study: the current best of each kind is checked (and so is
    # every configuration that was the best after an earlier call).
    assert {best_distilled.number, best_baseline.number} <= checked_configurations(optuna_study)
    jobs = optuna_study.user_attrs[StudyAttr.SEED_CHECK_JOBS]
    assert len(jobs) == len({tuple(job) for job in jobs})  # each run once
    assert f"{StudyAttr.TEST_PREFIX}{best_distilled.number}" in optuna_study.user_attrs

    report = write_report(study)
    text = report.read_text()
    assert "On the test split `test[8:]`" in text
    assert (report.parent / report.stem / "history.png").exists()  # trial numbers with gaps
    assert main(["status", str(tiny_study)]) == 0
    assert run(tiny_study, 5, CHECKED) == 0
    assert "nothing to do" in capsys.readouterr().err


def test_a_study_of_baselines_only_warns_and_reports(tiny_study, capsys):
    overrides = ["baselines=[{alpha: 0.0, trials: 2}]"]
    assert run(tiny_study, 2, overrides) == 0
    err = capsys.readouterr().err
    assert "are all baselines" in err and "ask for at least 3 (--n-trials 3)" in err
    text = write_report(load_study(tiny_study, overrides)).read_text()
    assert "no distilled trial" in text.lower()
    assert main(["status", str(tiny_study)]) == 0


@pytest.mark.parametrize("outcome", ["pruned", "failed"])
def test_a_study_whose_trials_all_ended_early_still_reports(tiny_study, monkeypatch, outcome):
    class PruneAll(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            return True

    if outcome == "pruned":
        monkeypatch.setattr("kdsweep.sweep.study.make_pruner", lambda study: PruneAll())
        overrides = []
    else:
        overrides = ["max_consecutive_failures=5"]
        monkeypatch.setattr(
            "kdsweep.prepare.trial_runner.TrialRunner.__call__",
            lambda self, params, **kw: (_ for _ in ()).throw(RuntimeError("broken on purpose")),
        )
    assert run(tiny_study, 2, overrides) == 0
    states = {t.state for t in load_existing_study(load_study(tiny_study)).trials}
    assert states == {TrialState.PRUNED if outcome == "pruned" else TrialState.FAIL}
    text = write_report(load_study(tiny_study, overrides)).read_text()
    assert "no complete trial" in text.lower()
    assert main(["status", str(tiny_study)]) == 0


def test_a_run_that_leaves_baselines_queued_ends_and_says_what_finishes_them(tiny_study):
    """`kdsweep check`'s advice, `--n-trials 1`, on a study of 2 baselines with a test split: the
    run trains trial 0 and ends (no worker will run the other baseline, so nothing waits for it),
    naming the queued trial and the command that runs it; that command then ends the study."""
    sets = [*SPLITS, "baselines=[{alpha: 0.0, trials: 2}]", "n_trials=3"]
    args = [arg for s in sets for arg in ("--set", s)]
    first = Child("run", str(tiny_study), "--n-trials", "1", "--no-report", *args)
    assert first.finish(timeout=300) == 0, first.output
    assert "trials 1 (a baseline) are queued and no worker runs them" in first.output
    assert f"`kdsweep run {tiny_study} --n-trials 2`" in first.output
    study = load_study(tiny_study, sets)
    trials = load_existing_study(study).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.WAITING]
    assert run(tiny_study, 3, sets) == 0
    optuna_study = load_existing_study(study)
    assert [t.state for t in optuna_study.trials] == [TrialState.COMPLETE] * 3
    assert StudyAttr.TEST_TEACHER_PPL in optuna_study.user_attrs  # the finals ran
