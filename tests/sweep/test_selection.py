"""A fair verdict: each trial at its best checkpoint, selected on the validation split, and the
finalists scored once on a test split nobody selected on."""

from __future__ import annotations

import pytest
import torch

from kdsweep.cli import main
from kdsweep.distill import train
from kdsweep.distill.checkpoints import checkpoint_dir
from kdsweep.distill.loss import DistillSettings
from kdsweep.names import Metric, StudyAttr, TrialAttr
from kdsweep.prepare import demo, trial_runner
from kdsweep.report import write_report
from kdsweep.store.storage import load_existing_study
from kdsweep.study.config import TrainConfig
from kdsweep.study.reader import load_study
from kdsweep.sweep import finalists

from conftest import ROOT, run_replaced

SPLITS = ["data.eval_split=test[:8]", "data.test_split=test[8:]"]


def _run(tiny_setup, evaluations: list[float], *, select: str, on_eval=None):
    """A plain fine-tuning run of ``len(evaluations)`` steps, evaluated at each: its student_ppl
    there is the next of ``evaluations``. Returns the result and the student."""
    from transformers import AutoModelForCausalLM

    tokenizer, teacher, vocab, split = tiny_setup
    student = AutoModelForCausalLM.from_pretrained(teacher.name_or_path)
    values = iter(evaluations)

    def evaluate(model, step):
        if on_eval is not None:
            on_eval(model, step)
        return {Metric.STUDENT_PPL: next(values)}

    steps = len(evaluations)
    settings = DistillSettings(
        alpha=0.0,
        temperature=1.0,
        top_k=None,
        learning_rate=1e-2,
        train=TrainConfig(
            max_steps=steps, batch_size=8, eval_every=1, log_every=1, device="cpu", select=select
        ),
    )
    data = train.TrainingData(split, vocab, tokenizer.pad_token_id, evaluate)
    return train.distill(student, settings, data, None), student


def test_a_trial_whose_evaluations_rise_after_the_first_ends_at_its_first(tiny_setup):
    """Perplexities 3, 4, 5, 6 at steps 1-4: the result is step 1's, and so are the weights."""
    weights = {}

    def keep(model, step):
        weights[step] = {k: v.clone() for k, v in model.state_dict().items()}

    result, student = _run(tiny_setup, [3.0, 4.0, 5.0, 6.0], select="best", on_eval=keep)
    assert result.best_step == 1 and result.final_eval == {Metric.STUDENT_PPL: 3.0}
    for name, tensor in student.state_dict().items():
        assert torch.equal(tensor, weights[1][name]), name  # the step-1 checkpoint, restored
    assert not torch.equal(weights[1]["lm_head.weight"], weights[4]["lm_head.weight"])


def test_select_last_ends_a_trial_at_its_last_evaluation(tiny_setup):
    result, _ = _run(tiny_setup, [3.0, 4.0], select="last")
    assert result.best_step == 2 and result.final_eval == {Metric.STUDENT_PPL: 4.0}


@pytest.mark.parametrize("select", ["best", "last"])
def test_a_trials_value_is_its_best_or_its_last_evaluation(tiny_study, select):
    main(["run", str(tiny_study), "--no-report", "--set", f"train.select={select}"])
    for trial in load_existing_study(load_study(tiny_study)).trials:
        values = trial.intermediate_values
        pick = min(values, key=values.get) if select == "best" else max(values)
        assert trial.user_attrs[TrialAttr.BEST_STEP] == pick
        assert trial.value == values[pick]


def test_the_test_split_is_scored_for_the_finalists_only(tiny_study, monkeypatch):
    """Five trials, a seed check of the best distilled configuration and the best baseline with
    one other seed: the test split is scored for the two originals (their checkpoints), the two
    seed-check runs (as they end) and the teacher: five times, never for the others."""
    scored = []
    real = trial_runner.score_test

    def counting(model, test_set, vocab, **kwargs):
        scored.append(model)
        return real(model, test_set, vocab, **kwargs)

    monkeypatch.setattr(trial_runner, "score_test", counting)
    monkeypatch.setattr(finalists, "score_test", counting)
    overrides = [
        *SPLITS,
        "baselines=[{alpha: 0.0}]",
        "seed_check.top=1",
        "seed_check.seeds=1",
        "eval.accuracy=true",
        "eval.max_new_tokens=2",
    ]
    run_replaced(
        tiny_study,
        lambda runner, params, **kw: runner(params, **kw),
        n_trials=5,
        overrides=overrides,
    )
    study = load_study(tiny_study, overrides)
    optuna_study = load_existing_study(study)
    attrs = optuna_study.user_attrs
    tested = sorted(
        int(k.removeprefix(StudyAttr.TEST_PREFIX))
        for k in attrs
        if k.startswith(StudyAttr.TEST_PREFIX)
    )
    checks = [t.number for t in optuna_study.trials if TrialAttr.SEED_CHECK_OF in t.user_attrs]
    originals = sorted(
        {optuna_study.trials[n].user_attrs[TrialAttr.SEED_CHECK_OF] for n in checks}
    )
    assert len(scored) == 5 and tested == sorted(originals + checks)
    assert (
        StudyAttr.TEST_TEACHER_PPL in attrs
        and Metric.TEST_EXACT_MATCH in attrs[f"test:{checks[0]}"]
    )
    kept = sorted(p.name for p in checkpoint_dir(study).glob("*.pt"))
    assert kept == sorted(f"trial-{n}.pt" for n in originals)  # the others' were deleted
    text = write_report(study).read_text()
    assert "On the test split `test[8:]`" in text and "never selected on" in text
    assert "optimistic" not in text.split("## Study")[0]


def test_without_a_test_split_the_verdict_says_it_is_optimistic(tiny_study, capsys):
    overrides = ["baselines=[{alpha: 0.0}]"]
    run_replaced(
        tiny_study,
        lambda runner, params, **kw: runner(params, **kw),
        n_trials=3,
        overrides=overrides,
    )
    study = load_study(tiny_study, overrides)
    verdict = write_report(study).read_text().split("## Study")[0]
    assert "On the validation split" in verdict and "These numbers are optimistic" in verdict
    assert main(["check", str(tiny_study)]) == 0
    assert "warning: data.test_split is not set" in capsys.readouterr().err


def test_the_test_split_must_be_rows_of_its_own(tiny_study, capsys):
    assert main(["check", str(tiny_study), "--set", "data.test_split=test"]) == 2
    assert "data.test_split: 'test' is also data.eval_split" in capsys.readouterr().err


def test_the_demo_selects_on_validation_and_reports_on_test():
    study = load_study(ROOT / "studies" / "demo.yaml")
    assert (study.data.eval_split, study.data.test_split, study.train.select) == (
        "validation",
        "test",
        "best",
    )
    assert demo.VALIDATION_ROWS == demo.TEST_ROWS == 500


def test_studies_of_one_name_in_two_folders_keep_their_checkpoints_apart(tmp_path, monkeypatch):
    """The demo run from two folders (each with its own sqlite:///kdsweep.db): one's finals must
    not delete the other's finalists' checkpoints."""
    study = tmp_path / "s.yaml"
    study.write_text(
        "name: s\nteacher: {name: t}\nstudent: {name: s}\ndata: {dataset: d}\n"
        "storage: sqlite:///kdsweep.db\n"
    )
    folders = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        folders.append(checkpoint_dir(load_study(study)))
    assert folders[0] != folders[1]
    monkeypatch.chdir(tmp_path / "a")
    assert checkpoint_dir(load_study(study)) == folders[0]  # and the same from the same folder
