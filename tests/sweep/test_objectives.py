"""Several objectives and constraints: the study file's checks, multi-objective studies end to end
to the report's Pareto front, and constraints that leave trials infeasible."""

from __future__ import annotations

import dataclasses
import re

import optuna
import pytest

from kdsweep import api
from kdsweep.cli import main
from kdsweep.names import Tag, TrialAttr
from kdsweep.store.storage import load_existing_study
from kdsweep.store.trials import Trials
from kdsweep.study.measures import BY_NAME, OUT_OF_MEMORY
from kdsweep.study.reader import load_study

from conftest import mlflow_runs, run_replaced

ACCURACY = {"eval.accuracy": True, "eval.max_new_tokens": 4, "eval.max_rows": 8}


def _front(trials, directions) -> set[int]:
    """The Pareto front, counted by hand: trials no other is as good as in every objective and
    better than in one."""
    signs = [1 if d == "minimize" else -1 for d in directions]

    def dominates(a, b) -> bool:
        pairs = [(s * x, s * y) for s, x, y in zip(signs, a.values, b.values)]
        return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)

    return {t.number for t in trials if not any(dominates(o, t) for o in trials if o is not t)}


@pytest.mark.parametrize(
    "objectives",
    [["student_ppl", "exact_match"], ["student_ppl", "exact_match", "device_seconds"]],
)
def test_a_multi_objective_study_runs_to_its_report_and_pareto_front(tiny_study, objectives):
    # A baseline too: its alpha 0 lies outside the searched range, and the front takes it in.
    overrides = {"n_trials": 4, "objective": objectives, "baselines": [{"alpha": 0.0}], **ACCURACY}
    summary = api.run_study(tiny_study, overrides=overrides)
    study = api.load(tiny_study, overrides)
    stored = load_existing_study(study)
    directions = [BY_NAME[name].direction for name in objectives]
    assert [d.name.lower() for d in stored.directions] == directions
    complete = [t for t in stored.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4 and all(len(t.values) == len(objectives) for t in complete)
    # Each value is the trial's measure: quality at its checkpoint, the cost as recorded.
    for trial in complete:
        assert trial.values[0] == trial.user_attrs["student_ppl"]
        assert trial.values[1] == trial.user_attrs["exact_match"]
        if len(objectives) == 3:
            assert trial.values[2] == trial.user_attrs[TrialAttr.COST]["device_seconds"]
    # The best trial is the first objective's; the summary says each value.
    best = min(complete, key=lambda t: (t.values[0], t.number))
    assert summary.best_trial == best.number and summary.best_values == best.values
    assert summary.directions == directions

    report = summary.report.read_text()
    section = report.split("## Pareto front")[1].split("\n## ")[0]
    rows = re.findall(r"^\| \[?(\d+)", section, flags=re.MULTILINE)
    assert {int(n) for n in rows} == _front(complete, directions)
    assert f"{len(rows)} of the 4 complete trials" in section
    assert all(f"{name} (" in section for name in objectives)
    assert (summary.report.parent / "tiny" / "pareto.png").is_file()
    assert "Objectives**: `student_ppl`" in report
    # The parent run records the objectives, the sampler's settings and Optuna's version.
    _, (parent,), _ = mlflow_runs(tiny_study, overrides=[f"{k}={v}" for k, v in overrides.items()])
    assert parent.data.params["objective"] == ", ".join(objectives)
    assert parent.data.params["sampler.name"] == "random"
    assert parent.data.params["sampler.seed"] == "0"
    assert parent.data.tags[f"{Tag.LIBRARY_VERSION_PREFIX}optuna"] == optuna.__version__


def test_status_and_summary_show_every_objective(tiny_study, capsys):
    objectives = ["student_ppl", "exact_match", "device_seconds"]
    overrides = {"n_trials": 2, "objective": objectives, **ACCURACY}
    api.run_study(tiny_study, overrides=overrides)
    capsys.readouterr()
    assert main(["status", str(tiny_study), *_set_args(overrides)]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "state" in line)
    assert header.split()[-5:] == ["ppl", "em", "dev", "s", "time", "note"][-5:]
    legend = " ".join(out.split())
    assert "ppl = student_ppl" in legend and "em = exact_match" in legend
    assert "dev s = device_seconds" in legend


def test_constraints_leave_trials_infeasible_out_of_the_ranking(tiny_study):
    """A ceiling on peak memory that trials above a learning rate break (their memory is set by
    their learning rate here): they complete, are told to Optuna as infeasible, tagged so in
    MLflow, and the best trial and the report leave them out and say how many."""

    def memory_by_learning_rate(runner, params, **kwargs):
        result = runner(params, **kwargs)
        return dataclasses.replace(
            result, peak_memory_bytes=int(params["learning_rate"] * 1e12)
        )  # 1e-3 -> 1 GB, 1e-2 -> 10 GB

    sets = ["constraints={peak_memory_gb: 4}", "n_trials=6"]
    run_replaced(tiny_study, memory_by_learning_rate, overrides=sets)
    study = load_study(tiny_study, sets)
    stored = load_existing_study(study)
    trials = stored.trials
    over = {t.number for t in trials if t.params["learning_rate"] * 1e3 > 4}
    assert over and len(over) < len(trials)  # the sampler's seed gives both kinds
    for t in trials:
        excess = t.params["learning_rate"] * 1e3 - 4
        assert t.constraints == {"peak_memory_gb": pytest.approx(excess)}
    best = min((t for t in trials if t.number not in over), key=lambda t: t.value)
    assert Trials.of(stored).best.number == best.number
    _, _, runs = mlflow_runs(tiny_study, overrides=sets)
    assert {n for n, r in runs.items() if r.data.tags[Tag.FEASIBLE] == "False"} == over

    report = api.write_report(tiny_study, overrides={"constraints": {"peak_memory_gb": 4}})
    report = report.read_text()
    assert f"{len(over)} infeasible" in report
    top = report.split("## Top configurations")[1].split("\n## ")[0]
    ranked = re.findall(r"^\| \d+ \| (\d+)", top, flags=re.MULTILINE)
    assert ranked and not {int(n) for n in ranked} & over
    wrong = report.split("### Infeasible trials")[1]
    assert {int(n) for n in re.findall(r"^\| (\d+) \|", wrong, flags=re.MULTILINE)} == over
    assert "peak_memory_gb" in wrong and "> 4" in wrong


def test_an_out_of_memory_trial_is_infeasible_and_stays_failed(tiny_study):
    import torch

    def no_memory(runner, params, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    run_replaced(tiny_study, no_memory, n_trials=1)
    (trial,) = load_existing_study(load_study(tiny_study)).trials
    assert trial.state.name == "FAIL" and trial.user_attrs[TrialAttr.FAIL_REASON] == OUT_OF_MEMORY
    assert trial.constraints == {OUT_OF_MEMORY: 1.0}


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("objective=[student_ppl, tokens]", "objective: unknown measure 'tokens'"),
        ("objective=[]", "objective: must name at least one measure"),
        ("objective=[device_seconds, student_ppl]", "must be a quality measure"),
        ("objective=[student_ppl, student_ppl]", "lists a measure twice"),
        ("objective=[student_ppl, rouge_l]", "rouge_l needs the answers decoded"),
        ("constraints={gpu_hours: 3}", "constraints.gpu_hours: not a measure a ceiling applies"),
        (
            "constraints={device_seconds: -5}",
            "constraints.device_seconds: the ceiling must be >= 0",
        ),
        ("constraints={exact_match: 0.3}", "constraints.exact_match: not a measure a ceiling"),
        ("constraints={peak_memory_gb: lots}", "the ceiling must be a number"),
    ],
)
def test_bad_objectives_and_constraints_exit_2_naming_the_key(
    tiny_study, capsys, setting, message
):
    assert main(["run", str(tiny_study), "--set", setting]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tiny_study.parent / "optuna.db").exists()


def test_a_multi_objective_study_cannot_be_pruned(tiny_study, capsys):
    args = ["--set", "objective=[student_ppl, device_seconds]", "--set", "pruner.name=median"]
    assert main(["check", str(tiny_study), *args]) == 2
    assert "pruner.name: Optuna prunes on one value" in capsys.readouterr().err


def test_gp_and_tpe_read_the_constraints_optuna_stores():
    """What kdsweep stores through ``Trial.set_constraint`` is what Optuna's samplers and
    ``best_trials`` read as feasibility."""
    study = optuna.create_study(directions=["minimize", "minimize"])
    for x, over in [(1.0, 0.5), (2.0, -1.0), (3.0, 0.0)]:
        trial = study.ask()
        trial.set_constraint("peak_memory_gb", over)
        study.tell(trial, [x, -x])
    assert sorted(t.number for t in study.best_trials) == [1, 2]


def _set_args(overrides: dict) -> list[str]:
    """``--set`` arguments for ``overrides`` (values as YAML reads them)."""
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
