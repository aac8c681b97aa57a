"""What a study cost: each trial's device-seconds and their parts (in every state), the study's
total on the parent run and in `kdsweep status`, the report's Compute section, and `kdsweep
check`'s estimate."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from kdsweep.cli import main
from kdsweep.names import Group, Metric, StudyAttr, TrialAttr
from kdsweep.report import write_report
from kdsweep.report.text import device_hours
from kdsweep.store import cost
from kdsweep.store.storage import load_existing_study
from kdsweep.study.reader import load_study

from conftest import mlflow_runs, run_replaced
from stored_study import FULL, build_study, section

PARTS = (
    Metric.TRAIN_SECONDS,
    Metric.EVAL_SECONDS,
    Metric.GENERATION_SECONDS,
    Metric.CHECKPOINT_SECONDS,
)


def test_every_trial_records_its_cost_and_the_parent_run_the_study_total(tiny_study, capsys):
    """Three trials on the teacher cache, the second failing after its training: each trial's
    parts stay within its device-seconds, the failed trial's cost counts, and the parent run's
    total covers the trials, the cache and the preparation."""

    def train(runner, params, **kwargs):
        result = runner(params, **kwargs)
        if train.calls == 1:
            train.calls += 1
            raise RuntimeError("broken after training")
        train.calls += 1
        return result

    train.calls = 0
    overrides = ["search.top_k=[4]", "n_trials=3"]
    run_replaced(tiny_study, train, overrides=overrides)
    study = load_study(tiny_study, overrides)
    optuna_study = load_existing_study(study)
    trials = optuna_study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    _, parents, runs = mlflow_runs(tiny_study, overrides=overrides)
    for trial in trials:
        spent = trial.user_attrs[TrialAttr.COST]
        assert spent[Metric.DEVICE_SECONDS] > 0
        assert all(0 <= spent[part] <= spent[Metric.DEVICE_SECONDS] for part in PARTS)
        assert sum(spent[part] for part in PARTS) <= spent[Metric.DEVICE_SECONDS]
        assert spent[Metric.TRAIN_SECONDS] > 0 and spent[Metric.EVAL_SECONDS] > 0
        assert spent[Metric.CACHED_STEP_SECONDS] > 0
        assert Metric.ON_POLICY_STEP_SECONDS not in spent  # no on-policy step ran
        logged = runs[trial.number].data.metrics
        assert {name: logged[name] for name in spent} == pytest.approx(spent)

    spent = cost.study_cost(optuna_study, max_steps=study.train.max_steps)
    trials_total = sum(t.user_attrs[TrialAttr.COST][Metric.DEVICE_SECONDS] for t in trials)
    assert spent.trials == pytest.approx(trials_total)
    assert spent.pruned_or_failed == pytest.approx(
        trials[1].user_attrs[TrialAttr.COST][Metric.DEVICE_SECONDS]
    )
    assert spent.teacher_cache > 0 and spent.preparation > 0 and spent.unmeasured == 0
    parent = parents[0].data.metrics
    assert parent[Metric.DEVICE_SECONDS] >= trials_total + spent.teacher_cache
    assert parent[Metric.DEVICE_SECONDS] == pytest.approx(spent.total)
    assert parent[Metric.TEACHER_CACHE_SECONDS] == pytest.approx(
        optuna_study.user_attrs[StudyAttr.TEACHER_CACHE_SECONDS]
    )

    capsys.readouterr()
    assert main(["status", str(tiny_study), *sum((["--set", o] for o in overrides), [])]) == 0
    status = " ".join(capsys.readouterr().out.split())
    assert f"device time: {device_hours(spent.total)}" in status


# ------------------------------------------------------------------- the Compute section

SEED_CHECK = (
    FULL[1][0],
    "COMPLETE",
    4.2,
    [18, 8, 5, 4.2],
    {TrialAttr.GROUP: Group.SEED_CHECK, TrialAttr.SEED_CHECK_OF: 1, TrialAttr.SEED: 1},
)


def _costing(seconds: float, train: float, eval_: float, generation: float = 0.0) -> dict:
    return {
        Metric.DEVICE_SECONDS: seconds,
        Metric.TRAIN_SECONDS: train,
        Metric.EVAL_SECONDS: eval_,
        Metric.GENERATION_SECONDS: generation,
        Metric.CHECKPOINT_SECONDS: 0.0,
    }


# FULL's trials (0 baseline, 1, 2, 5, 6 complete; 3 pruned at step 20 of 40; 4 and 7 failed),
# each with a cost but trial 7 (killed with its worker), and a seed-check run of trial 1.
COSTS = {
    0: _costing(100, 80, 10),
    1: _costing(120, 90, 10, 10) | {Metric.CACHED_STEP_SECONDS: 2.0},
    2: _costing(140, 100, 20) | {Metric.ON_POLICY_STEP_SECONDS: 8.0},
    3: _costing(50, 30, 10),
    4: _costing(20, 10, 0),
    5: _costing(110, 90, 10),
    6: _costing(130, 100, 10),
    8: _costing(125, 90, 20),
}


@pytest.fixture(scope="module")
def costly(tmp_path_factory):
    specs = [
        (params, state, ppl, curve, extra | ({TrialAttr.COST: COSTS[i]} if i in COSTS else {}))
        for i, (params, state, ppl, curve, extra) in enumerate([*FULL, SEED_CHECK])
    ]
    path = build_study(tmp_path_factory.mktemp("costly"), "costly", specs)
    optuna_study = load_existing_study(load_study(path))
    for key, value in {
        StudyAttr.TEACHER_CACHE_SECONDS: 300.0,
        f"{StudyAttr.COST_PREFIX}{cost.PREPARATION}:a": 60.0,
        f"{StudyAttr.COST_PREFIX}{cost.PREPARATION}:b": 40.0,
        f"{StudyAttr.COST_PREFIX}{cost.FINALS}:a": 25.0,
    }.items():
        optuna_study.set_user_attr(key, value)
    return path


def test_the_compute_section_splits_the_cost_and_says_what_pruning_saved(costly):
    spent = cost.study_cost(load_existing_study(load_study(costly)), max_steps=40)
    assert (spent.distilled, spent.baselines, spent.seed_check) == (500, 100, 125)
    assert (spent.pruned_or_failed, spent.unmeasured) == (70, 1)
    assert (spent.teacher_cache, spent.preparation, spent.finals) == (300, 100, 25)
    assert spent.total == 1220
    # trial 3 stopped at step 20 of 40: 20 steps short, at (30 + 10) / 20 = 2 s a step
    assert (spent.pruned_steps_not_run, spent.pruning_saved) == (20, 40)
    assert spent.median_complete == 122.5  # of 100, 110, 120, 125 (the seed check), 130, 140

    text = write_report(load_study(costly), output=str(costly.parent / "costly.md")).read_text()
    compute = section(text, "Compute")
    rows = {
        line.split("|")[1].strip(): line.split("|")[3].strip()
        for line in compute.splitlines()
        if line.startswith("| ") and "---" not in line
    }
    assert rows["teacher cache (the teacher scoring the data once)"] == f"{300 / 3600:.4f}"
    assert rows["distilled trials, complete"] == f"{500 / 3600:.4f}"
    assert rows["baselines, complete"] == f"{100 / 3600:.4f}"
    assert rows["seed check"] == f"{125 / 3600:.4f}"
    assert rows["pruned or failed trials"] == f"{70 / 3600:.4f}"
    assert rows["finals (the test split)"] == f"{25 / 3600:.4f}"
    assert rows["**total**"] == f"{1220 / 3600:.4f}"
    assert "**Median complete trial**: 2m02s." in compute  # 122.5 s
    assert "On-policy steps" in compute and "(4.0x)" in compute  # 8 s against 2 s
    assert "1 trials stopped 20 steps short, which saved about 0.0111 device-hours" in compute
    assert "each arm is judged against its own" in compute
    assert "**Not counted**: 1 trials ended with their worker" in compute
    verdict = section(text, "Verdict")
    assert "Found in 0.339 device-hours (20m20s), 24.6% of it the teacher cache" in verdict


# ------------------------------------------------------------------- kdsweep check's estimate

CHECKED = """
name: checked
storage: sqlite:///{root}/optuna.db
n_trials: 8
teacher: {{name: teacher-model}}
student: {{name: student-model}}
data: {{dataset: some/dataset, eval_split: validation, test_split: test}}
train: {{max_steps: 40, eval_every: 10}}
search: {{alpha: {{low: 0.1, high: 0.9}}}}
baselines: [{{alpha: 0.0}}]
seed_check: {{top: 1, seeds: 2}}
"""


def test_check_estimates_the_device_hours_from_the_measured_step_time(tmp_path, capsys):
    path = tmp_path / "checked.yaml"
    path.write_text(CHECKED.format(root=tmp_path))
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "estimate: none: the study has no store yet" in out
    assert not (tmp_path / "optuna.db").exists()  # checking creates nothing

    study = load_study(path)
    optuna_study = optuna.create_study(study_name="checked", storage=study.storage_url)
    # two trials of 40 steps: 2 and 4 s of setup, 0.25 and 0.5 s a step in the loop
    for setup, per_step in ((2.0, 0.25), (4.0, 0.5)):
        trial = optuna_study.ask()
        for step in (10, 20, 30, 40):
            trial.report(1.0, step)
        loop = 40 * per_step
        trial.set_user_attr(TrialAttr.COST, _costing(setup + loop, 0.8 * loop, 0.2 * loop))
        optuna_study.tell(trial, 1.0)
    optuna_study.set_user_attr(StudyAttr.TEACHER_CACHE_SECONDS, 20.0)
    optuna_study.set_user_attr(f"{StudyAttr.COST_PREFIX}{cost.PREPARATION}:a", 30.0)
    optuna_study.set_user_attr(f"{StudyAttr.COST_PREFIX}{cost.PREPARATION}:b", 50.0)
    assert main(["check", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    # medians: 3 s of setup, 0.375 s a step: a trial of 40 steps takes 18 s; 8 trials, the
    # control and (1 + the baseline + the control) x 2 seed-check runs, plus the cache (20 s)
    # and one preparation (40 s)
    expected = 15 * 18.0 + 20.0 + 40.0
    assert f"estimate: {device_hours(expected)}" in out
    assert "8 trials and 7 runs after the sweep (the control, the seed check) of 40 steps" in out
    assert "the medians of the 2 complete trials in the store" in out


def test_a_killed_trial_is_counted_as_unmeasured_not_as_free(tmp_path):
    study_path = tmp_path / "checked.yaml"
    study_path.write_text(CHECKED.format(root=tmp_path))
    study = load_study(study_path)
    optuna_study = optuna.create_study(study_name="checked", storage=study.storage_url)
    trial = optuna_study.ask()
    optuna_study.tell(trial, state=TrialState.FAIL)  # no cost: its worker died
    spent = cost.study_cost(optuna_study, max_steps=40)
    assert (spent.total, spent.unmeasured) == (0, 1)
