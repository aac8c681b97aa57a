"""The finalists: the configurations the verdict is measured on, scored once on the test split.

A study with ``data.test_split`` keeps what the sweep selects on (pruning, the sampler, each
trial's best checkpoint, the best trial: all on the validation split, ``data.eval_split``) apart
from what it reports. Its finalists are the configurations the seed check trains again (the
``seed_check.top`` best distilled trials, at least the best one) and the best baseline. Their
scores on the test split, and the teacher's, are what the verdict, the seed check's table and
the headline state; a number chosen as the best of N on a split would be optimistic on it.

While the sweep runs, a complete trial among its kind's contenders (by validation) keeps its
best checkpoint on disk, one file per trial in ``checkpoints.checkpoint_dir``. Once the sweep is
over, one worker scores the finalists from their checkpoints, and the teacher, then deletes the
other checkpoints. The seed check's runs are scored as they end. Scores are kept as the study's
user attrs (``test:<trial>``: a finished trial's attrs cannot change), on the trials' MLflow runs
and, for the teacher, on the parent run.
"""

from __future__ import annotations

import time

import optuna
import torch
from optuna.trial import FrozenTrial

from kdsweep.distill import checkpoints, models
from kdsweep.distill.evaluate import score_test
from kdsweep.distill.lora import load_trained_state, trained_state
from kdsweep.mlflow.study_runs import StudyRuns
from kdsweep.names import Metric, StudyAttr, TrialAttr
from kdsweep.prepare.trial_runner import TrialRunner
from kdsweep.progress import SweepProgress
from kdsweep.store import cost
from kdsweep.store.recovery import worker_id
from kdsweep.store.storage import set_user_attr_once
from kdsweep.store.trials import Trials, params_of
from kdsweep.study.config import StudyConfig
from kdsweep.study.measures import TEST_METRICS


def keep_if_contender(
    study: StudyConfig, optuna_study: optuna.Study, trial: optuna.Trial, value: float, student
) -> bool:
    """Keep a just-completed sweep trial's checkpoint if it is among its kind's contenders so far
    (``Trials.contends``); returns whether it did. (Others may finish meanwhile: the finals delete
    what is left over.)"""
    if not Trials.of(optuna_study).contends(trial, value, study.seed_check.top):
        return False
    checkpoints.write(trained_state(student), checkpoints.best_path(study, trial.number))
    return True


def finals_done(study: StudyConfig, optuna_study: optuna.Study) -> bool:
    """Whether every finalist and the teacher have test scores (or the study has no test split)."""
    if study.data.test_split is None:
        return True
    attrs = optuna_study.user_attrs
    chosen = Trials.of(optuna_study).finalists(study.seed_check.top)
    scored = all(f"{StudyAttr.TEST_PREFIX}{t.number}" in attrs for t in chosen)
    return scored and StudyAttr.TEST_TEACHER_PPL in attrs


def run_finals(
    study: StudyConfig,
    optuna_study: optuna.Study,
    trials: Trials,
    runner: TrialRunner,
    runs: StudyRuns,
    progress: SweepProgress,
) -> None:
    """Once the sweep's ``trials`` have ended: score the finalists not scored yet, and the
    teacher, on the test split (one worker does it), then delete the other checkpoints."""
    if runner.test_set is None:
        return
    chosen = trials.finalists(study.seed_check.top)
    attrs = optuna_study.user_attrs
    missing = [t for t in chosen if f"{StudyAttr.TEST_PREFIX}{t.number}" not in attrs]
    teacher_missing = StudyAttr.TEST_TEACHER_PPL not in attrs
    if not missing and not teacher_missing:
        return
    claim = f"{StudyAttr.FINALS_PREFIX}{','.join(str(t.number) for t in chosen)}"
    if set_user_attr_once(optuna_study, claim, worker_id()) != worker_id():
        return  # another worker scores them
    progress.message(
        f"test split {study.data.test_split!r}: scoring the finalists (trials "
        f"{', '.join(str(t.number) for t in chosen)}) and the teacher, once"
    )
    started = time.perf_counter()
    work = (len(missing) + teacher_missing) * runner.test_set.work
    with progress.phase(f"test split {study.data.test_split!r}", work) as phase:
        for trial in missing:
            _score_finalist(study, optuna_study, trial, runner, runs, progress, phase)
        if teacher_missing:
            _score_teacher(optuna_study, runner, runs, phase)
    cost.record(optuna_study, cost.FINALS, time.perf_counter() - started)
    keep = {t.number for t in chosen}
    for number, path in checkpoints.best_paths(study).items():
        if number not in keep:
            path.unlink(missing_ok=True)


def record_test_scores(optuna_study: optuna.Study, number: int, metrics: dict) -> None:
    """A trial's test scores, as the study's user attr ``test:<trial>``."""
    scores = {k: v for k, v in metrics.items() if k in TEST_METRICS}
    if scores:
        optuna_study.set_user_attr(f"{StudyAttr.TEST_PREFIX}{number}", scores)


def _score_finalist(study, optuna_study, trial: FrozenTrial, runner, runs, progress, phase):
    path = checkpoints.best_path(study, trial.number)
    if not path.exists():
        progress.message(
            f"warning: trial {trial.number} is a finalist but its checkpoint {path} is gone; "
            "it is not scored on the test split"
        )
        return
    params = params_of(trial)
    student = runner.new_student(params, seed=runner.study.train.seed)
    load_trained_state(student, torch.load(path, map_location=runner.device, weights_only=True))
    scores = score_test(student, runner.test_set, runner.inputs.vocab, on_rows=phase.advance)
    record_test_scores(optuna_study, trial.number, scores)
    run_id = trial.user_attrs.get(TrialAttr.MLFLOW_RUN_ID)
    if run_id:
        runs.log_to_run(run_id, scores, step=trial.user_attrs.get(TrialAttr.BEST_STEP, 0))
    del student
    models.release_memory(runner.device)


def _score_teacher(optuna_study: optuna.Study, runner: TrialRunner, runs: StudyRuns, phase):
    teacher = runner.teacher.online("score it on the test split").model
    scores = score_test(teacher, runner.test_set, runner.inputs.vocab, on_rows=phase.advance)
    runner.teacher.release()
    named = {
        StudyAttr.TEST_TEACHER_PPL: scores[Metric.TEST_STUDENT_PPL],
        StudyAttr.TEST_ROWS: runner.test_set.rows,
    }
    if Metric.TEST_EXACT_MATCH in scores:
        named[StudyAttr.TEST_TEACHER_EXACT_MATCH] = scores[Metric.TEST_EXACT_MATCH]
        named[StudyAttr.TEST_TEACHER_ROUGE_L] = scores[Metric.TEST_ROUGE_L]
        named[StudyAttr.TEST_ACCURACY_ROWS] = len(runner.test_set.answers.prompts)
    for key, value in named.items():
        optuna_study.set_user_attr(key, value)
    runs.log_to_run(runs.parent_run_id, {k: float(v) for k, v in named.items()}, step=0)
