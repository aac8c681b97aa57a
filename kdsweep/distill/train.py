"""One distillation run: the training loop, its optimizer, schedule and mixed precision.

It knows nothing of Optuna or MLflow. It takes resolved settings (``loss.DistillSettings``), the
data with its evaluation (:class:`TrainingData`), the teacher's targets and one object for the
trial's surroundings (:class:`TrialHooks`): what it hears as it trains (its logs, each
evaluation, which a hook may answer by raising to stop a pruned trial, its resume checkpoints)
and what it is handed (a checkpoint to resume from). Steps are on-policy with probability
``lmbda`` (``on_policy``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import random
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from kdsweep.data import Batch, TokenizedSplit, collate, training_order
from kdsweep.distill import clock, preemption
from kdsweep.distill.checkpoints import BestCheckpoint, TrainState
from kdsweep.distill.lora import load_trained_state, trained_state
from kdsweep.distill.loss import DistillSettings, batch_loss, token_shares, weighed
from kdsweep.distill.models import Vocabulary, checkpoint_activations, fast_bf16
from kdsweep.distill.on_policy import OnPolicy
from kdsweep.distill.targets import TeacherSignal
from kdsweep.losses import LossResult
from kdsweep.study.measures import better
from kdsweep.study.space import is_plain_fine_tuning


class TrainingDiverged(RuntimeError):
    """The loss or an evaluation stopped being finite."""


@dataclass(frozen=True)
class TrainingData:
    """What a run reads: the training rows, the vocabulary both models score, the pad id, and
    the evaluation of a student at a step (the validation split's metrics)."""

    split: TokenizedSplit
    vocab: Vocabulary
    pad_id: int
    evaluate: Callable[[PreTrainedModel, int], dict[str, float]]


@dataclass(frozen=True)
class StepLog:
    """Training statistics averaged over the steps since the previous log; a step's loss and its
    terms are means over all the tokens it scores (its on-policy divergence: over the tokens its
    completions hold)."""

    step: int
    loss: float
    kl: float
    ce: float
    learning_rate: float
    grad_norm: float
    tokens_per_second: float
    # On-policy trials only (None otherwise):
    generated_tokens: int | None = None  # student-generated tokens trained on so far
    generation_share: float | None = None  # of the time since the previous log


@dataclass(frozen=True)
class DistillResult:
    steps: int
    final_eval: dict[str, float]  # the evaluation of the checkpoint the student ends with
    seconds: float
    peak_memory_bytes: int
    best_step: int = 0  # that checkpoint's step: the best evaluation's, or the last's
    # Measured at that checkpoint after training (accuracy, a finalist's test split): in
    # final_eval too, logged at best_step.
    after: dict[str, float] = dataclasses.field(default_factory=dict)


class TrialHooks:
    """A trial's surroundings, as its training sees them: here, none (a run on its own). The
    sweep's objective gives each trial hooks of its own: they log to MLflow, report evaluations
    to the pruner, write resume checkpoints and hand over the one to resume from."""

    resume: TrainState | None = None  # a resume checkpoint to go on from, exactly
    checkpointing: bool = False  # whether ``checkpoint`` keeps resume checkpoints
    scores_test: bool = False  # the test split is scored at the trial's final checkpoint

    def built(self, trainable_parameters: int) -> None:
        """The student is built in its form: this many parameters train."""

    def logged(self, log: StepLog) -> None:
        """Every ``log_every`` steps and at the last."""

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        """Every ``eval_every`` steps and at the last; raise to stop the run (pruned)."""

    def checkpoint(self, state: TrainState) -> None:
        """A resume checkpoint: every ``checkpoint_every`` steps (default: at each evaluation),
        and at the step's end when the worker is preempted."""

    def trained(self, student: PreTrainedModel) -> None:
        """The student at its final checkpoint, once everything there is measured."""


def distill(
    student: PreTrainedModel,
    settings: DistillSettings,
    data: TrainingData,
    teacher: TeacherSignal | None,
    hooks: TrialHooks | None = None,
) -> DistillResult:
    """Train ``student`` for ``settings.train.max_steps`` optimizer steps, evaluating as it goes
    (every ``eval_every`` steps and at the last). With ``train.select: best`` the student ends at
    its best checkpoint by ``settings.objective``, and the result holds that evaluation; else at
    its last. A preempted worker (``preemption``) checkpoints at the step's end and raises
    ``Preempted``; Ctrl-C raises KeyboardInterrupt there. ``hooks.resume`` goes on from a
    checkpoint, exactly."""
    hooks = hooks or TrialHooks()
    cfg = settings.train
    device = next(student.parameters()).device
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    optimizer = adamw(student, settings)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_then_cosine(cfg.max_steps, cfg.warmup_ratio)
    )
    autocast, scaler = mixed_precision(cfg.precision, device)
    coin = random.Random(cfg.seed)  # which steps are on-policy: seeded, apart from the data order
    plain = is_plain_fine_tuning(settings.alpha)  # no teacher signal to read
    on_policy = _on_policy(settings, data, teacher) if settings.lmbda > 0 and not plain else None
    window = _Window(on_policy)
    started = time.perf_counter()
    best = BestCheckpoint(_selection(settings))
    loop = _LoopState(student, optimizer, schedule, scaler, coin, window, best, on_policy)
    start = 1 if hooks.resume is None else loop.restore(hooks.resume) + 1
    # The data order: every epoch's is seeded, so a resumed trial skips what it already used.
    skip = (start - 1) * cfg.grad_accum_steps
    batches = endless_batches(data.split, settings, pad_id=data.pad_id, skip=skip)
    every = cfg.eval_every if cfg.checkpoint_every is None else cfg.checkpoint_every

    if cfg.gradient_checkpointing:
        checkpoint_activations(student)
    student.train()
    with preemption.deferred():
        for step in range(start, cfg.max_steps + 1):
            _train_step(
                loop, batches, teacher, settings, data.vocab, autocast, plain=plain, step=step
            )
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                hooks.logged(window.flush(step, schedule.get_last_lr()[0]))
            schedule.step()
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                _evaluate(loop, data, hooks, autocast, step=step, last=step == cfg.max_steps)
            if step == cfg.max_steps:
                break  # done: a request to stop now waits for the trial's end
            stopping = preemption.requested()
            if stopping == preemption.INTERRUPTED:
                raise KeyboardInterrupt  # Ctrl-C: no checkpoint, the user asked it to end
            if hooks.checkpointing and (stopping or (every and step % every == 0)):
                with clock.part(clock.CHECKPOINT):
                    hooks.checkpoint(loop.capture(step))
            preemption.raise_if_requested(step if hooks.checkpointing else None)

    best.restore(student)
    return DistillResult(
        steps=cfg.max_steps,
        final_eval=best.metrics or {},
        seconds=time.perf_counter() - started,
        peak_memory_bytes=peak_memory(device),
        best_step=best.step,
    )


def _evaluate(loop: _LoopState, data: TrainingData, hooks: TrialHooks, autocast, *, step, last):
    """An evaluation at ``step``: heard by the hooks (a pruned trial stops there, before any
    copy), kept for a resume, offered as the best checkpoint."""
    with clock.part(clock.EVAL), autocast():
        metrics = data.evaluate(loop.student, step)
    loop.student.train()
    hooks.evaluated(step, metrics)
    loop.evaluations.append((step, metrics))
    with clock.part(clock.CHECKPOINT):
        loop.best.offer(step, metrics, loop.student, last=last)


def _selection(settings: DistillSettings) -> Callable[[dict, dict], bool]:
    """Whether an evaluation replaces the best so far: better by the objective (``select:
    best``), or always (``select: last``)."""
    if settings.train.select != "best":
        return lambda new, old: True
    name = settings.objective
    return lambda new, old: better(name, new[name], old[name])


def _on_policy(settings: DistillSettings, data: TrainingData, teacher) -> OnPolicy:
    """What the trial's on-policy steps need: the teacher run online, the prompts, sampling."""
    cfg = settings.train
    return OnPolicy(
        teacher.online("score on-policy completions"),
        data.split,
        temperature=cfg.generation_temperature,
        max_new_tokens=cfg.generation_max_new_tokens,
        pad_id=data.pad_id,
        eos_id=data.split.stop_id,
    )


def adamw(student: PreTrainedModel, settings: DistillSettings) -> torch.optim.Optimizer:
    """AdamW over what trains (a LoRA student's adapter, not its frozen base, gets states), in
    torch's fused kernel, as transformers' default ``adamw_torch_fused``: the same update to
    float rounding in one kernel per step, where torch's default loops over the tensors (on a
    CPU) or over their groups (foreach, on a GPU). A 40M-parameter student's step takes 7 to 13
    times less time than the loop's on a 2-core CPU (``benchmarks/optimizer.py``). torch has the
    fused kernel for both devices kdsweep trains on (CUDA; the CPU since torch 2.4) and every
    float dtype."""
    trained = [p for p in student.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        trained, lr=settings.learning_rate, weight_decay=settings.train.weight_decay, fused=True
    )


def _train_step(
    loop: _LoopState,
    batches: Iterator[Batch],
    teacher: TeacherSignal | None,
    settings: DistillSettings,
    vocab: Vocabulary,
    autocast: Callable,
    *,
    plain: bool,
    step: int,
) -> None:
    """One optimizer step over ``grad_accum_steps`` micro-batches, on-policy when the coin says.
    Its loss is the mean over all the tokens the step scores (``loss.token_shares``): each
    micro-batch's part of it goes backward in turn, so one micro-batch's graph exists at a time."""
    cfg = settings.train
    student, window, on_policy = loop.student, loop.window, loop.on_policy
    generating = on_policy is not None and loop.coin.random() < settings.lmbda
    micro_batches = [next(batches) for _ in range(cfg.grad_accum_steps)]
    window.tokens += sum(batch.num_tokens for batch in micro_batches)
    with clock.part(clock.ON_POLICY_STEP if generating else clock.CACHED_STEP):
        if generating:
            parts = on_policy.losses(student, micro_batches, settings, vocab, autocast=autocast)
        else:
            signal = None if plain else teacher
            parts = _off_policy_losses(student, micro_batches, signal, settings, vocab, autocast)
        for part in parts:
            loop.scaler.scale(part.loss).backward()
            window.add(part)
        # One device sync a step, so that a diverged trial stops at once rather than at its next
        # log. The window's sum was finite before this step: it is not now only if this one's is
        # not.
        if not torch.isfinite(torch.as_tensor(window.loss)):
            raise TrainingDiverged(f"the training loss is {float(window.loss)} at step {step}")
        loop.scaler.unscale_(loop.optimizer)  # clip the true gradients, not the scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
        loop.scaler.step(loop.optimizer)
        loop.scaler.update()
        loop.optimizer.zero_grad(set_to_none=True)
    window.grad_norm += grad_norm.detach().float()
    window.steps += 1


def _off_policy_losses(
    student: PreTrainedModel,
    micro_batches: list[Batch],
    teacher: TeacherSignal | None,
    settings: DistillSettings,
    vocab: Vocabulary,
    autocast: Callable,
) -> Iterator[LossResult]:
    """Each micro-batch's part of a step's loss on its rows, made as the loop asks for it: its
    means (against the teacher's targets; none: the cross-entropy alone) times its share of the
    step's scored tokens."""
    device = next(student.parameters()).device
    for batch, share in zip(micro_batches, token_shares(micro_batches)):
        batch = batch.to(device)
        targets = teacher.targets(batch, top_k=settings.top_k) if teacher else None
        with autocast():
            result = batch_loss(student, batch, targets, settings, vocab)
        yield weighed(result, share)


@dataclass
class _LoopState:
    """What the loop changes as it goes: all a resume checkpoint must hold to go on exactly."""

    student: PreTrainedModel
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    coin: random.Random
    window: _Window
    best: BestCheckpoint
    on_policy: OnPolicy | None
    evaluations: list[tuple[int, dict[str, float]]] = dataclasses.field(default_factory=list)

    def capture(self, step: int) -> TrainState:
        """The state after ``step``. It holds the live tensors, not copies (a copy of a large
        student's optimizer would double its memory): write it before the next step."""
        return TrainState(
            step=step,
            student=trained_state(self.student),
            optimizer=self.optimizer.state_dict(),
            schedule=self.schedule.state_dict(),
            scaler=self.scaler.state_dict(),
            torch_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            coin=self.coin.getstate(),
            window=self.window.sums(),
            evaluations=list(self.evaluations),
            best_step=self.best.step,
            best_metrics=self.best.metrics,
            best_weights=self.best.state,
            on_policy=self.on_policy.counters() if self.on_policy is not None else {},
        )

    def restore(self, state: TrainState) -> int:
        """Go back to ``state``; returns its step."""
        device = next(self.student.parameters()).device
        load_trained_state(self.student, state.student)
        self.optimizer.load_state_dict(state.optimizer)
        self.schedule.load_state_dict(state.schedule)
        if state.scaler:  # empty for a disabled scaler (no fp16)
            self.scaler.load_state_dict(state.scaler)
        torch.set_rng_state(state.torch_rng)
        if state.cuda_rng is not None and device.type == "cuda":
            torch.cuda.set_rng_state_all(state.cuda_rng)
        self.coin.setstate(state.coin)
        self.window.restore(state.window, device)
        self.evaluations = list(state.evaluations)
        self.best.step, self.best.metrics = state.best_step, state.best_metrics
        self.best.state = state.best_weights
        if self.on_policy is not None:
            self.on_policy.restore(state.on_policy)
        return state.step


def endless_batches(
    split: TokenizedSplit, settings: DistillSettings, *, pad_id: int, skip: int = 0
) -> Iterator[Batch]:
    """The trial's stream of micro-batches (``data.training_order``): epoch after epoch, each in
    its own seeded order, so every trial sees the same stream; ``skip`` drops its first
    micro-batches (a resumed trial's, already trained on)."""
    order = training_order(
        split,
        batch_size=settings.train.batch_size,
        seed=settings.train.seed,
        group_by_length=settings.group_by_length,
    )
    for rows in itertools.islice(order, skip, None):
        yield collate(split, rows, pad_id=pad_id)


def warmup_then_cosine(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """Linear warmup to the peak learning rate, then cosine decay to a tenth of it."""
    warmup = max(1, round(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def mixed_precision(precision: str, device: torch.device) -> tuple[Callable, torch.amp.GradScaler]:
    """The autocast context and gradient scaler for ``precision``.

    bf16 keeps fp32's exponent range, so it needs no scaler; fp16 does, or small gradients
    underflow to zero. "auto" takes bf16 where it computes faster than fp32 (``fast_bf16``: a
    bf16 GPU, a CPU with AMX units), else full fp32. The losses are computed in fp32 either way.
    """
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}.get(precision)
    if precision == "auto":
        dtype = torch.bfloat16 if fast_bf16(device) else None
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if dtype is None:
        return contextlib.nullcontext, scaler
    return lambda: torch.autocast(device.type, dtype=dtype), scaler


def peak_memory(device: torch.device) -> int:
    """Peak bytes: CUDA's allocator on a GPU, the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Window:
    """Sums over the steps since the last log. Kept as tensors: reading them syncs the GPU, so
    that happens once per log (and once per step for the loop's finite-loss check)."""

    def __init__(self, on_policy: OnPolicy | None = None):
        self._reset()
        self.last_time = time.perf_counter()
        self.on_policy = on_policy
        self.generating_at_log = 0.0  # on-policy seconds generating, as of the previous log

    def _reset(self):
        self.loss = self.kl = self.ce = self.grad_norm = 0.0
        self.steps = 0
        self.tokens = 0

    def sums(self) -> dict:
        return {
            "loss": self.loss,
            "kl": self.kl,
            "ce": self.ce,
            "grad_norm": self.grad_norm,
            "steps": self.steps,
            "tokens": self.tokens,
        }

    def restore(self, sums: dict, device: torch.device) -> None:
        for name, value in sums.items():
            on_device = isinstance(value, torch.Tensor)
            setattr(self, name, value.to(device) if on_device else value)
        if self.on_policy is not None:
            self.generating_at_log = self.on_policy.seconds

    def add(self, part: LossResult) -> None:
        """A micro-batch's part of its step's loss: a step's parts add up to its means."""
        self.loss += part.loss.detach()
        self.kl += part.kl.detach()
        self.ce += part.ce.detach()

    def flush(self, step: int, learning_rate: float) -> StepLog:
        now = time.perf_counter()
        n = max(self.steps, 1)
        log = StepLog(
            step=step,
            loss=float(self.loss) / n,
            kl=float(self.kl) / n,
            ce=float(self.ce) / n,
            learning_rate=learning_rate,
            grad_norm=float(self.grad_norm) / n,
            tokens_per_second=self.tokens / max(now - self.last_time, 1e-9),
        )
        if self.on_policy is not None:
            generating = self.on_policy.seconds - self.generating_at_log
            log = dataclasses.replace(
                log,
                generated_tokens=self.on_policy.generated_tokens,
                generation_share=generating / max(now - self.last_time, 1e-9),
            )
            self.generating_at_log = self.on_policy.seconds
        self._reset()
        self.last_time = now
        return log
