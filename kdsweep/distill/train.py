"""One distillation run: the training loop, its optimizer, schedule and mixed precision.

It knows nothing of Optuna or MLflow: it takes resolved settings, prepared data, a teacher signal
and callbacks. A callback may raise (a pruned trial) to stop the run.

On-policy steps (GKD; TRL's ``lmbda``): with probability ``lmbda`` an optimizer step trains on
the student's own completions of its rows' prompts, which the teacher scores online; the
divergence is taken on the generated tokens only, while the cross-entropy keeps the rows'
reference answers. The other steps read the teacher signal as usual (the cache, typically).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from kdsweep.data import Batch, TokenizedSplit, collate, make_batches
from kdsweep.distill import clock, preemption
from kdsweep.distill.checkpoints import BestCheckpoint, TrainState
from kdsweep.distill.generation import generate
from kdsweep.distill.lora import load_trained_state, trained_state
from kdsweep.distill.models import Vocabulary, bf16_supported, hidden_states, output_weight
from kdsweep.distill.targets import OnlineTeacher, TeacherSignal, TeacherTargets, scored_positions
from kdsweep.losses import IGNORE_INDEX, LossResult, distill_loss_from_hidden
from kdsweep.study.config import TrainConfig
from kdsweep.study.space import is_plain_fine_tuning


class TrainingDiverged(RuntimeError):
    """The loss or an evaluation stopped being finite."""


@dataclass(frozen=True)
class DistillSettings:
    """Everything one run needs to know: the sampled hyperparameters and the fixed settings."""

    alpha: float
    temperature: float
    top_k: int | None  # None: the teacher's whole vocabulary
    learning_rate: float
    train: TrainConfig
    beta: float = 0.0  # the divergence: 0 forward KL, 1 reverse KL (generalized JSD between)
    lmbda: float = 0.0  # the share of steps on the student's own generations (on-policy)
    group_by_length: bool = True


@dataclass(frozen=True)
class StepLog:
    """Training statistics averaged over the steps since the previous log."""

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


def distill(
    student: PreTrainedModel,
    train_split: TokenizedSplit,
    teacher: TeacherSignal | None,
    settings: DistillSettings,
    *,
    vocab: Vocabulary,
    pad_id: int,
    evaluate: Callable[[PreTrainedModel, int], dict[str, float]],
    on_log: Callable[[StepLog], None] = lambda log: None,
    on_eval: Callable[[int, dict[str, float]], None] = lambda step, metrics: None,
    on_policy: OnPolicy | None = None,
    better: Callable[[dict, dict], bool] | None = None,
    save_state: Callable[[TrainState], None] | None = None,
    resume: TrainState | None = None,
) -> DistillResult:
    """Train ``student`` for ``settings.train.max_steps`` optimizer steps, evaluating as it goes:
    ``evaluate(student, step)`` every ``eval_every`` steps and at the last. With
    ``settings.lmbda > 0``, ``on_policy`` makes that share of the steps on-policy. With
    ``better(a, b)`` (is evaluation ``a`` better than ``b``?), the student ends at its best
    checkpoint, and the result holds that evaluation; without, at its last.

    ``save_state(state)`` receives a resume checkpoint every ``checkpoint_every`` steps (default:
    at each evaluation), and at the step's end when the worker is preempted (``preemption``),
    which then raises ``Preempted``; Ctrl-C raises KeyboardInterrupt there too. ``resume`` goes
    on from such a checkpoint, exactly."""
    cfg = settings.train
    device = next(student.parameters()).device
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # Only what trains gets optimizer states: a LoRA student's adapter, not its frozen base.
    trained = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trained, lr=settings.learning_rate, weight_decay=cfg.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_then_cosine(cfg.max_steps, cfg.warmup_ratio)
    )
    autocast, scaler = mixed_precision(cfg.precision, device)
    coin = random.Random(cfg.seed)  # which steps are on-policy: seeded, apart from the data order
    window = _Window(on_policy)
    started = time.perf_counter()
    best = BestCheckpoint(better or (lambda new, old: True))  # without better: the last one
    plain = is_plain_fine_tuning(settings.alpha)  # no teacher signal to read
    loop = _LoopState(student, optimizer, schedule, scaler, coin, window, best, on_policy)
    start = 1 if resume is None else loop.restore(resume) + 1
    # The data order: every epoch's is seeded, so a resumed trial skips what it already used.
    skip = (start - 1) * cfg.grad_accum_steps
    batches = endless_batches(train_split, settings, pad_id=pad_id, skip=skip)
    every = cfg.eval_every if cfg.checkpoint_every is None else cfg.checkpoint_every

    student.train()
    with preemption.deferred():
        for step in range(start, cfg.max_steps + 1):
            _train_step(loop, batches, teacher, settings, vocab, autocast, plain=plain, step=step)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                on_log(window.flush(step, schedule.get_last_lr()[0]))
            schedule.step()
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                with clock.part(clock.EVAL), autocast():
                    metrics = evaluate(student, step)
                student.train()
                on_eval(step, metrics)  # a pruned trial stops here, before any copy
                loop.evaluations.append((step, metrics))
                with clock.part(clock.CHECKPOINT):
                    best.offer(step, metrics, student, last=step == cfg.max_steps)
            if step == cfg.max_steps:
                break  # done: a request to stop now waits for the trial's end
            stopping = preemption.requested()
            if stopping == preemption.INTERRUPTED:
                raise KeyboardInterrupt  # Ctrl-C: no checkpoint, the user asked it to end
            checkpointing = save_state is not None
            if checkpointing and (stopping or (every and step % every == 0)):
                with clock.part(clock.CHECKPOINT):
                    save_state(loop.capture(step))
            preemption.raise_if_requested(step if checkpointing else None)

    best.restore(student)
    return DistillResult(
        steps=cfg.max_steps,
        final_eval=best.metrics or {},
        seconds=time.perf_counter() - started,
        peak_memory_bytes=peak_memory(device),
        best_step=best.step,
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
    """One optimizer step over ``grad_accum_steps`` micro-batches, on-policy when the coin says."""
    cfg = settings.train
    student, window, on_policy = loop.student, loop.window, loop.on_policy
    device = next(student.parameters()).device
    generating = on_policy is not None and not plain and loop.coin.random() < settings.lmbda
    with clock.part(clock.ON_POLICY_STEP if generating else clock.CACHED_STEP):
        for _ in range(cfg.grad_accum_steps):
            batch = next(batches)
            window.tokens += int(batch.attention_mask.sum())
            batch = batch.to(device)
            if generating:
                result = on_policy.loss(student, batch, settings, vocab, autocast=autocast)
            else:
                targets = (
                    teacher.targets(batch, top_k=settings.top_k) if teacher and not plain else None
                )
                with autocast():
                    result = batch_loss(student, batch, targets, settings, vocab)
            loop.scaler.scale(result.loss / cfg.grad_accum_steps).backward()
            window.add(result, cfg.grad_accum_steps)
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


def batch_loss(
    student: PreTrainedModel,
    batch: Batch,
    targets: TeacherTargets | None,
    settings: DistillSettings,
    vocab: Vocabulary,
) -> LossResult:
    """The distillation loss of one batch, computed on its scored positions only."""
    kept = scored_positions(batch.labels)
    hidden = hidden_states(student, batch.input_ids, batch.attention_mask)[:, :-1][kept]
    teacher = targets.as_loss_kwargs() if targets is not None else {}
    return distill_loss_from_hidden(
        hidden,
        output_weight(student, vocab),
        batch.labels[:, 1:][kept],
        **teacher,
        alpha=settings.alpha if targets is not None else 0.0,
        temperature=settings.temperature,
        beta=settings.beta,
        chunk_tokens=settings.train.loss_chunk_tokens,
    )


@dataclass
class OnPolicy:
    """What an on-policy step needs: the teacher run online (its cache holds only the dataset's
    tokens), the training rows' prompts, and how the student samples its completions."""

    teacher: OnlineTeacher  # scores generated tokens: they are new, no cache holds them
    split: TokenizedSplit  # the training rows, whose prompts the student completes
    temperature: float
    max_new_tokens: int
    pad_id: int
    eos_id: int
    generated_tokens: int = 0  # student tokens trained on, so far
    seconds: float = 0.0  # spent generating, so far
    batches: int = 0  # micro-batches completed by the student, so far

    def loss(
        self,
        student: PreTrainedModel,
        batch: Batch,
        settings: DistillSettings,
        vocab: Vocabulary,
        *,
        autocast,
    ) -> LossResult:
        """``alpha * D(teacher || student on its own completions) + (1 - alpha) * CE(references)``.

        Rows without a final answer (no prompt to complete) take part in the cross-entropy only;
        a micro-batch of such rows has no divergence term, and its CE keeps its weight.
        """
        with autocast():
            # CE on the dataset's answers
            reference = batch_loss(student, batch, None, settings, vocab)
        completions = self.complete(student, batch)
        if completions is None:
            return dataclasses.replace(reference, loss=(1 - settings.alpha) * reference.loss)
        targets = self.teacher.targets(completions, top_k=settings.top_k)
        with autocast():
            divergence = batch_loss(
                student, completions, targets, dataclasses.replace(settings, alpha=1.0), vocab
            )
        loss = settings.alpha * divergence.loss + (1 - settings.alpha) * reference.loss
        return LossResult(loss=loss, kl=divergence.kl, ce=reference.ce)

    def counters(self) -> dict:
        return {
            "generated_tokens": self.generated_tokens,
            "seconds": self.seconds,
            "batches": self.batches,
        }

    def restore(self, counters: dict) -> None:
        for name, value in counters.items():
            setattr(self, name, value)

    def complete(self, student: PreTrainedModel, batch: Batch) -> Batch | None:
        """The student's sampled completions of the batch's prompts, as a batch whose labels mark
        the generated tokens only (the prompt, and so the reference answer, is never scored)."""
        prompts = [prompt for e in batch.example_ids.tolist() if (prompt := self.split.prompt(e))]
        if not prompts:
            return None
        started = time.perf_counter()
        generated = generate(
            student,
            prompts,
            pad_id=self.pad_id,
            eos_id=self.eos_id,
            max_new_tokens=self.max_new_tokens,
            batch_size=len(prompts),
            temperature=self.temperature,
            vocab_size=self.teacher.vocab.size,
        )
        self.seconds += time.perf_counter() - started
        self.generated_tokens += sum(map(len, generated))
        self.batches += 1
        split = TokenizedSplit(
            tuple(tuple(p) + tuple(g) for p, g in zip(prompts, generated)),
            tuple((IGNORE_INDEX,) * len(p) + tuple(g) for p, g in zip(prompts, generated)),
        )
        return collate(split, list(range(len(prompts))), pad_id=self.pad_id).to(
            batch.input_ids.device
        )


def endless_batches(
    split: TokenizedSplit, settings: DistillSettings, *, pad_id: int, skip: int = 0
) -> Iterator[Batch]:
    """Epoch after epoch, each in its own seeded order, so every trial sees the same stream;
    ``skip`` drops its first micro-batches (a resumed trial's, already trained on)."""
    epoch = 0
    while True:
        epoch_batches = make_batches(
            split,
            batch_size=settings.train.batch_size,
            pad_id=pad_id,
            shuffle_seed=settings.train.seed + epoch,
            group_by_length=settings.group_by_length,
        )
        for batch in epoch_batches:
            if skip:
                skip -= 1
                continue
            yield batch
        epoch += 1


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
    underflow to zero. "auto" takes bf16 where the GPU supports it, else full fp32.
    """
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}.get(precision)
    if precision == "auto":
        dtype = torch.bfloat16 if bf16_supported(device) else None
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

    def add(self, result: LossResult, accum: int) -> None:
        self.loss += result.loss.detach() / accum
        self.kl += result.kl.detach() / accum
        self.ce += result.ce.detach() / accum

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
