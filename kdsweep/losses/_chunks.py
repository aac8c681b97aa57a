"""The chunk loop, its autograd function and the chunk size."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kdsweep.losses._checks import Options, check_arguments
from kdsweep.losses._math import chunk_terms
from kdsweep.losses._students import HiddenStudent, Student
from kdsweep.losses._teacher import Teacher, TeacherInputs

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossResult:
    """The distillation loss and its two terms, each a 0-dim fp32 tensor.

    Attributes:
        loss: ``alpha * kl + (1 - alpha) * ce``; the only one of the three with a gradient.
        kl: ``T^2`` times the divergence chosen by ``beta`` (forward KL(teacher || student) by
            default), mean over kept positions; 0 without a teacher.
        ce: Cross-entropy with the labels at temperature 1, mean over kept positions.
    """

    loss: Tensor
    kl: Tensor
    ce: Tensor


# Bytes of the per-chunk math's fp32 [chunk, V] temporaries by default. On a CPU, 136 MiB puts
# each of forward KL's four just over glibc's largest mmap threshold (32 MiB), so a freed one goes
# back to the system and the peak RSS is the live tensors: smaller ones, recycled through the
# heap, left 0.07 to 0.22 GiB above the gradient at N = 1024 from run to run (0.13 here). Fewer,
# longer ops also run faster on a loaded machine, where every op waits for its second thread:
# 13-position chunks took 1.8x the CPU time of 55-position ones. On a GPU, 128 MiB each keeps a
# kernel long enough to hide its launch.
_CHUNK_BUDGET = {"cpu": 136 * 2**20, "other": 512 * 2**20}


@dataclass(frozen=True)
class _Settings:
    alpha: float
    temperature: float
    beta: float
    block_tokens: int  # positions whose [block, V] logits exist at once
    chunk_tokens: int  # positions per chunk of the math, within a block


def chunked_loss(
    student_kind: type[Student],
    inputs: tuple[Tensor, ...],
    labels: Tensor,
    teacher_inputs: TeacherInputs,
    options: Options,
) -> LossResult:
    """Checks the arguments, then runs `_DistillFunction` on ``inputs``: ``[..., V]`` logits, or
    ``[..., H]`` hidden states and the ``[V, H]`` weight.
    """
    weight = inputs[1] if student_kind is HiddenStudent else None
    check_arguments(inputs[0], weight, labels, teacher_inputs, options)
    vocab = student_kind.vocab(*inputs)
    teacher = Teacher.build(teacher_inputs, top_k=options.top_k, vocab=vocab)
    block, chunk = chunk_sizes(
        student_kind,
        teacher,
        beta=options.beta,
        vocab=vocab,
        device=inputs[0].device,
        chunk_tokens=options.chunk_tokens,
    )
    settings = _Settings(
        float(options.alpha), float(options.temperature), float(options.beta), block, chunk
    )
    # [n, labels.dim()] coordinates of the kept positions; syncs with the GPU, once.
    kept = (labels != IGNORE_INDEX).nonzero()
    # Decided here because grad mode is always off inside an autograd function's forward.
    needs_grad = tuple(torch.is_grad_enabled() and t.requires_grad for t in inputs)
    loss, kl, ce = _DistillFunction.apply(
        student_kind, needs_grad, labels, kept, teacher, settings, *inputs
    )
    return LossResult(loss=loss, kl=kl, ce=ce)


def chunk_sizes(
    student_kind: type[Student],
    teacher: Teacher | None,
    *,
    beta: float,
    vocab: int,
    device: torch.device,
    chunk_tokens: int | None,
) -> tuple[int, int]:
    """Positions per block (whose logits exist at once) and per chunk of the math.

    The math's fp32 ``[chunk, V]`` temporaries fit `_CHUNK_BUDGET`. The logits forms' blocks are
    those chunks (``chunk_tokens`` sets both); the hidden form's are its matmuls', one fp32
    ``[block, V]`` buffer within the student's budget (``chunk_tokens`` sets the block).
    """
    where = "cpu" if device.type == "cpu" else "other"
    chunk = max(1, _CHUNK_BUDGET[where] // (live_temporaries(teacher, beta) * vocab * 4))
    if student_kind.block_budget is None:
        return (chunk_tokens or chunk,) * 2
    block = chunk_tokens or max(1, student_kind.block_budget[where] // (vocab * 4))
    return block, min(chunk, block)


def live_temporaries(teacher: Teacher | None, beta: float) -> int:
    """How many fp32 ``[chunk, V]`` tensors a chunk holds at once, its logits among them (a
    teacher's ``[chunk, V]`` copies are freed before the student's log-probs exist).
    """
    if teacher is None or (not teacher.whole_vocabulary and beta == 1.0):
        return 2  # the logits; their log-softmax, which becomes the gradient
    if not teacher.whole_vocabulary:
        return 3  # + the student's tempered log-probs, which become its probabilities
    # + the teacher's log-probs (+ the mixture's probabilities beside its log-mixture)
    return 5 if 0.0 < beta < 1.0 else 4


def _mean_over_blocks(
    student: Student, labels: Tensor, kept: Tensor, teacher: Teacher | None, settings: _Settings
) -> tuple[Tensor, Tensor]:
    """Mean KL and CE over the ``kept`` positions; fills the student's gradients if it has any."""
    count = max(len(kept), 1)  # all positions ignored: sums of nothing, divided by 1
    grad_scale = 1.0 / count if student.needs_grad else None
    kl_sum = ce_sum = torch.zeros((), device=labels.device)
    for block in kept.split(settings.block_tokens):
        kl, ce = _block(student, labels, block.unbind(1), teacher, settings, grad_scale)
        kl_sum, ce_sum = kl_sum + kl, ce_sum + ce
    return kl_sum / count, ce_sum / count


def _block(
    student: Student,
    labels: Tensor,
    rows: tuple[Tensor, ...],
    teacher: Teacher | None,
    settings: _Settings,
    grad_scale: float | None,
) -> tuple[Tensor, Tensor]:
    """KL and CE sums over positions ``rows``, whose ``[b, V]`` logits exist at once; the math
    goes over chunks of them, then the block's gradient goes back into the student.
    """
    logits = student.block_logits(rows)
    kl_sum = ce_sum = logits.new_zeros(())
    for start in range(0, len(logits), settings.chunk_tokens):
        part = slice(start, min(start + settings.chunk_tokens, len(logits)))
        kl, ce = _chunk(
            student,
            logits[part],
            labels,
            tuple(r[part] for r in rows),
            part,
            teacher,
            settings,
            grad_scale,
        )
        kl_sum, ce_sum = kl_sum + kl, ce_sum + ce
    if grad_scale is not None:
        student.backprop(rows)
    return kl_sum, ce_sum


def _chunk(
    student: Student,
    logits: Tensor,
    labels: Tensor,
    rows: tuple[Tensor, ...],
    part: slice,
    teacher: Teacher | None,
    settings: _Settings,
    grad_scale: float | None,
) -> tuple[Tensor, Tensor]:
    """KL and CE sums over positions ``rows``, rows ``part`` of the block, whose ``logits``
    ``[c, V]`` the math overwrites. A function of its own so that its temporaries are freed
    before the next chunk's exist.
    """
    temperature = settings.temperature
    teacher_chunk = None if teacher is None else teacher.chunk(rows, temperature=temperature)
    kl, ce, grad = chunk_terms(
        logits,
        labels[rows].long(),
        teacher_chunk,
        alpha=settings.alpha,
        beta=settings.beta,
        temperature=temperature,
        grad_scale=grad_scale,
    )
    if grad is not None:
        student.store_gradient(rows, part, grad)
    return kl, ce


class _DistillFunction(torch.autograd.Function):
    """Forward computes the loss and its input gradients together; backward only scales them."""

    @staticmethod
    def forward(ctx, student_kind, needs_grad, labels, kept, teacher, settings, *inputs):
        student = student_kind(*inputs, needs_grad=needs_grad)
        # fp32 math even under autocast, which would run the hidden form's matmuls in bf16.
        with torch.autocast(labels.device.type, enabled=False):
            kl, ce = _mean_over_blocks(student, labels, kept, teacher, settings)
        loss = settings.alpha * kl + (1.0 - settings.alpha) * ce
        ctx.save_for_backward(*student.grads())
        ctx.mark_non_differentiable(kl, ce)
        return loss, kl, ce

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        # In place: the buffers are this call's alone, and a second backward would be refused by
        # autograd's version check on saved tensors rather than silently rescale them.
        grads = tuple(None if g is None else g.mul_(grad_loss) for g in ctx.saved_tensors)
        return (None,) * 6 + grads
