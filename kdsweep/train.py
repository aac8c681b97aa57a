"""One distillation run: the training loop, its optimizer, schedule and mixed precision.

It knows nothing of Optuna or MLflow: it takes resolved settings, prepared data, a teacher signal
and callbacks. A callback may raise (a pruned trial) to stop the run.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from kdsweep.config import TrainConfig
from kdsweep.data import Batch, TokenizedSplit, make_batches
from kdsweep.losses import LossResult, distill_loss_from_hidden
from kdsweep.models import Vocabulary, bf16_supported, hidden_states, output_weight
from kdsweep.teacher import TeacherSignal, TeacherTargets, scored_positions


@dataclass(frozen=True)
class DistillSettings:
    """Everything one run needs to know: the sampled hyperparameters and the fixed settings."""

    alpha: float
    temperature: float
    top_k: int | None  # None: the teacher's whole vocabulary
    learning_rate: float
    train: TrainConfig
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


@dataclass(frozen=True)
class DistillResult:
    steps: int
    final_eval: dict[str, float]
    seconds: float
    peak_memory_bytes: int


def distill(
    student: PreTrainedModel,
    train_split: TokenizedSplit,
    teacher: TeacherSignal | None,
    settings: DistillSettings,
    *,
    vocab: Vocabulary,
    pad_id: int,
    evaluate: Callable[[PreTrainedModel], dict[str, float]],
    on_log: Callable[[StepLog], None] = lambda log: None,
    on_eval: Callable[[int, dict[str, float]], None] = lambda step, metrics: None,
) -> DistillResult:
    """Train ``student`` for ``settings.train.max_steps`` optimizer steps, evaluating as it goes."""
    cfg = settings.train
    device = next(student.parameters()).device
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=settings.learning_rate, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_cosine(cfg.max_steps, cfg.warmup_ratio))
    autocast, scaler = mixed_precision(cfg.precision, device)
    batches = endless_batches(train_split, settings, pad_id=pad_id)
    window = _Window()
    started = time.perf_counter()
    final_eval: dict[str, float] = {}

    student.train()
    for step in range(1, cfg.max_steps + 1):
        for _ in range(cfg.grad_accum_steps):
            batch = next(batches)
            window.tokens += int(batch.attention_mask.sum())
            batch = batch.to(device)
            targets = teacher.targets(batch, top_k=settings.top_k) if teacher and settings.alpha > 0 else None
            with autocast():
                result = batch_loss(student, batch, targets, settings, vocab)
            scaler.scale(result.loss / cfg.grad_accum_steps).backward()
            window.add(result, cfg.grad_accum_steps)
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        window.grad_norm += grad_norm.detach().float()
        window.steps += 1
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            on_log(window.flush(step, schedule.get_last_lr()[0]))
        schedule.step()
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            with autocast():
                final_eval = evaluate(student)
            student.train()
            on_eval(step, final_eval)

    return DistillResult(
        steps=cfg.max_steps,
        final_eval=final_eval,
        seconds=time.perf_counter() - started,
        peak_memory_bytes=peak_memory(device),
    )


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
        chunk_tokens=settings.train.loss_chunk_tokens,
    )


def endless_batches(split: TokenizedSplit, settings: DistillSettings, *, pad_id: int) -> Iterator[Batch]:
    """Epoch after epoch, each in its own seeded order, so every trial sees the same stream."""
    epoch = 0
    while True:
        yield from make_batches(
            split,
            batch_size=settings.train.batch_size,
            pad_id=pad_id,
            shuffle_seed=settings.train.seed + epoch,
            group_by_length=settings.group_by_length,
        )
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
    """Sums over the steps since the last log. Kept as tensors: reading them syncs the GPU,
    so that happens once per log, not once per step."""

    def __init__(self):
        self._reset()
        self.last_time = time.perf_counter()

    def _reset(self):
        self.loss = self.kl = self.ce = self.grad_norm = 0.0
        self.steps = 0
        self.tokens = 0

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
        self._reset()
        self.last_time = now
        return log
