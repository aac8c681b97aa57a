"""Work is never lost: a killed or preempted trial goes on from its resume checkpoint, to the
value the uninterrupted trial reaches, with its MLflow curves whole."""

from __future__ import annotations

import signal

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from kdsweep.cli import main
from kdsweep.distill import checkpoints
from kdsweep.names import Tag, TrialAttr
from kdsweep.store.storage import load_existing_study
from kdsweep.study.reader import load_study
from kdsweep.sweep.objective import Objective, RepeatedFailure

from conftest import Child, mlflow_runs, wait_until, write_tiny_study

# Long enough for a signal to land mid-trial, with a checkpoint at each evaluation.
STEPS = 150
LONG = ["--n-trials", "1", "--set", f"train.max_steps={STEPS}", "--set", "train.eval_every=10"]


def checkpointed(study_path, at_step: int = 10):
    """A condition: trial 0's resume checkpoint holds step ``at_step`` or a later one. The file
    itself, not the evaluation before it: a kill between the two would find no checkpoint."""
    path = checkpoints.resume_path(load_study(study_path), 0)

    def trial_has_a_checkpoint() -> bool:
        state = checkpoints.load(path)  # written under another name and renamed: whole or none
        return state is not None and state.step >= at_step

    return trial_has_a_checkpoint


def uninterrupted(tmp_path, tiny_models, tiny_data) -> float:
    """Trial 0's value in the same study run without a stop."""
    (tmp_path / "whole").mkdir()
    path = write_tiny_study(tmp_path / "whole", tiny_models, tiny_data)
    assert main(["run", str(path), "--no-report", *LONG]) == 0
    return load_existing_study(load_study(path)).trials[0].value


def steps(client, run, key):
    return [m.step for m in client.get_metric_history(run.info.run_id, key)]


def assert_resumed(study_path, capsys, *, from_step: int) -> float:
    """The same command goes on from the checkpoint: the resume line, one MLflow curve with every
    step once, no checkpoint left. Returns the retry's value."""
    assert main(["run", str(study_path), "--no-report", *LONG]) == 0
    assert f"resuming trial 0 from step {from_step}" in capsys.readouterr().err
    stopped, retry = load_existing_study(load_study(study_path)).trials
    assert retry.state == TrialState.COMPLETE and retry.params == stopped.params
    assert retry.user_attrs[TrialAttr.RESUMED_STEP] == from_step
    assert sorted(retry.intermediate_values) == list(range(10, STEPS + 1, 10))  # the pruner's view
    assert not list(checkpoints.checkpoint_dir(load_study(study_path)).glob("*.resume.pt"))
    client, parents, runs = mlflow_runs(study_path)
    assert steps(client, runs[1], "student_ppl") == list(range(10, STEPS + 1, 10))
    assert steps(client, runs[1], "train_loss") == list(range(2, STEPS + 1, 2))  # log_every: 2
    assert parents[0].info.status == "FINISHED"
    return retry.value


@pytest.mark.slow
def test_sigterm_checkpoints_exits_143_and_the_next_run_resumes(
    tiny_study, tiny_models, tiny_data, tmp_path, capsys
):
    worker = Child("run", str(tiny_study), "--no-report", *LONG)
    worker.wait_for("trial 0 started", timeout=300)
    wait_until(checkpointed(tiny_study), timeout=300)
    worker.process.send_signal(signal.SIGTERM)
    assert worker.finish(timeout=120) == 143, worker.output
    assert "kdsweep: preempted (SIGTERM): its trial checkpointed at step" in worker.output

    study = load_study(tiny_study)
    stopped, queued = load_existing_study(study).trials
    step = stopped.user_attrs[TrialAttr.PREEMPTED_STEP]
    assert stopped.state == TrialState.FAIL and 10 <= step < STEPS
    assert stopped.user_attrs[TrialAttr.FAIL_REASON] == f"preempted at step {step}"
    assert queued.state == TrialState.WAITING and queued.user_attrs[TrialAttr.RETRY_OF] == 0
    assert checkpoints.load(checkpoints.resume_path(study, 0)).step == step
    _, parents, runs = mlflow_runs(tiny_study)
    assert (runs[0].info.status, runs[0].data.tags[Tag.STATE]) == ("KILLED", "PREEMPTED")
    assert parents[0].info.status == "KILLED"

    value = assert_resumed(tiny_study, capsys, from_step=step)
    assert value == pytest.approx(uninterrupted(tmp_path, tiny_models, tiny_data), rel=1e-6)


@pytest.mark.slow
def test_a_killed_trial_resumes_from_its_last_checkpoint(
    tiny_study, tiny_models, tiny_data, tmp_path, capsys
):
    worker = Child("run", str(tiny_study), "--no-report", *LONG)
    worker.wait_for("trial 0 started", timeout=300)
    wait_until(checkpointed(tiny_study, at_step=20), timeout=300)
    worker.process.kill()
    worker.finish(timeout=60)
    study = load_study(tiny_study)
    saved = checkpoints.load(checkpoints.resume_path(study, 0)).step
    assert saved >= 20 and saved % 10 == 0

    value = assert_resumed(tiny_study, capsys, from_step=saved)
    client = MlflowClient(tracking_uri=study.tracking.uri)
    killed = mlflow_runs(tiny_study)[2][0]
    assert steps(client, killed, "student_ppl")[-1] >= saved  # what the dead run had logged
    assert value == pytest.approx(uninterrupted(tmp_path, tiny_models, tiny_data), rel=1e-6)


def test_a_checkpoint_from_other_settings_is_not_resumed(tiny_study, capsys):
    """A retry under changed training settings starts again: the checkpoint is not its trial's."""
    worker = Child("run", str(tiny_study), "--no-report", *LONG)
    worker.wait_for("trial 0 started", timeout=300)
    wait_until(checkpointed(tiny_study), timeout=300)
    worker.process.kill()
    worker.finish(timeout=60)
    short = ["--n-trials", "1", "--set", "train.max_steps=4"]
    assert main(["run", str(tiny_study), "--no-report", *short]) == 0
    err = capsys.readouterr().err
    assert "trial 0's checkpoint was written under other study settings" in err
    assert "resuming" not in err
    assert load_existing_study(load_study(tiny_study)).trials[1].state == TrialState.COMPLETE


def test_preempted_trials_do_not_count_toward_the_repeated_failure_stop(tiny_study):
    study = load_study(tiny_study)  # max_consecutive_failures: 3
    judge = Objective(study=study, runner=None, runs=None, progress=None)

    def failed(**attrs):
        return optuna.trial.create_trial(
            state=TrialState.FAIL,
            user_attrs={TrialAttr.FAIL_REASON: "preempted at step 4", **attrs},
        )

    for _ in range(5):
        judge._stop_on_repeated_failure(failed(**{TrialAttr.PREEMPTED_STEP: 4}))
    with pytest.raises(RepeatedFailure):  # the same reason, not a preemption: it stops
        for _ in range(3):
            judge._stop_on_repeated_failure(failed())
