"""The MLflow layout of a study: one parent, one nested run per trial, true statuses, step-indexed
metrics, datasets, the best model, the run-context plugin, several workers, killed workers, and
every kind of tracking store (local SQLite, file store, a real ``mlflow server`` over HTTP)."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import mlflow.transformers
import optuna
import pytest
from mlflow.tracking import MlflowClient

from kdsweep import sweep
from kdsweep.cli import main
from kdsweep.names import StudyAttr, Tag, TrialAttr
from kdsweep.store import storage
from kdsweep.store.storage import load_existing_study
from kdsweep.study.reader import load_study
from kdsweep.sweep.objective import Objective

from conftest import Child, free_port, mlflow_runs, run_replaced

SEARCHED = ("alpha", "temperature", "top_k", "learning_rate")
FIXED = (
    "teacher",
    "student",
    "dataset",
    "max_length",
    "batch_size",
    "max_steps",
    "precision",
    "gradient_checkpointing",
    "attn_implementation",
    "seed",
)


def steps(client, run, key):
    return [m.step for m in client.get_metric_history(run.info.run_id, key)]


class PruneTrial(optuna.pruners.BasePruner):
    """Prunes one trial (by number) at its first evaluation, through Optuna's own machinery."""

    def __init__(self, number: int):
        self.number = number

    def prune(self, study, trial) -> bool:
        return trial.number == self.number


def start_worker(study_path, *args) -> Child:
    return Child("run", str(study_path), "--no-report", *args)


def wait_for_running_trial(study_path, worker: Child):
    """The trial run ``worker`` is training, once it says the trial started (its run exists by
    then)."""
    worker.wait_for("trial 0 started")
    study = load_study(study_path)
    client = MlflowClient(tracking_uri=study.tracking.uri)
    experiment = client.get_experiment_by_name(study.name)
    (run,) = client.search_runs(
        [experiment.experiment_id], "attributes.status = 'RUNNING' and tags.`kdsweep.trial` = '0'"
    )
    return run


# ---------------------------------------------------------------- one sweep, every status


def test_four_trials_complete_fail_prune_with_the_full_layout(tiny_study, monkeypatch):
    """The issue's 'done when': 4 trials, one failed, one pruned: one parent, four nested runs
    with true statuses, no RUNNING run, step-indexed metrics, params, tags, datasets, best."""
    study = load_study(tiny_study)
    # user code's fluent runs go there too
    monkeypatch.setenv("MLFLOW_TRACKING_URI", study.tracking.uri)
    monkeypatch.setattr("kdsweep.sweep.study.make_pruner", lambda study: PruneTrial(2))
    user_runs = []

    def distill(runner, params, **kwargs):
        if len(user_runs) == 1:
            user_runs.append(None)
            raise RuntimeError("simulated out of memory")
        with mlflow.start_run(
            run_name="user code inside the trial"
        ) as run:  # e.g. a transformers callback
            user_runs.append(run.info.run_id)
        return runner(params, **kwargs)

    run_replaced(tiny_study, distill, n_trials=4)

    optuna_study = load_existing_study(study)
    assert [t.state.name for t in optuna_study.get_trials()] == [
        "COMPLETE",
        "FAIL",
        "PRUNED",
        "COMPLETE",
    ]
    client, parents, trials = mlflow_runs(tiny_study)
    assert len(parents) == 1 and sorted(trials) == [0, 1, 2, 3]
    parent = parents[0]
    assert parent.info.run_id == optuna_study.user_attrs[StudyAttr.PARENT_RUN_ID]
    everything = client.search_runs([parent.info.experiment_id], "attributes.status = 'RUNNING'")
    assert everything == []

    statuses = {n: (r.info.status, r.data.tags[Tag.STATE]) for n, r in trials.items()}
    assert statuses == {
        0: ("FINISHED", "COMPLETE"),
        1: ("FAILED", "FAIL"),
        2: ("KILLED", "PRUNED"),
        3: ("FINISHED", "COMPLETE"),
    }
    assert "simulated out of memory" in trials[1].data.tags[Tag.REASON]
    traceback = client.download_artifacts(trials[1].info.run_id, "traceback.txt")
    assert "RuntimeError: simulated out of memory" in Path(traceback).read_text()
    assert (
        trials[2].info.run_name.endswith("(pruned)")
        and "pruned at step 4" in trials[2].data.tags[Tag.REASON]
    )

    for number, run in trials.items():
        trial = optuna_study.trials[number]
        assert run.data.tags[Tag.PARENT] == parent.info.run_id
        assert run.info.run_name.startswith(f"trial {number} a=")
        assert set(SEARCHED + FIXED) <= set(run.data.params)
        assert run.data.params["alpha"] == str(trial.user_attrs[TrialAttr.PARAMS]["alpha"])
        tags = run.data.tags
        assert (tags[Tag.STUDY], tags[Tag.TRIAL], tags[Tag.BASELINE]) == (
            "tiny",
            str(number),
            "False",
        )
        assert tags[Tag.VERSION] and tags[Tag.FINGERPRINT] == study.fingerprint()
        inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
        assert sorted(inputs) == ["evaluation", "training"]
        assert inputs["training"].name.endswith("-train") and inputs["evaluation"].name.endswith(
            "-test"
        )
        assert (
            '"rows": 64' in inputs["training"].profile
            and '"rows": 16' in inputs["evaluation"].profile
        )

    for number in (0, 3):  # complete: every log step, every eval, the final values
        run = trials[number]
        for key in (
            "train_loss",
            "train_kl",
            "train_ce",
            "learning_rate",
            "grad_norm",
            "tokens_per_second",
        ):
            assert steps(client, run, key) == [2, 4, 6, 8], key
        for key in ("student_ppl", "teacher_ppl", "ppl_ratio", "kl_to_teacher"):
            assert steps(client, run, key) == [4, 8], key
        for key in ("objective", "peak_memory_gb", "duration_s"):
            assert steps(client, run, key) == [8], key
        assert steps(client, run, "trainable_parameters") == [0]
        assert run.data.metrics["objective"] == pytest.approx(optuna_study.trials[number].value)
    assert steps(client, trials[2], "student_ppl") == [4]  # pruned at its first evaluation
    assert "objective" not in trials[2].data.metrics

    best = optuna_study.best_trial
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_trial"] == str(best.number)
    assert parent.data.tags["best.run_id"] == trials[best.number].info.run_id
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    assert parent.data.tags["best.alpha"] == str(best.user_attrs[TrialAttr.PARAMS]["alpha"])
    assert {"teacher_ppl", "student_ppl_untrained"} <= set(parent.data.metrics)
    assert set(FIXED) <= set(parent.data.params)
    study_file = Path(client.download_artifacts(parent.info.run_id, "study.yaml")).read_text()
    assert "max_steps: 8" in study_file and "name: tiny" in study_file

    # The plugin: a run that user code started inside trial 0 carries the study and the trial.
    user_run = client.get_run(user_runs[0])
    assert user_run.data.tags[Tag.STUDY] == "tiny"
    assert user_run.data.tags[Tag.TRIAL] == "0"
    assert user_run.data.tags[Tag.TRIAL_RUN_ID] == trials[0].info.run_id
    assert "KDSWEEP_TRIAL" not in os.environ  # the trial's marks are gone after it


def test_a_sweep_that_breaks_between_trials_ends_its_parent_failed(tiny_study, monkeypatch):
    def broken(self, optuna_study, trial):
        raise RuntimeError("the tracking server went away")

    monkeypatch.setattr(Objective, "after_trial", broken)
    assert (
        main(
            [
                "run",
                str(tiny_study),
                "--no-report",
                "--set",
                "train.max_steps=2",
                "--set",
                "train.eval_every=2",
            ]
        )
        == 1
    )
    _, parents, trials = mlflow_runs(tiny_study)
    assert parents[0].info.status == "FAILED"
    assert [r.info.status for r in trials.values()] == ["FINISHED"]


# ---------------------------------------------------------------- save_best


def forced_perplexities(values: list[float]):
    """Training for ``run_replaced``: the trials train for real, but end with these perplexities,
    in order."""
    forced = iter(values)

    def distill(runner, params, **kwargs):
        result = runner(params, **kwargs)
        return dataclasses.replace(
            result, final_eval={**result.final_eval, "student_ppl": next(forced)}
        )

    return distill


def test_save_best_keeps_only_the_best_trials_model(tiny_study, monkeypatch):
    """Trial 0 is saved, trial 1 beats it (trial 0's model is deleted), trial 2 is worse."""
    overrides = ["save_best=true", "train.max_steps=4", "train.eval_every=4"]
    run_replaced(
        tiny_study, forced_perplexities([30.0, 20.0, 50.0]), n_trials=3, overrides=overrides
    )

    client, _, trials = mlflow_runs(tiny_study)
    files = {
        n: [a.path for a in client.list_artifacts(r.info.run_id, "model")]
        for n, r in trials.items()
    }
    assert files[0] == [] and files[2] == []
    assert {"model/MLmodel", "model/model", "model/components"} <= set(files[1])  # an MLflow model
    assert trials[1].data.tags[Tag.MODEL] == "saved"
    assert trials[0].data.tags[Tag.MODEL] == "deleted: trial 1 is better"
    assert Tag.MODEL not in trials[2].data.tags

    # restored after the test, unlike set_tracking_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
    loaded = mlflow.transformers.load_model(
        f"runs:/{trials[1].info.run_id}/model", return_type="components"
    )
    assert loaded["task"] == "text-generation" and loaded["model"].num_parameters() > 0
    assert len(loaded["tokenizer"]) > 0


def test_register_as_moves_the_champion_alias_to_the_best_student(tiny_study, monkeypatch):
    """Trials 0 and 1 each beat the best so far and are registered (versions 1 and 2); trial 2
    is worse and saves nothing. The alias follows the best, and no registered files are deleted."""
    overrides = [
        "save_best=true",
        "register_as=tiny-student",
        "train.max_steps=4",
        "train.eval_every=4",
    ]
    run_replaced(
        tiny_study, forced_perplexities([30.0, 20.0, 50.0]), n_trials=3, overrides=overrides
    )

    client, _, trials = mlflow_runs(tiny_study)
    versions = {
        v.run_id: str(v.version) for v in client.search_model_versions("name = 'tiny-student'")
    }
    assert versions == {trials[0].info.run_id: "1", trials[1].info.run_id: "2"}
    champion = client.get_model_version_by_alias("tiny-student", "champion")
    assert champion.run_id == trials[1].info.run_id
    # version 1 intact
    assert "model/MLmodel" in [
        a.path for a in client.list_artifacts(trials[0].info.run_id, "model")
    ]
    # restored after the test, unlike set_tracking_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
    loaded = mlflow.transformers.load_model(
        "models:/tiny-student@champion", return_type="components"
    )
    assert loaded["model"].num_parameters() > 0


# ---------------------------------------------------------------- one parent, however many workers


def test_set_user_attr_once_keeps_the_first_value(tmp_path):
    optuna_study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'o.db'}")
    assert storage.set_user_attr_once(optuna_study, "k", "first") == "first"
    assert storage.set_user_attr_once(optuna_study, "k", "second") == "first"
    other_worker = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'o.db'}")
    assert storage.set_user_attr_once(other_worker, "k", "third") == "first"
    assert other_worker.user_attrs["k"] == "first"


def test_a_worker_that_loses_the_race_for_the_parent_adopts_the_winner(tiny_study):
    """Two workers start a fresh study together: both saw no parent and made a candidate; the
    one whose id the storage did not keep deletes its candidate and uses the other's."""
    from kdsweep.mlflow.study_runs import StudyRuns

    study = load_study(tiny_study)
    optuna_study = sweep.open_study(study)
    first, second = StudyRuns(study), StudyRuns(study)
    real_create = second.client.create_run

    def create_run_while_another_worker_wins(*args, **kwargs):
        first.attach(optuna_study, references={"teacher_ppl": 2.0})  # the other worker is quicker
        return real_create(*args, **kwargs)

    second.client.create_run = create_run_while_another_worker_wins
    assert second.attach(optuna_study, references={"teacher_ppl": 2.0}) == first.parent_run_id
    client, parents, _ = mlflow_runs(tiny_study)
    assert [p.info.run_id for p in parents] == [first.parent_run_id]
    deleted = client.search_runs(
        [parents[0].info.experiment_id], run_view_type=mlflow.entities.ViewType.DELETED_ONLY
    )
    assert len(deleted) == 1  # the losing candidate


@pytest.mark.slow
def test_two_worker_processes_put_every_trial_under_one_parent(tiny_study):
    workers = [
        start_worker(tiny_study, "--n-trials", "4", "--set", "train.max_steps=16")
        for _ in range(2)
    ]
    assert [w.finish(timeout=600) for w in workers] == [0, 0], "\n\n".join(
        w.output for w in workers
    )
    assert all(re.search(r"trial \d started", w.output) for w in workers), "a worker ran no trial"

    optuna_study = load_existing_study(load_study(tiny_study))
    assert len(optuna_study.get_trials()) == 4  # the target counts both workers' trials
    _, parents, trials = mlflow_runs(tiny_study)
    assert len(parents) == 1 and sorted(trials) == [0, 1, 2, 3]
    assert {r.data.tags[Tag.PARENT] for r in trials.values()} == {parents[0].info.run_id}
    assert parents[0].info.run_id == optuna_study.user_attrs[StudyAttr.PARENT_RUN_ID]
    assert {r.info.status for r in [*parents, *trials.values()]} == {"FINISHED"}


# ---------------------------------------------------------------- killed workers


@pytest.mark.slow
def test_a_sigkilled_worker_is_resumed_at_once(tiny_study):
    """kill -9 during a trial, then the same command at once (no heartbeat grace period to wait
    out): the dead trial fails, is retried once with its parameters, the study reaches its
    target, and nothing is left RUNNING in Optuna or MLflow."""
    worker = start_worker(
        tiny_study,
        "--n-trials",
        "2",
        "--set",
        "train.max_steps=400",
        "--set",
        "train.eval_every=400",
    )
    killed = wait_for_running_trial(tiny_study, worker)
    worker.process.kill()
    worker.finish(timeout=60)
    assert mlflow_runs(tiny_study)[2][0].info.status == "RUNNING"  # nobody could close it

    assert (
        main(
            [
                "run",
                str(tiny_study),
                "--n-trials",
                "2",
                "--no-report",
                "--set",
                "train.max_steps=4",
            ]
        )
        == 0
    )

    optuna_study = load_existing_study(load_study(tiny_study))
    dead, retry, fresh = optuna_study.trials
    assert (
        dead.state.name == "FAIL"
        and "its worker (process" in dead.user_attrs[TrialAttr.FAIL_REASON]
    )
    assert (
        retry.user_attrs[TrialAttr.RETRY_OF] == 0
        and retry.params == dead.params
        and retry.state.name == "COMPLETE"
    )
    assert fresh.state.name == "COMPLETE"
    _, parents, trials = mlflow_runs(tiny_study)
    ended = trials[0]
    assert ended.info.run_id == killed.info.run_id
    assert (ended.info.status, ended.data.tags[Tag.STATE]) == ("KILLED", "KILLED")
    assert "worker stopped" in ended.data.tags[Tag.REASON]
    assert [r.info.status for r in [*parents, *trials.values()]].count("RUNNING") == 0
    assert parents[0].info.status == "FINISHED"


# ---------------------------------------------------------------- any tracking store


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on a loopback port, in its own process group."""
    from kdsweep.mlflow import ui

    port = free_port()
    server = ui.start_server(f"sqlite:///{tmp_path / 'server.db'}", port=port)
    try:
        ui.wait_until_up(server, port)
        yield server, f"http://127.0.0.1:{port}"
    finally:
        ui.stop_server(server)
    assert not _group_alive(server.pid), "a helper of mlflow server outlived it"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_a_real_mlflow_server_over_http(tiny_study, mlflow_server):
    _, url = mlflow_server
    overrides = ["--set", f"tracking.uri={url}", "--set", "save_best=true"]
    assert main(["run", str(tiny_study), "--n-trials", "1", "--no-report", *overrides]) == 0
    client, parents, trials = mlflow_runs(tiny_study, uri=url)
    assert len(parents) == 1 and list(trials) == [0]
    assert trials[0].info.status == "FINISHED"
    assert steps(client, trials[0], "student_ppl") == [4, 8]
    assert [a.path for a in client.list_artifacts(parents[0].info.run_id)] == ["study.yaml"]
    assert "model/MLmodel" in [
        a.path for a in client.list_artifacts(trials[0].info.run_id, "model")
    ]


def test_the_default_local_store_is_mlflows_default(tiny_study, tmp_path):
    """No tracking URI anywhere: the runs land where a plain ``mlflow ui`` here looks."""
    text = "\n".join(
        line for line in tiny_study.read_text().splitlines() if not line.startswith("tracking:")
    )
    tiny_study.write_text(text + "\n")
    assert (
        main(
            [
                "run",
                str(tiny_study),
                "--n-trials",
                "1",
                "--no-report",
                "--set",
                "train.max_steps=2",
                "--set",
                "train.eval_every=2",
            ]
        )
        == 0
    )
    from kdsweep.mlflow.ui import store_uri

    uri = store_uri(load_study(tiny_study))
    assert uri == mlflow.get_tracking_uri()
    _, parents, trials = mlflow_runs(tiny_study, uri=uri)
    assert len(parents) == 1 and list(trials) == [0]


def test_a_study_moved_to_another_store_is_a_usage_error(tiny_study, tmp_path, capsys):
    fast = ["--no-report", "--set", "train.max_steps=2", "--set", "train.eval_every=2"]
    assert main(["run", str(tiny_study), "--n-trials", "1", *fast]) == 0
    elsewhere = f"tracking.uri=sqlite:///{tmp_path / 'other.db'}"
    assert main(["run", str(tiny_study), "--n-trials", "2", *fast, "--set", elsewhere]) == 2
    assert "which is not in the tracking store" in capsys.readouterr().err


# ---------------------------------------------------------------- the plugin


def test_the_run_context_provider_is_registered_with_mlflow():
    from importlib.metadata import entry_points

    from mlflow.tracking.context.registry import resolve_tags

    from kdsweep.mlflow.plugin import TrialRunContext, active_trial

    points = {e.name: e.value for e in entry_points(group="mlflow.run_context_provider")}
    assert points.get("kdsweep") == "kdsweep.mlflow.plugin:TrialRunContext"
    assert TrialRunContext().in_context() is False
    assert Tag.TRIAL not in resolve_tags()
    with active_trial("demo", 7, "abc123"):
        assert TrialRunContext().in_context() is True
        tags = resolve_tags()
        child = subprocess.run(
            [sys.executable, "-c", "import os; print(os.environ['KDSWEEP_TRIAL'])"],
            capture_output=True,
            text=True,
        )
    assert (tags[Tag.STUDY], tags[Tag.TRIAL], tags[Tag.TRIAL_RUN_ID]) == ("demo", "7", "abc123")
    assert child.stdout.strip() == "7"  # processes a trial starts see it too
    assert Tag.TRIAL not in resolve_tags()


# ---------------------------------------------------------------- kdsweep ui (the browser tests
# run it for real)


def test_ui_with_a_tracking_server_prints_its_runs_url(tiny_study, monkeypatch, capsys):
    from kdsweep.mlflow import ui

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000/")
    monkeypatch.setattr(ui, "experiment_id", lambda study, uri: "7")
    monkeypatch.setattr(
        ui, "start_server", lambda *a, **k: pytest.fail("a server is already there")
    )
    assert main(["ui", str(tiny_study)]) == 0
    assert (
        capsys.readouterr().out.strip()
        == "http://mlflow.example:5000/#/experiments/7/runs?workflowType=machine_learning"
    )


def test_ui_urls():
    from kdsweep.mlflow.links import runs_url

    assert runs_url("http://127.0.0.1:5000", None) == "http://127.0.0.1:5000/#/experiments"
