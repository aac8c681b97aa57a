"""``kdsweep run --workers N``: one study, one parent run, one teacher cache, one view, and the
launcher's Ctrl-C, exit status and device checks."""

from __future__ import annotations

import io
import json
import re
import signal
import time

import pytest
import torch
from optuna.trial import TrialState
from rich.console import Console

from kdsweep import launch
from kdsweep.cli import main
from kdsweep.errors import UsageError
from kdsweep.names import Tag, TrialAttr
from kdsweep.paths import teacher_cache_dir
from kdsweep.progress import EventWriter, LaunchView, SweepProgress, parse_event
from kdsweep.store.storage import load_existing_study
from kdsweep.study.reader import load_study

from conftest import Child, mlflow_runs, wait_until, written


def train_caches() -> list[dict]:
    """The manifests of the teacher caches of the training split."""
    manifests = [
        json.loads((f / "manifest.json").read_text())
        for f in teacher_cache_dir().glob("[!.]*")
        if f.is_dir()
    ]
    return [m for m in manifests if m["key"]["data"]["split"] == "train"]


# ---------------------------------------------------------------- workers on one study


@pytest.mark.slow
def test_three_workers_share_one_study_one_parent_and_one_teacher_cache(tiny_study):
    top_ks = "search.top_k=[4, 8]"  # every top_k a number: the teacher runs once, into a cache
    launcher = Child(
        "run",
        str(tiny_study),
        "--workers",
        "3",
        "--n-trials",
        "6",
        "--set",
        top_ks,
        "--set",
        "train.max_steps=16",
    )
    assert launcher.finish(timeout=600) == 0, launcher.output
    output = launcher.output

    optuna_study = load_existing_study(load_study(tiny_study))
    assert [t.state.name for t in optuna_study.get_trials()] == ["COMPLETE"] * 6
    _, parents, by_trial = mlflow_runs(tiny_study)
    trials = list(by_trial.values())
    assert len(parents) == 1 and sorted(int(r.data.tags[Tag.TRIAL]) for r in trials) == list(
        range(6)
    )
    assert {r.data.tags[Tag.PARENT] for r in trials} == {parents[0].info.run_id}
    assert {r.info.status for r in [*parents, *trials]} == {"FINISHED"}

    busy = set(re.findall(r"^\[(w\d)\] trial \d+ complete", output, re.M))
    assert len(busy) >= 2, f"one worker ran every trial:\n{output}"
    assert len(set(re.findall(r"^w\d: pid (\d+)", output, re.M))) == 3

    # The launcher built the cache; every worker read it.
    assert len(train_caches()) == 1
    assert len(re.findall(r"^teacher top-8 cache of 'train': built", output, re.M)) == 1
    assert sorted(
        re.findall(r"^\[w(\d)\] teacher top-8 cache of 'train': reusing", output, re.M)
    ) == ["0", "1", "2"]

    # One view: no step lines, and the summary and the report once, from the launcher.
    assert not re.search(r"step \d+:", output)
    assert (
        output.count("report: reports/tiny.md") == 1 and output.count("best distilled, trial") == 1
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, status, state",
    [(signal.SIGINT, 130, "INTERRUPTED"), (signal.SIGTERM, 143, "PREEMPTED")],
    ids=["ctrl-c", "sigterm"],
)
def test_a_signal_stops_every_worker_and_leaves_nothing_running(tiny_study, signum, status, state):
    launcher = Child(
        "run",
        str(tiny_study),
        "--workers",
        "2",
        "--set",
        "train.max_steps=2000",
        "--set",
        "train.eval_every=1",
    )
    for name in ("w0", "w1"):
        launcher.wait_for(rf"^\[{name}\] trial \d+ started", timeout=300)

    def both_training() -> bool:  # each running trial has reported an evaluation
        running = load_existing_study(load_study(tiny_study)).get_trials(
            states=[TrialState.RUNNING]
        )
        return len(running) == 2 and all(t.intermediate_values for t in running)

    wait_until(both_training, timeout=120)
    launcher.process.send_signal(signum)
    start = time.monotonic()
    assert launcher.finish(timeout=180) == status, launcher.output
    # Bounded: a worker that does not exit within the grace period is killed.
    assert time.monotonic() - start < launch.STOP_GRACE_SECONDS + 30, launcher.output
    assert f"{signal.Signals(signum).name}: stopping the workers" in launcher.output

    optuna_study = load_existing_study(load_study(tiny_study))
    assert "RUNNING" not in {t.state.name for t in optuna_study.get_trials()}
    _, parents, by_trial = mlflow_runs(tiny_study)
    trials = list(by_trial.values())
    assert len(trials) == 2 and {(r.info.status, r.data.tags[Tag.STATE]) for r in trials} == {
        ("KILLED", state)
    }
    assert [p.info.status for p in parents] == ["KILLED"]
    if signum == signal.SIGTERM:  # each worker's trial is queued again, to resume
        waiting = optuna_study.get_trials(states=[TrialState.WAITING])
        assert len(waiting) == 2 and all(TrialAttr.RETRY_OF in t.user_attrs for t in waiting)


# ---------------------------------------------------------------- bad input stops the launcher


def bad_devices() -> list[tuple[str, str]]:
    cases = [
        ("0,x", "expected GPU indices"),
        ("99", "GPU" if torch.cuda.is_available() else "no CUDA GPU is visible"),
    ]
    return cases + ([] if torch.cuda.is_available() else [("0", "no CUDA GPU is visible")])


@pytest.mark.parametrize("devices, needle", bad_devices())
def test_bad_devices_exit_2_with_one_line_and_nothing_written(
    tiny_study, tmp_path, capsys, devices, needle
):
    before = written(tmp_path)
    assert main(["run", str(tiny_study), "--workers", "2", "--devices", devices]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith(f"kdsweep: --devices {devices}: ") and needle in err[0]
    ), err
    assert written(tmp_path) == before


@pytest.mark.parametrize(
    "override, needle",
    [
        (
            "teacher.name=/nonexistent/teacher",
            "cannot load the teacher: no folder /nonexistent/teacher",
        ),
        ("data.dataset=/nonexistent/rows.jsonl", "/nonexistent/rows.jsonl"),
    ],
)
def test_missing_inputs_stop_the_launcher_before_any_worker(
    tiny_study, tmp_path, capsys, override, needle
):
    before = written(tmp_path)
    assert main(["run", str(tiny_study), "--workers", "2", "--set", override]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("kdsweep:")]
    assert len(errors) == 1 and needle in errors[0], err
    assert "w0: pid" not in err
    assert written(tmp_path) == before


# ---------------------------------------------------------------- devices, statuses, the view


@pytest.fixture
def two_gpus(monkeypatch):
    """This process sees two CUDA GPUs (as far as the device plan asks)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_workers_go_round_robin_over_the_listed_or_visible_gpus(tiny_study, two_gpus, monkeypatch):
    study = load_study(tiny_study, ["train.device=auto"])
    assert launch.plan_devices(study, 3, None) == [0, 1, 0]
    assert launch.plan_devices(study, 4, [0, 0, 1]) == [0, 0, 1, 0]
    assert launch.worker_env("w0", 1, threads=8)["CUDA_VISIBLE_DEVICES"] == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # this process's GPU 1 is the machine's 3
    assert launch.worker_env("w0", 1, threads=8)["CUDA_VISIBLE_DEVICES"] == "3"
    with pytest.raises(UsageError, match=r"^--devices 0,2: no GPU 2 here \(2 visible\)"):
        launch.plan_devices(study, 2, [0, 2])


def test_a_study_on_one_gpu_or_on_the_cpu_keeps_its_workers_there(tiny_study, two_gpus):
    on_gpu1 = load_study(tiny_study, ["train.device=cuda:1"])
    assert launch.plan_devices(on_gpu1, 2, None) == [1, 1]
    command = launch.worker_command(
        "s.yaml", overrides=[], n_trials=None, timeout=None, study=on_gpu1, pinned=[1, 1]
    )
    # inside the worker its one GPU is cuda:0
    assert command[-2:] == [
        "--set",
        "train.device=cuda",
    ]
    on_cpu = load_study(tiny_study)
    assert launch.plan_devices(on_cpu, 2, None) == [None, None]
    with pytest.raises(UsageError, match="train.device: cpu"):
        launch.plan_devices(on_cpu, 2, [0])


def test_the_worst_exit_status_is_a_failure_then_a_usage_error_then_an_interrupt():
    assert launch.worst_status([0, 130, 1, 2]) == 1
    assert launch.worst_status([0, 2, 130]) == 2
    assert launch.worst_status([0, 130, 0]) == 130
    assert launch.worst_status([0, 0]) == 0
    assert launch.exit_status(-signal.SIGKILL, interrupted=True) == 130
    assert launch.exit_status(-signal.SIGKILL, interrupted=False) == 1  # e.g. the OOM killer
    assert launch.exit_status(3, interrupted=False) == 1


def test_the_view_shows_each_line_once_as_printed_and_counts_from_events():
    out = io.StringIO()
    view = LaunchView(["w0", "w1"], target=4, steps=8, console=Console(file=out, width=40))
    for name, line in [
        ("w0", "trial 0 started: a=0.5 T=2 k=[4, 8] lr=1e-3\n"),
        ("w1", "Generating train split: 0 examples\rGenerating train split: 64 examples\n"),
        ("w0", "trial 0 complete 1.2345; best: trial 0 (1.2345)\n"),
        (
            "w1",
            "kdsweep: error: RuntimeError: a long message that is not wrapped at forty columns\n",
        ),
    ]:
        view.line(name, line)
    for event in [
        {"event": "trial_started", "trial": 0, "title": "trial 0", "label": "a=0.5", "steps": 8},
        {"event": "step", "trial": 0, "step": 2, "info": "loss 1.0  10 tok/s"},
        {"event": "trial_finished", "trial": 0, "state": "complete", "best": "trial 0 (1.2345)"},
    ]:
        view.event("w0", event)
    view.ended("w0", 0)
    assert out.getvalue().splitlines() == [
        "[w0] trial 0 started: a=0.5 T=2 k=[4, 8] lr=1e-3",
        "[w1] Generating train split: 64 examples",
        "[w0] trial 0 complete 1.2345; best: trial 0 (1.2345)",
        "[w1] kdsweep: error: RuntimeError: a long message that is not wrapped at forty columns",
        "w0 ended (exit 0) after 1 trial",  # counted from the events, not from the printed lines
    ]


def test_a_launched_workers_progress_sends_events_and_prints_no_steps():
    """The protocol between a worker and its launcher: JSON lines on a pipe (kdsweep.progress)."""
    import os
    from types import SimpleNamespace

    read_end, write_end = os.pipe()
    printed = io.StringIO()
    progress = SweepProgress(Console(file=printed), events=EventWriter(write_end))
    progress.study_started("tiny", done=1, target=3)
    started = SimpleNamespace(number=1, user_attrs={})
    progress.trial_started(started, "a=0.50 lr=1.0e-03", steps=8)
    progress.step(SimpleNamespace(step=2, loss=1.5, tokens_per_second=100.0))
    finished = SimpleNamespace(
        number=1, values=[1.25], state=SimpleNamespace(name="COMPLETE"), user_attrs={}
    )
    progress.trial_finished(finished, finished)
    rerun = SimpleNamespace(number=4, user_attrs={"seed_check_of": 1, "seed": 2})
    progress.trial_started(rerun, "a=0.50 lr=1.0e-03", steps=8)
    progress.events._file.close()
    with os.fdopen(read_end) as pipe:
        sent = [parse_event(line) for line in pipe]
    assert [e["event"] for e in sent] == [
        "study",
        "trial_started",
        "step",
        "trial_finished",
        "trial_started",
    ]
    assert sent[1]["title"] == "trial 1" and sent[4]["title"] == "seed check of trial 1, seed 2"
    assert sent[0] == {"event": "study", "done": 1, "target": 3}
    assert sent[2] == {"event": "step", "trial": 1, "step": 2, "info": "loss 1.5000  100 tok/s"}
    assert sent[3]["best"] == "trial 1 (1.2500)"
    assert "step 2" not in printed.getvalue() and "trial 1 complete 1.2500" in printed.getvalue()
    assert "seed check of trial 1, seed 2 started" in printed.getvalue()


def test_a_long_phase_is_a_bar_with_its_rows_and_an_event_for_the_launcher():
    """Off a terminal a phase prints its size and its end; a launcher hears its progress (its
    view moves the worker's bar by these events)."""
    import os

    read_end, write_end = os.pipe()
    printed = io.StringIO()
    progress = SweepProgress(Console(file=printed), events=EventWriter(write_end))
    with progress.phase("teacher cache of 'train'", 40) as phase:
        for _ in range(4):
            phase.advance(10)
    progress.events._file.close()
    with os.fdopen(read_end) as pipe:
        sent = [parse_event(line) for line in pipe]
    assert [(e["done"], e["total"]) for e in sent] == [
        (0, 40),
        (10, 40),
        (20, 40),
        (30, 40),
        (40, 40),
    ]
    assert {e["event"] for e in sent} == {"phase"} and sent[0]["unit"] == "rows"
    lines = printed.getvalue().splitlines()
    assert lines[0] == "teacher cache of 'train': 40 rows"
    assert lines[-1].startswith("teacher cache of 'train': 40 rows in ")
