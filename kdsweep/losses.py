"""Distillation loss: ``alpha * T^2 * KL(teacher || student) + (1 - alpha) * cross-entropy``.

Three entry points share one per-chunk formula (`_chunk_terms`):

- `distill_loss`: student logits and full teacher logits, over the whole vocabulary or its top-k.
- `distill_loss_sparse`: student logits and the teacher's K largest logits with their ids (a cache).
- `distill_loss_from_hidden`: the student's last hidden states and lm_head weight, so the student's
  ``[N, V]`` logits never exist for the whole batch at once.

Formulas, with ``z_s``, ``z_t`` the student and teacher logits, ``T`` the temperature and means
taken over the kept positions (label != -100)::

    p_t  = softmax(z_t / T)            renormalised over the teacher's top-k ids when given
    KL   = mean T^2 * sum_v p_t(v) * (log p_t(v) - log_softmax(z_s / T)(v))   (student: whole vocab)
    CE   = mean -log_softmax(z_s)[label]
    loss = alpha * KL + (1 - alpha) * CE

How it is computed, and why:

- Work goes over chunks of tokens, never of the vocabulary: a softmax over part of the vocabulary
  is a different distribution.
- The gradient has a closed form (``d CE / dz_s = softmax(z_s) - onehot(label)`` and
  ``d KL / dz_s = T * (softmax(z_s / T) - p_t)``, with ``p_t`` zero off its support), so a custom
  autograd function computes it in the forward pass, chunk by chunk, and backward only scales it
  (the Liger-Kernel trick). Extra memory is then one gradient buffer the size of the student's
  input plus a few fp32 ``[chunk_tokens, V]`` temporaries, instead of several ``[N, V]`` copies.
- Math is fp32 whatever the input dtype; each chunk is upcast on its own.

Conventions: ``logits[..., i, :]`` predicts ``labels[..., i]`` (the caller shifts); the teacher is a
constant (it gets no gradient); `LossResult.kl` and `LossResult.ce` are detached values for logging
and only `LossResult.loss` carries a gradient; backward can run once per call, as in a training
step (a second backward through the same result raises torch's in-place modification error).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100

# chunk_tokens=None takes about this many logits per chunk. On a CPU, 2**22 (16 MiB in fp32, 27
# tokens at V = 151,936) is as fast as larger chunks: each fresh tensor costs page faults, and
# small ones are reused from the heap and stay in cache. On a GPU, 2**25 (128 MiB, 220 tokens)
# keeps each kernel long enough to hide its launch. Either is small next to the [N, V] gradient.
_AUTO_CHUNK_ELEMENTS = {"cpu": 2**22, "other": 2**25}

__all__ = [
    "IGNORE_INDEX",
    "LossResult",
    "distill_loss",
    "distill_loss_from_hidden",
    "distill_loss_sparse",
]


@dataclass(frozen=True)
class LossResult:
    """The distillation loss and its two terms, each a 0-dim fp32 tensor.

    Attributes:
        loss: ``alpha * kl + (1 - alpha) * ce``; the only one of the three with a gradient.
        kl: ``T^2 * KL(teacher || student)``, mean over kept positions; 0 without a teacher.
        ce: Cross-entropy with the labels at temperature 1, mean over kept positions.
    """

    loss: Tensor
    kl: Tensor
    ce: Tensor


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    *,
    alpha: float,
    temperature: float,
    top_k: int | None = None,
    chunk_tokens: int | None = None,
) -> LossResult:
    """Distillation loss from student and teacher logits.

    Args:
        student_logits: ``[..., V]`` student logits, any float dtype.
        teacher_logits: ``[..., V]`` raw teacher logits, any float dtype; may be None when
            ``alpha == 0``.
        labels: ``[...]`` target ids; -100 marks a position ignored by both terms.
        alpha: Weight of the KL term, in [0, 1].
        temperature: Softens both distributions in the KL term; > 0.
        top_k: Keep the teacher's ``top_k`` largest logits and renormalise over them; None, or
            ``top_k >= V``, uses the whole vocabulary.
        chunk_tokens: Positions per chunk; None takes ``2**22 // V`` on a CPU (27 at
            V = 151,936) and ``2**25 // V`` on a GPU (220).

    Returns:
        The loss and its terms; extra peak memory is one ``[..., V]`` gradient buffer plus a few
        fp32 ``[chunk_tokens, V]`` temporaries.

    Raises:
        ValueError: On bad shapes or settings, naming every problem at once.

    Example:
        >>> student = torch.randn(2, 3, 10, requires_grad=True)
        >>> labels = torch.tensor([[1, 2, -100], [4, -100, 6]])
        >>> teacher = torch.randn(2, 3, 10)
        >>> result = distill_loss(student, teacher, labels, alpha=0.5, temperature=2.0, top_k=5)
        >>> result.loss.backward()
    """
    problems = _settings_problems(alpha, temperature, top_k=top_k, chunk_tokens=chunk_tokens)
    problems += _student_problems("student_logits", student_logits, labels)
    problems += _teacher_problems(
        alpha, student_logits.shape, logits=teacher_logits, values=None, indices=None, top_k=top_k
    )
    problems += _device_problems(student_logits, labels=labels, teacher_logits=teacher_logits)
    _raise_if(problems)
    vocab = student_logits.shape[-1]
    teacher = _Teacher.build(teacher_logits, None, None, top_k=top_k, vocab=vocab)
    settings = _Settings.build(alpha, temperature, chunk_tokens, vocab=vocab,
                               device=student_logits.device)
    return _distill(_LogitsStudent, (student_logits,), labels, teacher, settings)


def distill_loss_sparse(
    student_logits: Tensor,
    teacher_values: Tensor,
    teacher_indices: Tensor,
    labels: Tensor,
    *,
    alpha: float,
    temperature: float,
) -> LossResult:
    """Distillation loss from student logits and the teacher's top-K logits (e.g. from a cache).

    Equals `distill_loss` with ``top_k=K`` given the same K values and ids.

    Args:
        student_logits: ``[..., V]`` student logits, any float dtype.
        teacher_values: ``[..., K]`` the teacher's K largest raw logits, any float dtype.
        teacher_indices: ``[..., K]`` their vocabulary ids, int64 or int32.
        labels: ``[...]`` target ids; -100 marks a position ignored by both terms.
        alpha: Weight of the KL term, in [0, 1].
        temperature: Softens both distributions in the KL term; > 0.

    Returns:
        The loss and its terms.

    Raises:
        ValueError: On bad shapes or settings, naming every problem at once.
    """
    problems = _settings_problems(alpha, temperature, top_k=None, chunk_tokens=None)
    problems += _student_problems("student_logits", student_logits, labels)
    problems += _teacher_problems(
        alpha, student_logits.shape, logits=None, values=teacher_values, indices=teacher_indices
    )
    problems += _device_problems(student_logits, labels=labels, teacher_values=teacher_values,
                                 teacher_indices=teacher_indices)
    _raise_if(problems)
    teacher = _Teacher.build(None, teacher_values, teacher_indices, top_k=None,
                             vocab=student_logits.shape[-1])
    settings = _Settings.build(alpha, temperature, None, vocab=student_logits.shape[-1],
                               device=student_logits.device)
    return _distill(_LogitsStudent, (student_logits,), labels, teacher, settings)


def distill_loss_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    teacher_logits: Tensor | None = None,
    teacher_values: Tensor | None = None,
    teacher_indices: Tensor | None = None,
    alpha: float,
    temperature: float,
    top_k: int | None = None,
    chunk_tokens: int | None = 1024,
) -> LossResult:
    """Distillation loss from the student's hidden states, never holding its full logits.

    Student logits are ``hidden @ weight.T``, made one chunk of positions at a time in fp32, and
    the gradients w.r.t. ``hidden`` and ``weight`` are accumulated in the same pass. Give the
    teacher as ``teacher_logits`` (optionally with ``top_k``) or as ``teacher_values`` with
    ``teacher_indices``, or not at all when ``alpha == 0``.

    Args:
        hidden: ``[..., H]`` the student's last hidden states, any float dtype.
        weight: ``[V, H]`` the student's lm_head weight (may be tied to the input embedding).
        labels: ``[...]`` target ids; -100 marks a position ignored by both terms.
        teacher_logits: ``[..., V]`` raw teacher logits.
        teacher_values: ``[..., K]`` the teacher's K largest raw logits.
        teacher_indices: ``[..., K]`` their vocabulary ids, int64 or int32.
        alpha: Weight of the KL term, in [0, 1].
        temperature: Softens both distributions in the KL term; > 0.
        top_k: With ``teacher_logits``, keep the top_k largest and renormalise over them.
        chunk_tokens: Positions per chunk; None as in `distill_loss`. Each chunk reads the
            weight three times (logits, hidden and weight gradients), so chunks much smaller
            than the hidden size turn the matmuls memory-bound; each costs about
            ``(3 to 4) * chunk_tokens * V * 4`` bytes of temporaries.

    Returns:
        The loss and its terms; extra peak memory is an fp32 ``[V, H]`` gradient (plus an fp32
        copy of a lower-precision weight), a ``[..., H]`` gradient and the chunk's
        temporaries, whatever the number of positions.

    Raises:
        ValueError: On bad shapes or settings, naming every problem at once.
    """
    problems = _settings_problems(alpha, temperature, top_k=top_k, chunk_tokens=chunk_tokens)
    problems += _student_problems("hidden", hidden, labels)
    if weight.dim() != 2 or weight.shape[-1:] != hidden.shape[-1:]:
        _raise_if([*problems, f"weight must be [V, H] with H = hidden.shape[-1], got "
                   f"{tuple(weight.shape)} for hidden {tuple(hidden.shape)}"])
    vocab = weight.shape[0]
    problems += _teacher_problems(alpha, (*hidden.shape[:-1], vocab), logits=teacher_logits,
                                  values=teacher_values, indices=teacher_indices, top_k=top_k)
    problems += _device_problems(hidden, weight=weight, labels=labels,
                                 teacher_logits=teacher_logits, teacher_values=teacher_values,
                                 teacher_indices=teacher_indices)
    _raise_if(problems)
    teacher = _Teacher.build(teacher_logits, teacher_values, teacher_indices, top_k=top_k,
                             vocab=vocab)
    settings = _Settings.build(alpha, temperature, chunk_tokens, vocab=vocab, device=hidden.device)
    return _distill(_HiddenStudent, (hidden, weight), labels, teacher, settings)


# ---------------------------------------------------------------------------------------------
# The shared math


def _chunk_terms(
    logits: Tensor,
    labels: Tensor,
    teacher: tuple[Tensor, Tensor | None] | None,
    *,
    alpha: float,
    temperature: float,
    grad_scale: float | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Loss sums over one chunk of kept positions and, optionally, their gradient.

    Full-size ops write in place where they can: on a CPU every fresh ``[c, V]`` tensor costs
    page faults, on any device it costs memory, and each extra pass costs bandwidth.

    Args:
        logits: ``[c, V]`` fp32 student logits, owned by this call: overwritten.
        labels: ``[c]`` int64 target ids (no -100 left).
        teacher: ``(log p_t, support)`` from `_Teacher.log_probs`, or None (CE only).
        alpha: Weight of the KL term.
        temperature: KL temperature.
        grad_scale: ``1 / kept positions`` (d mean / d sum), or None to skip the gradient.

    Returns:
        ``kl_sum`` and ``ce_sum``, 0-dim fp32 sums over the chunk, and the ``[c, V]`` fp32
        gradient of the whole batch's loss w.r.t. ``logits`` (or None).
    """
    log_p = torch.log_softmax(logits, dim=-1)  # [c, V]
    ce_sum = -log_p.gather(-1, labels[:, None]).sum()
    kl = None if teacher is None else _kl_terms(logits, *teacher, temperature=temperature)
    kl_sum = logits.new_zeros(()) if kl is None else kl[0]
    if grad_scale is None:
        return kl_sum, ce_sum, None
    # d CE / dz = softmax(z) - onehot(label)
    ce_weight = (1.0 - alpha) * grad_scale
    grad = log_p.exp_().mul_(ce_weight)
    grad.scatter_add_(-1, labels[:, None], grad.new_full((len(labels), 1), -ce_weight))
    if kl is not None:
        # d KL / dz = T * (softmax(z / T) - p_t), p_t being zero off its support.
        _, log_ps, p_t, support = kl
        kl_weight = alpha * temperature * grad_scale
        grad.add_(log_ps.exp_(), alpha=kl_weight)
        if support is None:
            grad.sub_(p_t, alpha=kl_weight)
        else:
            grad.scatter_add_(-1, support, p_t.mul_(-kl_weight))
    return kl_sum, ce_sum, grad


def _kl_terms(
    logits: Tensor, log_pt: Tensor, support: Tensor | None, *, temperature: float
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``T^2 * sum KL`` over a chunk, with the pieces its gradient needs.

    Args:
        logits: ``[c, V]`` fp32 student logits: overwritten.
        log_pt: ``[c, V]`` teacher log-probs, or ``[c, K]`` on ``support``: overwritten.
        support: ``[c, K]`` int64 vocabulary ids of ``log_pt``'s entries; None: all of them.
        temperature: KL temperature.

    Returns:
        ``kl_sum`` (0-dim), ``log_softmax(z_s / T)`` ``[c, V]``, ``p_t`` (shaped as ``log_pt``)
        and ``support``.
    """
    # The same op as the teacher's, so that a student equal to the teacher gives exactly 0.
    log_ps = torch.log_softmax(logits.div_(temperature), dim=-1)
    # The logits are spent: a dense teacher's probabilities reuse their memory.
    p_t = log_pt.exp() if support is not None else torch.exp(log_pt, out=logits)
    # Logits of -inf (a masked vocabulary entry) would give 0 * (-inf - -inf) = NaN; clamped to
    # the lowest float, they give the true term 0 (and exp() of them is still 0).
    lowest = torch.finfo(log_ps.dtype).min
    log_ps.clamp_(min=lowest)
    log_ps_on_support = log_ps if support is None else log_ps.gather(-1, support)
    terms = log_pt.clamp_(min=lowest).sub_(log_ps_on_support).mul_(p_t)
    return temperature**2 * terms.sum(), log_ps, p_t, support


@dataclass(frozen=True)
class _Teacher:
    """The teacher: ``logits`` ``[..., V]`` (``top_k`` None: whole vocabulary), or ``values``
    and ``indices`` ``[..., K]``; `log_probs` gives ``log p_t`` at some positions.
    """

    logits: Tensor | None
    values: Tensor | None
    indices: Tensor | None
    top_k: int | None

    @staticmethod
    def build(
        logits: Tensor | None,
        values: Tensor | None,
        indices: Tensor | None,
        *,
        top_k: int | None,
        vocab: int,
    ) -> _Teacher | None:
        if logits is None and values is None:
            return None
        detach = lambda t: None if t is None else t.detach()  # noqa: E731
        # Top-V renormalised is the softmax over the whole vocabulary, which needs no top-k.
        top_k = None if top_k is None or top_k >= vocab else top_k
        return _Teacher(detach(logits), detach(values), detach(indices), top_k)

    def log_probs(
        self, rows: tuple[Tensor, ...], *, temperature: float
    ) -> tuple[Tensor, Tensor | None]:
        """fp32 ``log p_t`` at positions ``rows`` (one index tensor per leading dim).

        Returns:
            ``[c, V]`` log-probs with support None (whole vocabulary), or ``[c, K]`` log-probs
            over their int64 vocabulary ids ``[c, K]``.
        """
        if self.logits is None:
            values, support = self.values[rows], self.indices[rows].long()
        elif self.top_k is None:
            values, support = self.logits[rows], None
        else:
            values, support = torch.topk(self.logits[rows], self.top_k, dim=-1)
        # Indexing made a copy (and float() one more for bf16/fp16): dividing it in place is safe.
        return torch.log_softmax(values.float().div_(temperature), dim=-1), support


# ---------------------------------------------------------------------------------------------
# Students: where a chunk's logits come from and where their gradient goes


# Positions are given as `rows`, one index tensor per leading dim, so that inputs sliced for the
# shift (logits[:, :-1]) are read where they are: flattening them would copy them whole.


class _LogitsStudent:
    """Student logits ``[..., V]``; their gradient is one buffer of the same size and dtype."""

    def __init__(self, logits: Tensor, *, needs_grad: tuple[bool, ...]):
        self.logits = logits
        self.grad = torch.zeros_like(logits) if needs_grad[0] else None

    @property
    def needs_grad(self) -> bool:
        return self.grad is not None

    def chunk_logits(self, rows: tuple[Tensor, ...]) -> Tensor:
        """``[c, V]`` fp32 logits of positions ``rows``: a copy, which the math overwrites."""
        return self.logits[rows].float()

    def backprop(self, rows: tuple[Tensor, ...], grad_logits: Tensor) -> None:
        self.grad.index_put_(rows, grad_logits.to(self.grad.dtype))

    def grads(self) -> tuple[Tensor | None, ...]:
        return (self.grad,)


class _HiddenStudent:
    """Student hidden states ``[..., H]`` and lm_head weight ``[V, H]``; logits exist per chunk."""

    def __init__(self, hidden: Tensor, weight: Tensor, *, needs_grad: tuple[bool, ...]):
        self.hidden = hidden
        # One fp32 copy of a bf16/fp16 weight (none for fp32), so every chunk's matmul is fp32.
        self.weight = weight.float()
        self.weight_dtype = weight.dtype
        self.grad_hidden = torch.zeros_like(hidden) if needs_grad[0] else None
        # Accumulated over chunks in fp32, cast to the weight's dtype once at the end.
        self.grad_weight = torch.zeros_like(self.weight) if needs_grad[1] else None

    @property
    def needs_grad(self) -> bool:
        return self.grad_hidden is not None or self.grad_weight is not None

    def chunk_logits(self, rows: tuple[Tensor, ...]) -> Tensor:
        """``[c, V]`` fp32 logits of positions ``rows``: a new tensor, which the math overwrites."""
        return self.hidden[rows].float() @ self.weight.T

    def backprop(self, rows: tuple[Tensor, ...], grad_logits: Tensor) -> None:
        if self.grad_hidden is not None:
            grad_hidden = grad_logits @ self.weight  # [c, H]
            self.grad_hidden.index_put_(rows, grad_hidden.to(self.grad_hidden.dtype))
        if self.grad_weight is not None:
            self.grad_weight.addmm_(grad_logits.T, self.hidden[rows].float())

    def grads(self) -> tuple[Tensor | None, ...]:
        if self.grad_weight is None:
            return self.grad_hidden, None
        return self.grad_hidden, self.grad_weight.to(self.weight_dtype)


_Student = _LogitsStudent | _HiddenStudent


# ---------------------------------------------------------------------------------------------
# The chunk loop and its autograd function


@dataclass(frozen=True)
class _Settings:
    alpha: float
    temperature: float
    chunk_tokens: int

    @staticmethod
    def build(
        alpha: float, temperature: float, chunk_tokens: int | None, *, vocab: int,
        device: torch.device,
    ) -> _Settings:
        if chunk_tokens is None:
            elements = _AUTO_CHUNK_ELEMENTS["cpu" if device.type == "cpu" else "other"]
            chunk_tokens = max(1, elements // vocab)
        return _Settings(float(alpha), float(temperature), chunk_tokens)


def _distill(
    make_student: Callable[..., _Student],
    inputs: tuple[Tensor, ...],
    labels: Tensor,
    teacher: _Teacher | None,
    settings: _Settings,
) -> LossResult:
    """Runs `_DistillFunction` on ``inputs``: ``[..., V]`` logits, or ``[..., H]`` and weight."""
    # [n, labels.dim()] coordinates of the kept positions; syncs with the GPU, once.
    kept = (labels != IGNORE_INDEX).nonzero()
    # Decided here because grad mode is always off inside an autograd function's forward.
    needs_grad = tuple(torch.is_grad_enabled() and t.requires_grad for t in inputs)
    loss, kl, ce = _DistillFunction.apply(
        make_student, needs_grad, labels, kept, teacher, settings, *inputs
    )
    return LossResult(loss=loss, kl=kl, ce=ce)


def _sweep(
    student: _Student, labels: Tensor, kept: Tensor, teacher: _Teacher | None, settings: _Settings
) -> tuple[Tensor, Tensor]:
    """Mean KL and CE over the ``kept`` positions; fills the student's gradients if it has any."""
    count = max(len(kept), 1)  # all positions ignored: sums of nothing, divided by 1
    grad_scale = 1.0 / count if student.needs_grad else None
    temperature = settings.temperature
    kl_sum = ce_sum = torch.zeros((), device=labels.device)
    for chunk in kept.split(settings.chunk_tokens):
        rows = chunk.unbind(1)
        log_pt = None if teacher is None else teacher.log_probs(rows, temperature=temperature)
        kl, ce, grad = _chunk_terms(
            student.chunk_logits(rows),
            labels[rows].long(),
            log_pt,
            alpha=settings.alpha,
            temperature=temperature,
            grad_scale=grad_scale,
        )
        kl_sum, ce_sum = kl_sum + kl, ce_sum + ce
        if grad is not None:
            student.backprop(rows, grad)
    return kl_sum / count, ce_sum / count


class _DistillFunction(torch.autograd.Function):
    """Forward computes the loss and its input gradients together; backward only scales them."""

    @staticmethod
    def forward(ctx, make_student, needs_grad, labels, kept, teacher, settings, *inputs):
        student = make_student(*inputs, needs_grad=needs_grad)
        # fp32 math even under autocast, which would run the hidden form's matmuls in bf16.
        with torch.autocast(labels.device.type, enabled=False):
            kl, ce = _sweep(student, labels, kept, teacher, settings)
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


# ---------------------------------------------------------------------------------------------
# Argument checks


def _settings_problems(
    alpha: float, temperature: float, *, top_k: int | None, chunk_tokens: int | None
) -> list[str]:
    problems = []
    if not 0.0 <= alpha <= 1.0:
        problems.append(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0.0:
        problems.append(f"temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        problems.append(f"top_k must be >= 1 or None (whole vocabulary), got {top_k}")
    if chunk_tokens is not None and chunk_tokens < 1:
        problems.append(f"chunk_tokens must be >= 1 or None (automatic), got {chunk_tokens}")
    return problems


def _student_problems(name: str, student: Tensor, labels: Tensor) -> list[str]:
    problems = []
    if not student.is_floating_point() or student.dim() < 2:
        problems.append(f"{name} must be a float tensor [..., D] with at least one position dim, "
                        f"got {student.dtype} {tuple(student.shape)}")
    elif student.shape[:-1] != labels.shape:
        problems.append(f"labels shape {tuple(labels.shape)} must equal {name}.shape[:-1] = "
                        f"{tuple(student.shape[:-1])}")
    if labels.is_floating_point() or labels.is_complex():
        problems.append(f"labels must be integer ids, got {labels.dtype}")
    return problems


def _teacher_problems(
    alpha: float,
    logits_shape: tuple[int, ...],
    *,
    logits: Tensor | None,
    values: Tensor | None,
    indices: Tensor | None,
    top_k: int | None = None,
) -> list[str]:
    """Problems with the teacher, given the student's logits shape ``[..., V]``."""
    sparse = values is not None or indices is not None
    if logits is not None and sparse:
        return ["give teacher_logits or teacher_values + teacher_indices, not both"]
    if logits is None and not sparse:
        return [] if alpha == 0 else [
            f"alpha = {alpha} > 0 needs a teacher: pass its logits or top-K values + indices, "
            "or set alpha = 0 for plain cross-entropy"]
    if logits is not None:
        if tuple(logits.shape) != tuple(logits_shape):
            return [f"teacher_logits shape {tuple(logits.shape)} must equal the student's logits "
                    f"shape {tuple(logits_shape)}"]
        return []
    return _sparse_teacher_problems(logits_shape, values, indices, top_k=top_k)


def _sparse_teacher_problems(
    logits_shape: tuple[int, ...], values: Tensor | None, indices: Tensor | None, *,
    top_k: int | None,
) -> list[str]:
    if values is None or indices is None:
        return ["teacher_values and teacher_indices go together: give both"]
    problems = []
    if top_k is not None:
        problems.append("top_k applies to teacher_logits; a sparse teacher is already its top-K")
    if values.shape != indices.shape or tuple(values.shape[:-1]) != tuple(logits_shape[:-1]):
        problems.append(f"teacher_values {tuple(values.shape)} and teacher_indices "
                        f"{tuple(indices.shape)} must both be [..., K] with [...] = "
                        f"{tuple(logits_shape[:-1])}")
    elif values.shape[-1] < 1:
        problems.append("teacher_values must hold at least one entry per position (K >= 1)")
    if not values.is_floating_point():
        problems.append(f"teacher_values must be floats, got {values.dtype}")
    if indices.dtype not in (torch.int64, torch.int32):
        problems.append(f"teacher_indices must be int64 or int32, got {indices.dtype}")
    return problems


def _device_problems(student: Tensor, **others: Tensor | None) -> list[str]:
    return [f"{name} is on {other.device} but the student on {student.device}: move it there"
            for name, other in others.items()
            if other is not None and other.device != student.device]


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise ValueError("\n".join(problems))
