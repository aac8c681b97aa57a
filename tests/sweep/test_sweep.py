"""A study end to end on tiny models: Optuna trials and MLflow runs, continuing, baselines,
failures."""

from __future__ import annotations

import math

import optuna
import pytest

from kdsweep.cli import main
from kdsweep.names import StudyAttr, Tag, TrialAttr
from kdsweep.store.storage import load_existing_study
from kdsweep.study.reader import load_study

from conftest import mlflow_runs, run_replaced


def test_two_trial_study_end_to_end(tiny_study):
    assert main(["run", str(tiny_study), "--no-report"]) == 0

    optuna_study = load_existing_study(load_study(tiny_study))
    trials = optuna_study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert optuna_study.user_attrs["teacher_ppl"] > 1
    assert optuna_study.user_attrs["student_ppl_untrained"] > 1

    client, parents, by_trial = mlflow_runs(tiny_study)
    children = list(by_trial.values())
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.info.run_id == optuna_study.user_attrs[StudyAttr.PARENT_RUN_ID]
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags[Tag.PARENT] == parent.info.run_id
        for key in ("alpha", "temperature", "top_k", "learning_rate", "teacher", "max_steps"):
            assert key in run.data.params
        ppl = client.get_metric_history(run.info.run_id, "student_ppl")
        assert [m.step for m in ppl] == [4, 8]
        assert all(math.isfinite(m.value) and m.value > 1 for m in ppl)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [
            2,
            4,
            6,
            8,
        ]
        trial = trials[int(run.data.tags[Tag.TRIAL])]
        assert trial.value == pytest.approx(ppl[-1].value)
        assert trial.user_attrs[TrialAttr.MLFLOW_RUN_ID] == run.info.run_id


def test_rerun_continues_up_to_the_total(tiny_study, capsys):
    assert main(["run", str(tiny_study), "--n-trials", "1", "--no-report"]) == 0
    assert main(["run", str(tiny_study), "--n-trials", "2", "--no-report"]) == 0
    assert main(["run", str(tiny_study), "--n-trials", "2", "--no-report"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert len(load_existing_study(load_study(tiny_study)).get_trials()) == 2
    _, parents, by_trial = mlflow_runs(tiny_study)
    children = list(by_trial.values())
    assert len(parents) == 1 and len(children) == 2


def test_baselines_run_first_and_are_tagged(tiny_study):
    text = tiny_study.read_text() + "baselines:\n  - {alpha: 0.0, top_k: all}\n"
    tiny_study.write_text(text)
    assert main(["run", str(tiny_study), "--n-trials", "2", "--no-report"]) == 0
    trials = load_existing_study(load_study(tiny_study)).get_trials()
    assert trials[0].user_attrs[TrialAttr.BASELINE] is True
    assert trials[0].user_attrs[TrialAttr.PARAMS]["alpha"] == 0.0
    assert "baseline" not in trials[1].user_attrs
    _, _, by_trial = mlflow_runs(tiny_study)
    children = list(by_trial.values())
    tags = {r.data.tags[Tag.TRIAL]: r.data.tags[Tag.BASELINE] for r in children}
    assert tags == {"0": "True", "1": "False"}


def test_failed_trial_is_failed_in_both_and_the_sweep_goes_on(tiny_study):
    calls = []

    def flaky(runner, params, **kwargs):
        calls.append(params)
        if len(calls) == 1:
            raise RuntimeError("simulated out of memory")
        return runner(params, **kwargs)

    run_replaced(tiny_study, flaky)
    trials = load_existing_study(load_study(tiny_study)).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert "simulated out of memory" in trials[0].user_attrs[TrialAttr.FAIL_REASON]
    client, _, by_trial = mlflow_runs(tiny_study)
    children = list(by_trial.values())
    by_trial = {r.data.tags[Tag.TRIAL]: r for r in children}
    assert by_trial["0"].info.status == "FAILED"
    assert "simulated out of memory" in by_trial["0"].data.tags[Tag.REASON]
    assert by_trial["1"].info.status == "FINISHED"


def test_interrupt_leaves_no_running_run(tiny_study):
    def interrupted(runner, params, **kwargs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_replaced(tiny_study, interrupted)
    _, parents, by_trial = mlflow_runs(tiny_study)
    children = list(by_trial.values())
    assert parents[0].info.status == "KILLED"
    assert [r.info.status for r in children] == ["KILLED"]


def test_a_sweep_that_searches_beta_trains_each_trial_with_its_own(tiny_study, monkeypatch):
    """beta is searched like the classic four: sampled per trial, a param and part of the run name
    of each MLflow run, and the divergence each trial's training steps take."""
    from kdsweep.distill import loss

    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs["beta"])
        return distill_loss_from_hidden(*args, **kwargs)

    distill_loss_from_hidden = loss.distill_loss_from_hidden
    monkeypatch.setattr(loss, "distill_loss_from_hidden", recording)
    fixed = [
        "--set",
        "search.beta=[0.0, 1.0]",
        "--set",
        "search.alpha=0.5",
        "--set",
        "search.top_k=[8]",
    ]
    assert main(["run", str(tiny_study), "--n-trials", "4", "--no-report", *fixed]) == 0

    trials = load_existing_study(load_study(tiny_study)).get_trials()
    betas = [t.params["beta"] for t in trials]
    assert set(betas) == {0.0, 1.0} and len(betas) == 4  # the study's seed samples both
    _, _, by_trial = mlflow_runs(tiny_study)
    children = list(by_trial.values())
    for run in children:
        beta = betas[int(run.data.tags[Tag.TRIAL])]
        assert float(run.data.params["beta"]) == beta
        assert (" b=1.00" in run.info.run_name) == (beta == 1.0)

    # Training steps only (evaluation keeps forward KL at T = 1): each trial's beta, in order.
    def runs_of(values):
        return [v for i, v in enumerate(values) if i == 0 or values[i - 1] != v]

    assert runs_of(seen) == runs_of(betas)
