"""Every name kdsweep stores in Optuna or MLflow, each string written once.

Other tools read these names (the MLflow UI's filters, a user's ``mlflow.search_runs``, the
report and ``kdsweep status`` reading a study written by another version), so each string is
written here once and used everywhere by its constant. Where the same value is kept in two
places (the teacher's perplexity as a study attr and as a metric), the second name refers to the
first. docs/mlflow.md shows where they land.

This module imports nothing: the MLflow plugin, which MLflow loads while it is itself being
imported, uses it too.
"""

from __future__ import annotations


class Group:
    """Which history a trial is sampled from (``TrialAttr.GROUP``; see ``sweep.samplers``)."""

    SEARCH = "search"  # the sweep's own trials
    SEED_CHECK = "seed_check"  # configurations trained again with other seeds
    CONTROL = "control"  # the best distilled configuration trained again at alpha 0
    BASELINE_PREFIX = "baseline:"  # each baseline entry's trials: "baseline:0", ...

    @staticmethod
    def baseline(index: int) -> str:
        return f"{Group.BASELINE_PREFIX}{index}"


class Metric:
    """MLflow metrics, and the eval metrics an objective can name."""

    # Every log step of a trial.
    TRAIN_LOSS = "train_loss"
    TRAIN_KL = "train_kl"
    TRAIN_CE = "train_ce"
    LEARNING_RATE = "learning_rate"
    GRAD_NORM = "grad_norm"
    TOKENS_PER_SECOND = "tokens_per_second"
    GENERATED_TOKENS = "generated_tokens"  # on-policy: student tokens trained on, cumulative
    # ... and their generation's share of the time since the previous log
    GENERATION_SHARE = "generation_share"
    # Every evaluation of a trial.
    STUDENT_PPL = "student_ppl"
    TEACHER_PPL = "teacher_ppl"
    PPL_RATIO = "ppl_ratio"
    KL_TO_TEACHER = "kl_to_teacher"
    EXACT_MATCH = "exact_match"  # fractions in [0, 1]
    ROUGE_L = "rouge_l"
    # The decoded answers' think blocks: their mean length in tokens, and the share of answers
    # truncated (cut at eval.max_new_tokens before their end-of-turn, or a think block never
    # closed).
    REASONING_TOKENS = "reasoning_tokens"
    TRUNCATED_SHARE = "truncated_share"
    # A complete trial: the step of the checkpoint its value comes from (train.select).
    BEST_STEP = "best_step"
    # A resumed trial: the step of the resume checkpoint it went on from (logged at that step).
    RESUMED_STEP = "resumed_step"
    # A finalist (the best distilled and baseline configurations, the seed check's runs) on the
    # test split, once; the parent run holds the teacher's.
    TEST_STUDENT_PPL = "test_student_ppl"
    TEST_EXACT_MATCH = "test_exact_match"
    TEST_ROUGE_L = "test_rouge_l"
    TEST_TEACHER_PPL = "test_teacher_ppl"
    TEST_TEACHER_EXACT_MATCH = "test_teacher_exact_match"
    TEST_TEACHER_ROUGE_L = "test_teacher_rouge_l"
    # The end of a complete trial.
    OBJECTIVE = "objective"
    DURATION_S = "duration_s"
    # The training's peak memory: CUDA's allocator's, or the process's resident set.
    PEAK_MEMORY_GB = "peak_memory_gb"
    TOPK_MASS = "topk_mass"
    # What a trial cost, in every state (``cost``): its wall seconds times the devices it held,
    # and the parts of that time. Each second counts once: generation inside an evaluation
    # (accuracy decoding) or an on-policy step is generation's.
    DEVICE_SECONDS = "device_seconds"  # on the parent run: the study's total
    TRAIN_SECONDS = "train_seconds"
    EVAL_SECONDS = "eval_seconds"
    GENERATION_SECONDS = "generation_seconds"  # on-policy completions and accuracy decoding
    CHECKPOINT_SECONDS = "checkpoint_seconds"  # resume and best checkpoints
    CACHED_STEP_SECONDS = "cached_step_seconds"  # a training step's mean, on the teacher cache
    ON_POLICY_STEP_SECONDS = "on_policy_step_seconds"  # ... and on-policy, generation included
    # The student's form (search.lora_rank): the parameters the optimizer trains.
    TRAINABLE_PARAMETERS = "trainable_parameters"
    # The parent run.
    TEACHER_CACHE_SECONDS = "teacher_cache_seconds"  # building the teacher's top-K caches
    BEST_VALUE = "best_value"
    UNTRAINED_PPL = "student_ppl_untrained"
    TEACHER_EXACT_MATCH = "teacher_exact_match"
    TEACHER_ROUGE_L = "teacher_rouge_l"
    UNTRAINED_EXACT_MATCH = "student_exact_match_untrained"
    UNTRAINED_ROUGE_L = "student_rouge_l_untrained"
    TEACHER_REASONING_TOKENS = "teacher_reasoning_tokens"
    TEACHER_TRUNCATED_SHARE = "teacher_truncated_share"
    TRAIN_PADDING_SHARE = "train_padding_share"
    TOPK_MASS_PREFIX = "topk_mass_k"
    # The train split's answers (scored assistant turns) and what became of their reasoning
    # (data.AnswerCounts).
    TRAIN_ANSWERS = "train_answers"
    TRAIN_REASONED = "train_reasoned"  # answers whose row gives them reasoning
    TRAIN_REASONING_TRAINED = "train_reasoning_trained"
    TRAIN_REASONING_LEFT_OUT = "train_reasoning_left_out"  # by the chat template
    TRAIN_REASONING_STRIPPED = "train_reasoning_stripped"  # by data.reasoning: strip
    TRAIN_UNLIKE_GENERATION = "train_unlike_generation"  # scored unlike they are generated


class StudyAttr:
    """User attrs of the Optuna study: what every worker shares, computed once."""

    # written once, by compare-and-set (store.storage.set_user_attr_once)
    PARENT_RUN_ID = "mlflow_parent_run_id"
    EXPERIMENT_ID = "mlflow_experiment_id"
    # config:<fingerprint>: each resolved study a run of it ran with (its trials say which)
    CONFIG_PREFIX = "config:"
    TARGET = "target"  # the finished trials the latest run asked for (n_trials or --n-trials)
    BASELINES_ENQUEUED = "baselines_enqueued"
    # References, measured once per study on the eval tokens and the data.
    TEACHER_PPL = Metric.TEACHER_PPL  # on the parent run too, under the same names
    UNTRAINED_PPL = Metric.UNTRAINED_PPL
    TRAIN_ROWS = "train_rows"
    EVAL_ROWS = "eval_rows"
    TRAIN_SCORED_TOKENS = "train_scored_tokens"
    EVAL_SCORED_TOKENS = "eval_scored_tokens"
    TRAIN_PADDING_SHARE = Metric.TRAIN_PADDING_SHARE
    TRAIN_ANSWERS = Metric.TRAIN_ANSWERS
    TRAIN_REASONED = Metric.TRAIN_REASONED
    TRAIN_REASONING_TRAINED = Metric.TRAIN_REASONING_TRAINED
    TRAIN_REASONING_LEFT_OUT = Metric.TRAIN_REASONING_LEFT_OUT
    TRAIN_REASONING_STRIPPED = Metric.TRAIN_REASONING_STRIPPED
    TRAIN_UNLIKE_GENERATION = Metric.TRAIN_UNLIKE_GENERATION
    # recovered:<trial>: the worker that failed a dead worker's trial
    RECOVERED_PREFIX = "recovered:"
    TEACHER_EXACT_MATCH = Metric.TEACHER_EXACT_MATCH
    TEACHER_ROUGE_L = Metric.TEACHER_ROUGE_L
    UNTRAINED_EXACT_MATCH = Metric.UNTRAINED_EXACT_MATCH
    UNTRAINED_ROUGE_L = Metric.UNTRAINED_ROUGE_L
    TEACHER_REASONING_TOKENS = Metric.TEACHER_REASONING_TOKENS
    TEACHER_TRUNCATED_SHARE = Metric.TEACHER_TRUNCATED_SHARE
    ACCURACY_ROWS = "accuracy_rows"  # eval rows whose answers are decoded
    TEST_ROWS = "test_rows"  # the test split, scored for the finalists
    TEST_SCORED_TOKENS = "test_scored_tokens"
    TEST_ACCURACY_ROWS = "test_accuracy_rows"
    # The teacher on the test split (on the parent run too), and each finalist's scores there
    # ("test:<trial>": {test_student_ppl, test_exact_match, test_rouge_l}): a finished Optuna
    # trial's attrs cannot change, a study's can.
    TEST_TEACHER_PPL = Metric.TEST_TEACHER_PPL
    TEST_TEACHER_EXACT_MATCH = Metric.TEST_TEACHER_EXACT_MATCH
    TEST_TEACHER_ROUGE_L = Metric.TEST_TEACHER_ROUGE_L
    TEST_PREFIX = "test:"
    FINALS_PREFIX = "finals:"  # finals:<trials>: the worker that scores these finalists
    SEED_CHECK_JOBS = "seed_check_jobs"  # the seed check's (trial, seed) runs, decided once
    CONTROL_PREFIX = "control:"  # control:<trial>: the worker that runs that trial's control
    VOCAB_SIZE = "vocab_size"
    VOCAB_PADDED = "vocab_padded"
    TOPK_MASS = Metric.TOPK_MASS  # {"k": share of the teacher's mass its top-k keep}
    # What the study cost outside its trials, in device-seconds (``cost``):
    # cost:<part>:<id> for each worker's preparation (models, data, references) and finals,
    # and the teacher cache's build, once.
    COST_PREFIX = "cost:"
    TEACHER_CACHE_SECONDS = Metric.TEACHER_CACHE_SECONDS
    TEACHER_CACHE_REUSED = "teacher_cache_reused"  # the studies whose caches it reads, if others


class TrialAttr:
    """User attrs of an Optuna trial."""

    PARAMS = "params"  # every searched parameter, sampled or fixed
    BASELINE = "baseline"
    # the parameters the trial fixes over the study's search: a baseline's, the control's alpha 0
    BASELINE_PARAMS = "baseline_params"
    MLFLOW_RUN_ID = "mlflow_run_id"
    FAIL_REASON = "fail_reason"
    PRUNED_STEP = "pruned_step"
    DURATION_S = Metric.DURATION_S  # as on the trial's run
    PEAK_MEMORY_GB = Metric.PEAK_MEMORY_GB
    TRAINABLE_PARAMETERS = Metric.TRAINABLE_PARAMETERS  # what its student's form trains
    TOPK_MASS = Metric.TOPK_MASS
    # which sampler history a trial belongs to: "search", "baseline:<i>" or "seed_check"
    GROUP = "group"
    SEED = "seed"  # the training seed, when not the study's (seed-check trials)
    WORKER = "worker"  # {host, pid, started}: the process running the trial
    DEVICE = "device"  # where it trained: cpu, cuda:0 (in its worker's CUDA_VISIBLE_DEVICES)
    MICRO_BATCH = "micro_batch"  # an out-of-memory retry's smaller batch ...
    GRAD_ACCUM = "grad_accum_steps"  # ... and larger accumulation (the same effective batch)
    OOM_RETRY_OF = "oom_retry_of"  # the trial that ran out of memory
    RETRY_OF = "retry_of"  # the trial whose worker died (or was preempted) while it ran
    PREEMPTED_STEP = "preempted_step"  # a preempted trial: the step of its resume checkpoint
    # a retry of a preempted trial: retried once more if its worker dies
    AFTER_PREEMPTION = "after_preemption"
    RESUMED_STEP = Metric.RESUMED_STEP  # a retry that went on from its resume checkpoint: its step
    # a seed-check trial: the trial whose configuration it trains again
    SEED_CHECK_OF = "seed_check_of"
    # the control: the distilled trial whose configuration it trains again at alpha 0
    CONTROL_OF = "control_of"
    CONFIG = "config"  # the fingerprint of the settings it ran with (StudyAttr.CONFIG_PREFIX)
    BEST_STEP = Metric.BEST_STEP  # the step its value (and its final metrics) come from
    COST = "cost"  # {device_seconds, train_seconds, ...}: what it cost, as on its run
    # A finalist's scores on the test split: Metric.TEST_STUDENT_PPL, ... under their own names.
    # A complete trial also keeps its final eval metrics (student_ppl, ...) under their Metric
    # names.


class Tag:
    """MLflow run tags."""

    PARENT = "mlflow.parentRunId"
    GIT_COMMIT = "mlflow.source.git.commit"
    EXPERIMENT_KIND = "mlflow.experimentKind"  # MLflow 3's UI tells training experiments by it
    STUDY = "kdsweep.study"
    TRIAL = "kdsweep.trial"
    TRIAL_RUN_ID = "kdsweep.trial_run_id"  # on runs that user code starts inside a trial
    # the Optuna state (COMPLETE, PRUNED, FAIL), or why the run stopped: INTERRUPTED, PREEMPTED
    STATE = "kdsweep.state"
    FEASIBLE = "kdsweep.feasible"  # a complete trial of a constrained study: kept every ceiling
    REASON = "kdsweep.reason"
    BASELINE = "kdsweep.baseline"
    # a seed-check run: the trial whose configuration it trains again
    SEED_CHECK_OF = "kdsweep.seed_check_of"
    # the control: the distilled trial whose configuration it trains again at alpha 0
    CONTROL_OF = "kdsweep.control_of"
    VERSION = "kdsweep.version"
    LIBRARY_VERSION_PREFIX = "kdsweep.version."  # kdsweep.version.torch, .transformers, .optuna
    FINGERPRINT = "kdsweep.fingerprint"
    MODEL = "kdsweep.model"  # "saved" on the one run holding the best student (save_best)
    HOST = "kdsweep.host"  # the machine a trial ran on
    DEVICE = "kdsweep.device"  # and its device
    # On the parent run: the best trial so far.
    BEST_TRIAL = "best_trial"
    BEST_RUN_ID = "best.run_id"
    BEST_VALUE = "best.value"
    BEST_PARAM_PREFIX = "best."


SYSTEM_METRICS_PREFIX = "system/"  # MLflow's own: the samples of its system metrics monitor

# MLflow artifacts.
MODEL_ARTIFACT = "model"  # where save_best logs the student in its run
ADAPTER_ARTIFACT = "adapter"  # ... and a LoRA student's peft adapter
STUDY_ARTIFACT = "study.yaml"  # the resolved study on the parent run
RERUN_ARTIFACT = "trial.yaml"  # on every trial run: the study that reruns that trial alone
TRACEBACK_ARTIFACT = "traceback.txt"
REPORT_ARTIFACTS = "report"
CHAMPION = "champion"  # the registry alias that follows the study's best student
