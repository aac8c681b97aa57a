"""Faults stay inside their trial, bad input stops before anything is written, interrupts are
clean, no secret is written, and a study reruns the same way."""

from __future__ import annotations

import signal
import socket
import sys
import time
from pathlib import Path

import mlflow
import optuna
import psutil
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from kdsweep.cli import main
from kdsweep.distill import train
from kdsweep.losses import LossResult
from kdsweep.names import Tag, TrialAttr
from kdsweep.store.recovery import fail_dead_trials
from kdsweep.store.storage import load_existing_study
from kdsweep.study.measures import OUT_OF_MEMORY
from kdsweep.study.reader import load_study
from kdsweep.sweep import objective

from conftest import Child, free_port, mlflow_runs, run_replaced

# ---------------------------------------------------------------- faults stay inside their trial


def test_a_diverged_loss_fails_its_trial_at_once(tiny_study, monkeypatch):
    """The loss turns NaN at step 3 of trial 0: that trial fails then (not at its next log or
    eval), with the step in its reason; the next trial runs."""
    calls = {"n": 0}
    original = train.batch_loss

    def poisoned(*args, **kwargs):
        result = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            return LossResult(loss=result.loss * float("nan"), kl=result.kl, ce=result.ce)
        return result

    monkeypatch.setattr(train, "batch_loss", poisoned)
    assert main(["run", str(tiny_study), "--no-report", "--set", "train.log_every=4"]) == 0
    first, second = load_existing_study(load_study(tiny_study)).trials
    assert (
        first.state.name == "FAIL"
        and first.user_attrs[TrialAttr.FAIL_REASON]
        == "TrainingDiverged: the training loss is nan at step 3"
    )
    assert second.state.name == "COMPLETE"
    client, parents, trials = mlflow_runs(tiny_study)
    runs = [*parents, *trials.values()]
    failed = next(r for r in runs if r.data.tags.get(Tag.TRIAL) == "0")
    assert failed.info.status == "FAILED" and "step 3" in failed.data.tags[Tag.REASON]
    # it stopped before step 4's log
    assert client.get_metric_history(failed.info.run_id, "train_loss") == []


def test_out_of_memory_fails_with_oom_and_retries_with_half_the_batch(
    tiny_study, monkeypatch, capsys
):
    """A micro-batch above 2 does not fit: trial 0 (8 x 1) and its retry (4 x 2) fail with
    reason out_of_memory; the retry of the retry (2 x 4, the same effective batch) completes."""
    seen = []

    def small_memory(runner, params, *, batch=None, **kwargs):
        seen.append(batch)
        if batch[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return runner(params, batch=batch, **kwargs)

    run_replaced(tiny_study, small_memory, n_trials=1, overrides=["train.oom_retry=true"])
    assert seen == [(8, 1), (4, 2), (2, 4)]
    trials = load_existing_study(load_study(tiny_study)).trials
    assert [(t.state.name, t.user_attrs.get(TrialAttr.FAIL_REASON)) for t in trials] == [
        ("FAIL", OUT_OF_MEMORY),
        ("FAIL", OUT_OF_MEMORY),
        ("COMPLETE", None),
    ]
    assert [t.user_attrs.get(TrialAttr.OOM_RETRY_OF) for t in trials] == [None, 0, 1]
    assert trials[2].params == trials[0].params
    _, parents, trials = mlflow_runs(tiny_study)
    runs = [*parents, *trials.values()]
    assert sorted(r.data.tags.get(Tag.REASON, "") for r in runs if r.info.status == "FAILED") == [
        OUT_OF_MEMORY,
        OUT_OF_MEMORY,
    ]
    capsys.readouterr()
    assert main(["status", str(tiny_study)]) == 0
    assert [
        line.split()[-3:] for line in capsys.readouterr().out.splitlines() if line.startswith("2 ")
    ] == [["retry", "of", "1"]]


def test_failed_trials_give_their_memory_back(tiny_study, monkeypatch):
    """Each trial grabs 200 MB in a frame and then runs out of memory: five in a row leave the
    process's resident memory where the first one left it."""
    rss = []

    def hungry(runner, params, **kwargs):
        ballast = torch.ones(50 * 2**20)  # 200 MB, held by this frame when the error unwinds
        raise torch.OutOfMemoryError(f"out of memory holding {ballast.numel()} floats")

    def measure(self, optuna_study, trial):
        rss.append(psutil.Process().memory_info().rss)

    monkeypatch.setattr(objective.Objective, "after_trial", measure)
    run_replaced(tiny_study, hungry, n_trials=5, overrides=["max_consecutive_failures=10"])
    assert len(rss) == 5
    assert max(rss[1:]) - rss[0] < 100 * 2**20, [r // 2**20 for r in rss]


def test_the_same_error_three_times_in_a_row_stops_the_sweep(tiny_study):
    def broken(runner, params, **kwargs):
        raise RuntimeError(f"tokenizer file missing (attempt {time.monotonic_ns()})")

    with pytest.raises(
        objective.RepeatedFailure,
        match="the same error failed 3 trials in a row.*tokenizer file missing",
    ):
        run_replaced(tiny_study, broken, n_trials=10)
    trials = load_existing_study(load_study(tiny_study)).trials
    assert [t.state.name for t in trials] == ["FAIL"] * 3
    _, parents, trials = mlflow_runs(tiny_study)
    runs = [*parents, *trials.values()]
    assert [r.info.status for r in runs if Tag.PARENT not in r.data.tags] == ["FAILED"]
    assert all(r.info.status != "RUNNING" for r in runs)


def test_different_errors_do_not_stop_the_sweep(tiny_study):
    errors = iter([ValueError("a"), KeyError("b"), RuntimeError("c")])

    def flaky(runner, params, **kwargs):
        raise next(errors)

    summary = run_replaced(tiny_study, flaky, n_trials=3)
    assert summary.ran == 3


# ---------------------------------------------------------------- bad input: exit 2, one line,
# nothing written


def test_an_empty_study_file_says_so(tmp_path, capsys):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    assert main(["run", str(path)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"{path}: is empty; write a study in it (see studies/demo.yaml)"
    )


# ---------------------------------------------------------------- interrupts


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once(tiny_study):
    worker = Child(
        "run",
        str(tiny_study),
        "--no-report",
        "--set",
        "train.max_steps=400",
        "--set",
        "train.eval_every=400",
    )
    worker.wait_for("trial 0 started")
    worker.wait_for(r"step \d+:")
    worker.process.send_signal(signal.SIGINT)
    worker.wait_for("again: exit now")  # the first one is being handled
    worker.process.send_signal(signal.SIGINT)
    assert worker.finish(timeout=60) == 130
    assert "interrupted again: exiting now" in worker.output


# ---------------------------------------------------------------- system metrics, reproducibility


def test_trial_runs_log_system_metrics(tiny_study):
    overrides = [
        "--set",
        "tracking.system_metrics_interval=0.2",
        "--set",
        "train.max_steps=40",
        "--set",
        "train.eval_every=20",
    ]
    assert main(["run", str(tiny_study), "--n-trials", "1", "--no-report", *overrides]) == 0
    client, parents, trials = mlflow_runs(tiny_study)
    runs = [*parents, *trials.values()]
    (trial,) = [r for r in runs if Tag.PARENT in r.data.tags]
    system = {k for k in trial.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    assert trial.data.tags[Tag.DEVICE] == "cpu" and trial.data.tags[Tag.HOST]


def test_system_metrics_can_be_turned_off(tiny_study):
    overrides = [
        "--set",
        "tracking.system_metrics=false",
        "--set",
        "tracking.system_metrics_interval=0.2",
    ]
    assert main(["run", str(tiny_study), "--n-trials", "1", "--no-report", *overrides]) == 0
    _, parents, trials = mlflow_runs(tiny_study)
    runs = [*parents, *trials.values()]
    assert not [k for r in runs for k in r.data.metrics if k.startswith("system/")]


def test_same_study_same_seed_same_trials_and_a_trial_reruns_from_its_artifact(
    tmp_path, tiny_models, tiny_data, monkeypatch
):
    """Two sweeps of one study (fresh stores) sample the same parameters in the same order and,
    on the CPU, reach the same metrics; a trial's `trial.yaml` artifact reruns it exactly."""
    from conftest import write_tiny_study

    values = []
    for name in ("first", "second"):
        root = tmp_path / name
        root.mkdir()
        path = write_tiny_study(root, tiny_models, tiny_data, name="repro", n_trials=3)
        path.write_text(path.read_text().replace("name: random", "name: tpe, n_startup_trials: 2"))
        monkeypatch.chdir(root)
        assert main(["run", str(path), "--no-report"]) == 0
        trials = load_existing_study(load_study(path)).trials
        values.append([(t.user_attrs[TrialAttr.PARAMS], t.value) for t in trials])
    assert values[0] == values[1]

    client, parents, trials = mlflow_runs(path)
    runs = [*parents, *trials.values()]
    run = next(r for r in runs if r.data.tags.get(Tag.TRIAL) == "1")
    rerun = yaml.safe_load(
        Path(client.download_artifacts(run.info.run_id, "trial.yaml")).read_text()
    )
    assert (
        rerun["search"] == values[1][1][0]
        and rerun["train"]["seed"] == 0
        and rerun["n_trials"] == 1
    )
    rerun_path = tmp_path / "rerun.yaml"
    rerun_path.write_text(
        yaml.safe_dump(rerun | {"storage": f"sqlite:///{tmp_path / 'rerun.db'}"})
    )
    assert main(["run", str(rerun_path), "--no-report"]) == 0
    (again,) = load_existing_study(load_study(rerun_path)).trials
    assert again.value == values[1][1][1]
    assert run.data.tags["kdsweep.version.torch"] == torch.__version__


def test_no_password_in_anything_written(tiny_study, tmp_path, capsys):
    """A password in a tracking URL (basic auth to an MLflow server) never appears in the
    outputs: MLflow params, tags and artifacts, Optuna attrs, the report, the terminal."""
    pytest.importorskip("mlflow")

    from kdsweep.mlflow import ui

    port = free_port()
    server = ui.start_server(f"sqlite:///{tmp_path / 'server.db'}", port=port)
    try:
        ui.wait_until_up(server, port)
        uri = f"http://kd:S3CRET-pw@127.0.0.1:{port}"
        assert (
            main(
                [
                    "run",
                    str(tiny_study),
                    "--n-trials",
                    "1",
                    "--set",
                    f"tracking.uri={uri}",
                    "--set",
                    "train.max_steps=4",
                ]
            )
            == 0
        )
        out = capsys.readouterr()
        study = load_study(tiny_study, [f"tracking.uri={uri}"])
        optuna_study = load_existing_study(study)
        texts = [
            out.out,
            out.err,
            str(optuna_study.user_attrs),
            str([t.user_attrs for t in optuna_study.trials]),
        ]
        texts += [p.read_text(errors="ignore") for p in (tmp_path / "reports").rglob("*.md")]
        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        experiment = client.get_experiment_by_name(study.name)
        for run in client.search_runs([experiment.experiment_id]):
            texts += [str(run.data.params), str(run.data.tags), run.info.run_name]
            local = Path(
                mlflow.artifacts.download_artifacts(
                    run_id=run.info.run_id,
                    tracking_uri=f"http://127.0.0.1:{port}",
                    dst_path=str(tmp_path / "dl" / run.info.run_id),
                )
            )
            texts += [
                p.read_text(errors="ignore")
                for p in local.rglob("*")
                if p.is_file() and p.suffix in (".yaml", ".md", ".txt", ".json")
            ]
        # the URL is recorded, masked
        stored = [v for k, v in optuna_study.user_attrs.items() if k.startswith("config:")]
        assert "tracking" in str(stored)
        assert not [t for t in texts if "S3CRET" in t]
    finally:
        ui.stop_server(server)


def test_a_dead_workers_baseline_trial_is_retried_once_with_its_alpha_of_zero(tmp_path):
    """A baseline's alpha of 0 lies outside the searched range it is suggested from; the retry of
    its dead worker's trial still runs it at 0, and a retry that dies is not retried again."""
    finished = psutil.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    dead_worker = {"host": socket.gethostname(), "pid": finished.pid, "started": 0.0}
    optuna_study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'o.db'}")
    optuna_study.enqueue_trial(
        {"alpha": 0.0}, user_attrs={TrialAttr.BASELINE: True, TrialAttr.GROUP: "baseline:0"}
    )
    trial = optuna_study.ask()
    assert trial.suggest_float("alpha", 0.6, 0.95) == 0.0
    trial.set_user_attr(TrialAttr.WORKER, dead_worker)

    assert [t.number for t, _ in fail_dead_trials(optuna_study)] == [0]
    retry = optuna_study.ask()
    assert retry.suggest_float("alpha", 0.6, 0.95) == 0.0
    assert (
        retry.user_attrs[TrialAttr.RETRY_OF] == 0 and retry.user_attrs[TrialAttr.BASELINE] is True
    )
    assert (
        retry.user_attrs[TrialAttr.GROUP] == "baseline:0"
        and TrialAttr.WORKER not in retry.user_attrs
    )

    retry.set_user_attr(TrialAttr.WORKER, dead_worker)
    assert [t.number for t, _ in fail_dead_trials(optuna_study)] == [1]
    assert [t.state.name for t in optuna_study.get_trials()] == ["FAIL", "FAIL"]  # no second retry
