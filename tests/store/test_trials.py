"""One view of the trials: baselines are what the study declared, ranks follow the first
objective's direction, the compared baseline is like with like, and every part reads it alike."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from kdsweep.cli import main
from kdsweep.names import Group, StudyAttr, TrialAttr
from kdsweep.report import write_report
from kdsweep.store.storage import load_existing_study
from kdsweep.store.trials import Trials
from kdsweep.study.reader import load_study


def trial(number, value=None, *, state=TrialState.COMPLETE, baseline=False, rank=0, **attrs):
    made = optuna.trial.create_trial(
        state=state,
        value=value,
        params={"alpha": 0.5},
        distributions={"alpha": FloatDistribution(0.0, 1.0)},
        user_attrs={
            TrialAttr.BASELINE: baseline,
            TrialAttr.PARAMS: {"alpha": 0.5, "lora_rank": rank},
            **attrs,
        },
    )
    made.number = number
    return made


def test_baselines_are_what_the_study_declared_and_rank_by_the_direction():
    trials = [
        trial(0, 3.0, baseline=True),  # a baseline at alpha 0.5: still a baseline
        trial(1, 2.0),
        trial(2, 1.0),
        trial(3, 0.5, **{TrialAttr.GROUP: Group.SEED_CHECK}),  # never ranked
        trial(4, state=TrialState.RUNNING),
        trial(5, state=TrialState.WAITING, baseline=True),
    ]
    low = Trials(trials, ["minimize"])
    assert [t.number for t in low.ranked] == [2, 1, 0]
    assert [t.number for t in low.distilled] == [2, 1] and low.compared_baseline.number == 0
    assert [t.number for t in low.finalists(top=1)] == [2, 0]
    assert [t.number for t in low.running] == [4] and [t.number for t in low.queued] == [5]
    assert low.better(1.0, 2.0) and not low.better(2.0, 2.0)
    high = Trials(trials, [optuna.study.StudyDirection.MAXIMIZE])
    assert [t.number for t in high.ranked] == [0, 1, 2] and high.better(2.0, 1.0)


def test_the_compared_baseline_is_of_the_best_distilled_trials_form():
    trials = [
        trial(0, 1.0, baseline=True),
        trial(1, 2.0, baseline=True, rank=4),
        trial(2, 0.5, rank=4),
    ]
    assert Trials(trials, ["minimize"]).compared_baseline.number == 1  # like with like
    trials[2] = trial(2, 0.5, rank=16)  # no baseline trained rank 16: the best of all
    assert Trials(trials, ["minimize"]).compared_baseline.number == 0


def test_a_retried_trial_counts_no_longer_and_contenders_are_per_kind():
    trials = [
        trial(0, state=TrialState.FAIL),
        trial(1, 2.0, **{TrialAttr.RETRY_OF: 0}),
        trial(2, 1.0),
        trial(3, 5.0, baseline=True),
    ]
    view = Trials(trials, ["minimize"])
    assert [t.number for t in view.sweep] == [1, 2, 3]
    assert view.count([TrialState.COMPLETE, TrialState.FAIL]) == 3
    new_baseline = trial(9, state=TrialState.RUNNING, baseline=True)
    new_distilled = trial(9, state=TrialState.RUNNING)
    assert view.contends(new_baseline, 4.0, top=1)  # beats the best baseline
    assert not view.contends(new_distilled, 1.5, top=1)  # not among the 1 best distilled
    assert view.contends(new_distilled, 1.5, top=2)


@pytest.mark.slow
def test_a_baseline_at_a_non_zero_alpha_is_a_baseline_everywhere(tiny_study, capsys):
    """ "Distillation at default settings" as the baseline: the sweep runs it first, the finals
    score it on the test split, the seed check trains it again, status notes it, and the report
    compares the winner with it, not with an alpha of 0."""
    sets = [
        "baselines=[{alpha: 0.5, temperature: 1.0, top_k: 4}]",
        "n_trials=3",
        "data.eval_split=test[:8]",
        "data.test_split=test[8:]",
        "seed_check.top=1",
        "seed_check.seeds=1",
    ]
    args = [arg for s in sets for arg in ("--set", s)]
    assert main(["run", str(tiny_study), "--no-report", *args]) == 0
    study = load_study(tiny_study, sets)
    optuna_study = load_existing_study(study)
    view = Trials.of(optuna_study)
    baseline = view.compared_baseline
    assert baseline is not None and baseline.number == 0 and baseline.params["alpha"] == 0.5
    attrs = optuna_study.user_attrs
    assert f"{StudyAttr.TEST_PREFIX}0" in attrs  # a finalist, scored on the test split
    assert [0, study.train.seed + 1] in attrs[StudyAttr.SEED_CHECK_JOBS]
    assert main(["status", str(tiny_study), *args]) == 0
    status = capsys.readouterr().out
    assert any(line.split()[0] == "0" and "baseline" in line for line in status.splitlines()[3:])
    verdict = write_report(study).read_text().split("## Reference points")[0]
    assert "for the best of 1 baseline trial ([0]" in verdict
    assert "plain fine-tuning" not in verdict
