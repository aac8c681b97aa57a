"""Every name kdsweep stores in Optuna or MLflow, in one place.

Other tools read these names (the MLflow UI's filters, a user's ``mlflow.search_runs``, the
report and ``kdsweep status`` reading a study written by another version), so each is written
here once and used everywhere by its constant. README.md, "MLflow layout", shows where they land.

This module imports nothing: the MLflow plugin, which MLflow loads while it is itself being
imported, uses it too.
"""

from __future__ import annotations

MINIMIZE, MAXIMIZE = "minimize", "maximize"


class StudyAttr:
    """User attrs of the Optuna study: what every worker shares, computed once."""

    PARENT_RUN_ID = "mlflow_parent_run_id"  # written once, by compare-and-set (storage.set_user_attr_once)
    EXPERIMENT_ID = "mlflow_experiment_id"
    CONFIG = "config"  # the resolved study the sweep ran with
    FINGERPRINT = "fingerprint"
    BASELINES_ENQUEUED = "baselines_enqueued"
    # References, measured once per study on the eval tokens and the data.
    TEACHER_PPL = "teacher_ppl"
    UNTRAINED_PPL = "student_ppl_untrained"
    TRAIN_ROWS = "train_rows"
    EVAL_ROWS = "eval_rows"
    TRAIN_SCORED_TOKENS = "train_scored_tokens"
    EVAL_SCORED_TOKENS = "eval_scored_tokens"
    TRAIN_PADDING_SHARE = "train_padding_share"
    VOCAB_SIZE = "vocab_size"
    VOCAB_PADDED = "vocab_padded"
    TOPK_MASS = "topk_mass"  # {"k": share of the teacher's mass its top-k keep}


class TrialAttr:
    """User attrs of an Optuna trial."""

    PARAMS = "params"  # every searched parameter, sampled or fixed
    BASELINE = "baseline"
    BASELINE_PARAMS = "baseline_params"
    MLFLOW_RUN_ID = "mlflow_run_id"
    FAIL_REASON = "fail_reason"
    PRUNED_STEP = "pruned_step"
    DURATION_S = "duration_s"
    PEAK_MEMORY_MB = "peak_memory_mb"
    TOPK_MASS = "topk_mass"
    # A complete trial also keeps its final eval metrics (Metric.EVAL) under their own names.


class Tag:
    """MLflow run tags."""

    PARENT = "mlflow.parentRunId"
    GIT_COMMIT = "mlflow.source.git.commit"
    EXPERIMENT_KIND = "mlflow.experimentKind"  # MLflow 3's UI tells training experiments by it
    STUDY = "kdsweep.study"
    TRIAL = "kdsweep.trial"
    TRIAL_RUN_ID = "kdsweep.trial_run_id"  # on runs that user code starts inside a trial
    STATE = "kdsweep.state"  # the Optuna state: COMPLETE, PRUNED, FAIL, INTERRUPTED, KILLED
    REASON = "kdsweep.reason"
    BASELINE = "kdsweep.baseline"
    VERSION = "kdsweep.version"
    FINGERPRINT = "kdsweep.fingerprint"
    MODEL = "kdsweep.model"  # "saved" on the one run holding the best student (save_best)
    # On the parent run: the best trial so far.
    BEST_TRIAL = "best_trial"
    BEST_RUN_ID = "best.run_id"
    BEST_VALUE = "best.value"
    BEST_PARAM_PREFIX = "best."


class Metric:
    """MLflow metrics, and the eval metrics an objective can name."""

    # Every log step of a trial.
    TRAIN_LOSS = "train_loss"
    TRAIN_KL = "train_kl"
    TRAIN_CE = "train_ce"
    LEARNING_RATE = "learning_rate"
    GRAD_NORM = "grad_norm"
    TOKENS_PER_SECOND = "tokens_per_second"
    # Every evaluation of a trial.
    STUDENT_PPL = "student_ppl"
    TEACHER_PPL = "teacher_ppl"
    PPL_RATIO = "ppl_ratio"
    KL_TO_TEACHER = "kl_to_teacher"
    # The end of a complete trial.
    OBJECTIVE = "objective"
    DURATION_S = "duration_s"
    PEAK_MEMORY_MB = "peak_memory_mb"
    TOPK_MASS = "topk_mass"
    # The parent run.
    BEST_VALUE = "best_value"
    UNTRAINED_PPL = "student_ppl_untrained"
    TRAIN_PADDING_SHARE = "train_padding_share"
    TOPK_MASS_PREFIX = "topk_mass_k"


# Each objective a study may name, with the direction that makes it better. The study, the
# best-trial logic, the MLflow best tags, pruning and the report all read it from here.
OBJECTIVES: dict[str, str] = {
    Metric.STUDENT_PPL: MINIMIZE,
    Metric.PPL_RATIO: MINIMIZE,
}


def better(direction: str, value: float, than: float) -> bool:
    """Whether ``value`` beats ``than`` for an objective with ``direction``."""
    return value < than if direction == MINIMIZE else value > than


MODEL_ARTIFACT = "model"  # where save_best logs the student in its run
STUDY_ARTIFACT = "study.yaml"  # the resolved study on the parent run
TRACEBACK_ARTIFACT = "traceback.txt"
REPORT_ARTIFACTS = "report"
