"""One trial: sample its parameters, distill, report each evaluation to the pruner, mirror it
all in the trial's MLflow run, and end both with the same state and reason.

Faults stay inside their trial: a diverged loss, an out-of-memory error or any other exception
fails that trial with its reason, and the memory it held is given back before the next one. An
out-of-memory trial can be retried with half the micro-batch (``train.oom_retry``). But when the
same error fails ``max_consecutive_failures`` trials in a row, the sweep stops with it: a bug
should not burn the budget.

A trial writes resume checkpoints as it trains (``checkpoints``). A retry of a trial whose
worker died or was preempted goes on from the latest one: the pruner sees the evaluations
already made, and the retry's MLflow run gets the curves up to that step, so they read as one.
A preempted trial (SIGTERM, ``preemption``) fails with its reason and is queued again at once;
it does not count as a failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
import traceback

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from kdsweep.distill import checkpoints, clock, preemption, train
from kdsweep.distill.models import device_uuid, release_memory
from kdsweep.distill.preemption import Preempted
from kdsweep.distill.train import TrainingDiverged
from kdsweep.errors import described
from kdsweep.mlflow.plugin import active_trial
from kdsweep.mlflow.study_runs import StudyRuns
from kdsweep.mlflow.trial_run import TrialRun
from kdsweep.names import Metric, TrialAttr
from kdsweep.prepare.trial_runner import TrialRunner
from kdsweep.progress import SweepProgress
from kdsweep.redact import redact
from kdsweep.store.recovery import enqueue_retry, this_worker
from kdsweep.store.trials import Trials, in_sweep, primary_value
from kdsweep.study.config import StudyConfig
from kdsweep.study.measures import OUT_OF_MEMORY, better, feasible, violations
from kdsweep.study.space import describe, suggest
from kdsweep.sweep import finalists


class RepeatedFailure(RuntimeError):
    """The same error failed ``max_consecutive_failures`` trials in a row: the sweep stops."""


class Objective:
    """One trial: sample, distill, report each evaluation to the pruner, mirror it in MLflow."""

    def __init__(
        self, *, study: StudyConfig, runner: TrialRunner, runs: StudyRuns, progress: SweepProgress
    ):
        self.study = study
        self.runner = runner  # trains one trial's student: the seam a test replaces
        self.runs = runs
        self.progress = progress
        self.ran = 0
        self._failures: list[str] = []  # this worker's consecutive failures, as error kinds

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        trial_clock = clock.Clock()  # its cost, from here to the end of its training
        params, seed, run = self._start(trial)
        hooks = self._hooks(trial, run)
        preempted = False
        try:
            # tags runs that user code starts
            with (
                active_trial(self.study.name, trial.number, run.run_id),
                clock.counting(trial_clock),
                self._costing(trial, run, trial_clock),
            ):
                result = self.runner(params, hooks, seed=seed, batch=self._batch(trial))
            return self._complete(trial, run, result, student=hooks.student)
        except optuna.TrialPruned as exc:
            run.end("KILLED", state="PRUNED", reason=str(exc))
            raise
        except Preempted as exc:
            preempted = True
            self._preempted(trial, run, exc)
            raise
        except KeyboardInterrupt:
            run.end("KILLED", state="INTERRUPTED", reason="interrupted (Ctrl-C)")
            raise
        except Exception as exc:
            self._fail(trial, run, exc)
            raise
        finally:
            hooks.student = None
            if not preempted:  # a preempted trial's checkpoint waits for its retry
                checkpoints.remove(hooks.path)
            release_memory(self.runner.device)

    def _start(self, trial: optuna.Trial) -> tuple[dict, int, TrialRun]:
        """The trial's parameters, seed and MLflow run, and what the trial records before it
        trains: where, with which settings, the share of the teacher its top_k keeps."""
        params = suggest(trial, self.study.search)
        seed = trial.user_attrs.get(TrialAttr.SEED, self.study.train.seed)
        trial.set_user_attr(TrialAttr.PARAMS, params)
        trial.set_user_attr(TrialAttr.CONFIG, self.study.fingerprint())  # store.settings
        trial.set_user_attr(TrialAttr.WORKER, this_worker())
        device = self.runner.device
        trial.set_user_attr(TrialAttr.DEVICE, str(device))
        run = self.runs.start_trial(
            trial, params, seed=seed, device=str(device), gpu_uuid=device_uuid(device)
        )
        mass = self.runner.topk_mass(params)  # None when the teacher runs online
        if mass is not None:
            # the report warns when top_k keeps little
            trial.set_user_attr(TrialAttr.TOPK_MASS, mass)
            run.log_metrics({Metric.TOPK_MASS: mass}, step=0)
        self.progress.trial_started(
            trial, describe(params, short=True), self.study.train.max_steps
        )
        return params, seed, run

    def _hooks(self, trial: optuna.Trial, run: TrialRun) -> SweepHooks:
        again = not in_sweep(trial)  # a seed-check run or a control: scored on the test split
        has_test = self.runner.test_set is not None
        return SweepHooks(
            self.study,
            trial,
            run,
            self.progress,
            resume=self._resume(trial, run),
            # save_best logs the trained student, and a sweep trial of a study with a test split
            # may keep it as a finalist (a seed-check run or a control is scored at once)
            keep_student=not again and (self.study.save_best or has_test),
            scores_test=again and has_test,
        )

    @contextlib.contextmanager
    def _costing(self, trial: optuna.Trial, run: TrialRun, trial_clock: clock.Clock):
        """However its training ends, the trial's cost goes on it and its run, before the run
        ends: a pruned or failed trial's time counts too."""
        try:
            yield
        finally:
            spent = trial_clock.cost()
            trial.set_user_attr(TrialAttr.COST, spent)
            run.log_metrics(spent, step=0)  # totals, not curves

    def _resume(self, trial: optuna.Trial, run: TrialRun) -> checkpoints.TrainState | None:
        """The resume checkpoint of the trial this one retries, if it wrote one: taken over as
        this trial's own, its evaluations reported to the pruner again, and the retried run's
        curves up to its step copied into this trial's run."""
        retried = trial.user_attrs.get(TrialAttr.RETRY_OF)
        if retried is None:
            return None
        own = checkpoints.resume_path(self.study, trial.number)
        state = checkpoints.take_over(checkpoints.resume_path(self.study, retried), own)
        if state is None:
            return None
        if state.trajectory != checkpoints.trajectory(self.study):
            checkpoints.remove(own)
            self.progress.message(
                f"trial {retried}'s checkpoint was written under other study settings: its retry "
                "starts from step 0"
            )
            return None
        self.progress.message(f"resuming trial {retried} from step {state.step}")
        trial.set_user_attr(TrialAttr.RESUMED_STEP, state.step)
        if not self.study.multi_objective:  # Optuna prunes single-objective studies only
            for step, metrics in state.evaluations:
                trial.report(metrics[self.study.primary_objective], step)
        earlier = trial.study.get_trials(deepcopy=False)[retried]
        run_id = earlier.user_attrs.get(TrialAttr.MLFLOW_RUN_ID)
        if run_id is not None:
            self.runs.copy_history(run_id, run, until=state.step)
        run.log_metrics({Metric.RESUMED_STEP: state.step}, step=state.step)
        return state

    def _preempted(self, trial: optuna.Trial, run: TrialRun, exc: Preempted) -> None:
        """A preempted trial fails with its reason and its checkpoint's step, and is queued to
        run again: the next worker goes on from that checkpoint."""
        trial.set_user_attr(TrialAttr.FAIL_REASON, str(exc))
        trial.set_user_attr(TrialAttr.PREEMPTED_STEP, exc.step)  # None: before training
        marks = {TrialAttr.RETRY_OF: trial.number, TrialAttr.AFTER_PREEMPTION: True}
        enqueue_retry(trial.study, trial, marks)
        run.end("KILLED", state="PREEMPTED", reason=str(exc))

    def _batch(self, trial: optuna.Trial) -> tuple[int, int]:
        """(micro-batch, accumulation steps): the study's, or an out-of-memory retry's."""
        train = self.study.train
        return trial.user_attrs.get(TrialAttr.MICRO_BATCH, train.batch_size), trial.user_attrs.get(
            TrialAttr.GRAD_ACCUM, train.grad_accum_steps
        )

    def _complete(
        self, trial: optuna.Trial, run: TrialRun, result, *, student
    ) -> float | list[float]:
        """A finished distillation: its results and constraints on the trial, its final metrics
        (and model, if it is the best feasible one so far) on its run, which ends FINISHED.
        Returns the objective's value, or each objective's."""
        measures = self._measures(trial, result)
        values = [measures[name] for name in self.study.objectives]
        value = values[0]
        excess = violations(measures, self.study.constraints)
        for name, over in excess.items():
            trial.set_constraint(name, over)
        trial.set_user_attr(TrialAttr.DURATION_S, result.seconds)
        trial.set_user_attr(TrialAttr.PEAK_MEMORY_GB, measures[Metric.PEAK_MEMORY_GB])
        trial.set_user_attr(TrialAttr.BEST_STEP, result.best_step)
        for key, metric in result.final_eval.items():
            trial.set_user_attr(key, metric)
        step = result.best_step
        run.log_metrics({**result.after, Metric.BEST_STEP: step}, step=step)
        # a seed-check run or a control, scored at once
        finalists.record_test_scores(trial.study, trial.number, result.after)
        kept = feasible(excess)  # every ceiling (none: a study without constraints)
        contender = student is not None and kept
        if contender and self.runner.test_set is not None:
            finalists.keep_if_contender(self.study, trial.study, trial, value, student)
        # save_best: a feasible trial better than every complete one so far logs its student.
        best = Trials.of(trial.study).best if self.study.save_best and contender else None
        saved = (
            self.study.save_best
            and contender
            and (best is None or better(self.study.primary_objective, value, primary_value(best)))
        )
        if saved:
            run.log_model(student, self.runner.tokenizer)
        run.finish(result, objective=value, feasible=kept if excess else None)
        if saved:
            self.runs.keep_best_model()
        return values if self.study.multi_objective else value

    def _measures(self, trial: optuna.Trial, result) -> dict[str, float]:
        """Everything a complete trial measured that an objective or a constraint may name: its
        quality at its selected checkpoint, and its cost (``study.measures``)."""
        measures = {
            **result.final_eval,
            **trial.user_attrs[TrialAttr.COST],
            Metric.PEAK_MEMORY_GB: result.peak_memory_bytes / 1e9,
        }
        if TrialAttr.TRAINABLE_PARAMETERS in trial.user_attrs:  # set once the student is built
            measures[Metric.TRAINABLE_PARAMETERS] = trial.user_attrs[
                TrialAttr.TRAINABLE_PARAMETERS
            ]
        return measures

    def _fail(self, trial: optuna.Trial, run: TrialRun, exc: Exception) -> None:
        """Record why the trial failed, on it and its run; free what its frames held; retry it
        with a smaller micro-batch if it ran out of memory and the study asks."""
        details = redact(traceback.format_exc())
        reason = OUT_OF_MEMORY if out_of_memory(exc) else described(exc)
        trial.set_user_attr(TrialAttr.FAIL_REASON, reason)
        if reason == OUT_OF_MEMORY:  # infeasible: the report counts it with trials over a ceiling
            trial.set_constraint(OUT_OF_MEMORY, 1.0)
        run.end("FAILED", state="FAIL", reason=reason, traceback=details)
        # The traceback's frames hold the trial's model, optimizer and activations: let them go.
        traceback.clear_frames(exc.__traceback__)
        if reason == OUT_OF_MEMORY and self.study.train.oom_retry:
            self._retry_smaller(trial)

    def _retry_smaller(self, trial: optuna.Trial) -> None:
        micro, accum = self._batch(trial)
        if micro < 2:
            return  # one row at a time did not fit: nothing smaller to try
        marks = {
            TrialAttr.MICRO_BATCH: micro // 2,
            TrialAttr.GRAD_ACCUM: accum * 2,
            TrialAttr.OOM_RETRY_OF: trial.number,
        }
        enqueue_retry(trial.study, trial, marks)
        self.progress.message(
            f"trial {trial.number} ran out of memory: retried with micro-batch {micro // 2} x "
            f"{accum * 2}"
        )

    def after_trial(self, optuna_study: optuna.Study, trial: FrozenTrial) -> None:
        self.ran += 1
        best = Trials.of(optuna_study).best
        self.runs.record_best(best)
        self.progress.trial_finished(trial, best)
        self._stop_on_repeated_failure(trial)
        preemption.raise_if_requested()  # asked in the trial's last step: stop before the next

    def _stop_on_repeated_failure(self, trial: FrozenTrial) -> None:
        """Raise RepeatedFailure when this worker's last trials all failed with the same error
        (step numbers and sizes aside). Out-of-memory trials that were retried do not count."""
        if trial.state != TrialState.FAIL:
            self._failures.clear()
            return
        if TrialAttr.PREEMPTED_STEP in trial.user_attrs:
            return  # no fault of the trial's
        reason = trial.user_attrs.get(TrialAttr.FAIL_REASON, "an unknown error")
        if reason == OUT_OF_MEMORY and self.study.train.oom_retry and self._batch(trial)[0] >= 2:
            return
        self._failures.append(reason)
        limit = self.study.max_consecutive_failures
        kinds = {_kind(r) for r in self._failures[-limit:]}
        if len(self._failures) >= limit and len(kinds) == 1:
            raise RepeatedFailure(
                f"the same error failed {limit} trials in a row (max_consecutive_failures), the "
                "last trial "
                f"{trial.number}: {reason}"
            )


class SweepHooks(train.TrialHooks):
    """One trial's surroundings as its training hears them: its logs and evaluations go to its
    MLflow run and the progress view, each evaluation to the pruner (which may stop it), its
    resume checkpoints to disk (after its curves: a kill -9 must not take steps the checkpoint
    holds), and the trained student is kept until the trial is scored."""

    def __init__(
        self,
        study: StudyConfig,
        trial: optuna.Trial,
        run: TrialRun,
        progress: SweepProgress,
        *,
        resume: checkpoints.TrainState | None,
        keep_student: bool,
        scores_test: bool,
    ):
        self.study, self.trial, self.run, self.progress = study, trial, run, progress
        self.resume = resume
        self.scores_test = scores_test
        self.checkpointing = True
        self.path = checkpoints.resume_path(study, trial.number)
        self.keep_student = keep_student
        self.student = None  # the trained student, when kept
        # A seed check runs to its end; Optuna prunes single-objective studies only.
        self.prunable = in_sweep(trial) and not study.multi_objective

    def built(self, trainable_parameters: int) -> None:
        """What the student's form trains (all of it, or a LoRA adapter), on the trial and its
        run from the start: a pruned or failed run shows it too."""
        self.trial.set_user_attr(TrialAttr.TRAINABLE_PARAMETERS, trainable_parameters)
        self.run.log_metrics({Metric.TRAINABLE_PARAMETERS: trainable_parameters}, step=0)

    def logged(self, log) -> None:
        self.run.log_step(log)
        self.progress.step(log)

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log_metrics(metrics, step=step)
        self.run.flush()
        objective = self.study.primary_objective
        value = metrics[objective]
        if not math.isfinite(value):
            raise TrainingDiverged(f"{objective} is {value} at step {step}")
        if not self.prunable:
            return
        self.trial.report(value, step)
        if self.trial.should_prune():
            self.trial.set_user_attr(TrialAttr.PRUNED_STEP, step)
            raise optuna.TrialPruned(f"pruned at step {step}: {objective} {value:.4g}")

    def checkpoint(self, state: checkpoints.TrainState) -> None:
        """A resume checkpoint, marked with the settings it holds for."""
        self.run.flush()
        self.run.wait_sent()
        key = checkpoints.trajectory(self.study)
        checkpoints.save(dataclasses.replace(state, trajectory=key), self.path)

    def trained(self, student) -> None:
        if self.keep_student:
            self.student = student


def out_of_memory(exc: BaseException) -> bool:
    """CUDA's out-of-memory error, or the CPU allocator's."""
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)


def _kind(reason: str) -> str:
    """An error with its numbers blanked: "loss is nan at step 3" and "... at step 7" are one."""
    return re.sub(r"\d+(\.\d+)?", "#", reason)


def optimize(
    optuna_study: optuna.Study,
    objective: Objective,
    *,
    n_trials: int | None = None,
    deadline: float | None,
    stop=None,
) -> None:
    """Optuna's loop: a failed trial does not stop it; the trial's state is told to the study."""
    callbacks = [objective.after_trial] + ([stop] if stop else [])
    timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
    # Ctrl-C and SIGTERM wait for a step's or a trial's end (after_trial checks), never cutting a
    # trial's write to the storage in half.
    with preemption.deferred():
        optuna_study.optimize(
            objective,
            n_trials=n_trials,
            timeout=timeout,
            catch=(Exception,),
            callbacks=callbacks,
            gc_after_trial=True,
        )
    preemption.raise_if_requested()  # asked as the last trial ended
