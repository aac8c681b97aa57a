"""A study as `kdsweep run` leaves it, built with Optuna's ask/tell and real MLflow runs (no
model is trained), for the tests that read studies: the report's, the cost's. And the readers of
the Markdown it renders to."""

from __future__ import annotations

from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from kdsweep.names import StudyAttr, Tag, TrialAttr
from kdsweep.study.reader import load_study
from kdsweep.study.space import suggest

TEACHER_PPL = 2.0
UNTRAINED_PPL = 50.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# (params, state, final student ppl or None, eval curve by step, extra trial attrs)
FULL = [
    (
        {"alpha": 0.0, "temperature": 2.0, "top_k": 8, "learning_rate": 3e-3},
        "COMPLETE",
        6.0,
        [20, 10, 7, 6.0],
        {"baseline": True},
    ),
    (
        {"alpha": 0.5, "temperature": 2.0, "top_k": 32, "learning_rate": 3e-3},
        "COMPLETE",
        4.0,
        [18, 8, 5, 4.0],
        {},
    ),
    (
        {"alpha": 0.8, "temperature": 4.0, "top_k": "all", "learning_rate": 1e-3},
        "COMPLETE",
        5.0,
        [19, 9, 6, 5.0],
        {},
    ),
    (
        {"alpha": 0.3, "temperature": 1.5, "top_k": 8, "learning_rate": 1e-2},
        "PRUNED",
        None,
        [30, 25],
        {"pruned_step": 20},
    ),
    (
        {"alpha": 0.6, "temperature": 3.0, "top_k": 32, "learning_rate": 5e-3},
        "FAIL",
        None,
        [],
        {TrialAttr.FAIL_REASON: "RuntimeError: CUDA out of memory"},
    ),
    (
        {"alpha": 0.7, "temperature": 2.5, "top_k": 32, "learning_rate": 4e-3},
        "COMPLETE",
        4.0,
        [17, 9, 5, 4.0],
        {},
    ),
    (
        {"alpha": 0.4, "temperature": 6.0, "top_k": "all", "learning_rate": 2e-4},
        "COMPLETE",
        8.0,
        [25, 14, 10, 8.0],
        {},
    ),
    (
        {"alpha": 0.9, "temperature": 7.0, "top_k": 8, "learning_rate": 9e-3},
        "FAIL",
        None,
        [22],
        {TrialAttr.FAIL_REASON: "TrainingDiverged: the training loss is NaN at step 12"},
    ),
]
EMPTY = [FULL[3], FULL[4]]
SINGLE = [FULL[1]]

STUDY_YAML = """
name: {name}
storage: sqlite:///{root}/optuna.db
tracking: {{uri: "sqlite:///{root}/mlflow.db"}}
n_trials: 8
report_top_n: 3
teacher: {{name: teacher-model}}
student: {{name: student-model}}
data: {{dataset: some/dataset, max_length: 64}}
train: {{max_steps: 40, eval_every: 10, batch_size: 4}}
search:
  alpha: {{low: 0.1, high: 0.9}}
  temperature: {{low: 1.0, high: 8.0, log: true}}
  top_k: [8, 32, all]
  learning_rate: {{low: 1.0e-4, high: 1.0e-2, log: true}}
baselines:
  - {{alpha: 0.0}}
"""


def build_study(root: Path, name: str, specs: list) -> Path:
    """A study file plus its Optuna study and MLflow runs, shaped as `kdsweep run` leaves them."""
    path = root / f"{name}.yaml"
    path.write_text(STUDY_YAML.format(name=name, root=root))
    study = load_study(path)
    optuna_study = optuna.create_study(
        study_name=name, storage=study.storage_url, direction="minimize"
    )
    client = MlflowClient(tracking_uri=study.tracking.uri)
    experiment_id = client.create_experiment(
        name, artifact_location=str(root / "artifacts" / name)
    )
    parent = client.create_run(experiment_id, run_name=name).info.run_id
    attrs = {
        StudyAttr.PARENT_RUN_ID: parent,
        StudyAttr.EXPERIMENT_ID: experiment_id,
        "teacher_ppl": TEACHER_PPL,
        "student_ppl_untrained": UNTRAINED_PPL,
        "train_rows": 400,
        "eval_rows": 100,
        "train_scored_tokens": 12000,
        "eval_scored_tokens": 3000,
        "train_padding_share": 0.1,
        "vocab_size": 1000,
        "vocab_padded": True,
        f"{StudyAttr.CONFIG_PREFIX}{study.fingerprint()}": study.to_dict(),
        "topk_mass": {"8": 0.8, "32": 0.97},
    }
    for key, value in attrs.items():
        optuna_study.set_user_attr(key, value)
    for params, state, ppl, curve, extra in specs:
        baseline = (
            {"baseline": True, "baseline_params": {"alpha": 0.0}} if extra.get("baseline") else {}
        )
        optuna_study.enqueue_trial(params, user_attrs=baseline)
        trial = optuna_study.ask()
        suggested = suggest(trial, study.search)
        # the study fixes those at 0 (forward KL, off-policy, full fine-tuning)
        assert suggested == params | {"beta": 0.0, "lmbda": 0.0, "lora_rank": 0}
        run = client.create_run(
            experiment_id,
            run_name=f"trial {trial.number}",
            tags={Tag.PARENT: parent, Tag.TRIAL: str(trial.number), Tag.STATE: state},
        )
        trial.set_user_attr(TrialAttr.PARAMS, suggested)
        trial.set_user_attr(TrialAttr.CONFIG, study.fingerprint())
        trial.set_user_attr(TrialAttr.MLFLOW_RUN_ID, run.info.run_id)
        for key, value in extra.items():
            trial.set_user_attr(key, value)
        for i, value in enumerate(curve):
            step = 10 * (i + 1)
            client.log_metric(
                run.info.run_id, "student_ppl", value, step=step, timestamp=1000 + step
            )
            if state != "COMPLETE":
                trial.report(value, step)
        _finish(optuna_study, client, trial, run.info.run_id, state, ppl, extra)
    client.set_terminated(parent, status="FINISHED")
    return path


def _finish(optuna_study, client, trial, run_id, state, ppl, extra):
    if state == "COMPLETE":
        for key, value in {
            "student_ppl": ppl,
            "teacher_ppl": TEACHER_PPL,
            "ppl_ratio": ppl / TEACHER_PPL,
            "duration_s": 30.0,
        }.items():
            trial.set_user_attr(key, value)
        optuna_study.tell(trial, ppl)
        client.set_terminated(run_id, status="FINISHED")
    elif state == "PRUNED":
        client.set_tag(
            run_id, Tag.REASON, f"pruned at step {extra['pruned_step']}: student_ppl 25"
        )
        optuna_study.tell(trial, state=TrialState.PRUNED)
        client.set_terminated(run_id, status="KILLED")
    else:
        client.set_tag(run_id, Tag.REASON, extra[TrialAttr.FAIL_REASON])
        optuna_study.tell(trial, state=TrialState.FAIL)
        client.set_terminated(run_id, status="FAILED")


def section(text: str, heading: str) -> str:
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def table_rows(text: str) -> list[dict[str, str]]:
    """The first Markdown table in ``text``, as dicts keyed by column."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [
        dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]
    ]
