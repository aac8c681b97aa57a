"""The three entry points: the same loss from student logits and a full or top-k teacher, from
student logits and a top-K teacher, or from the student's hidden states and output weight.
"""

from __future__ import annotations

from torch import Tensor

from kdsweep.losses._checks import Options
from kdsweep.losses._chunks import LossResult, chunked_loss
from kdsweep.losses._students import HiddenStudent, LogitsStudent
from kdsweep.losses._teacher import TeacherInputs


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    *,
    alpha: float,
    temperature: float,
    top_k: int | None = None,
    beta: float = 0.0,
    chunk_tokens: int | None = None,
) -> LossResult:
    """Distillation loss from student and teacher logits.

    Args:
        student_logits: ``[..., V]`` student logits, any float dtype.
        teacher_logits: ``[..., V]`` raw teacher logits, any float dtype; may be None when
            ``alpha == 0``.
        labels: ``[...]`` target ids; -100 marks a position ignored by both terms.
        alpha: Weight of the divergence term, in [0, 1].
        temperature: Softens both distributions in the divergence term; > 0.
        top_k: Keep the teacher's ``top_k`` largest logits only, renormalised over them (the
            student too at ``beta == 1``, where its mass elsewhere would make the divergence
            infinite; details in the `kdsweep.losses` docstring); None, or ``top_k >= V``, uses
            the whole vocabulary.
        beta: The divergence, TRL's generalized JSD: 0 is KL(teacher || student), 1 is
            KL(student || teacher), in between ``beta * KL(P || M) + (1 - beta) * KL(Q || M)``
            with ``M = beta * P + (1 - beta) * Q``.
        chunk_tokens: Positions per chunk; None sizes chunks so that their fp32 ``[chunk, V]``
            temporaries fit in 136 MiB on a CPU (58 positions at V = 151,936 with a full teacher
            and forward KL) and 512 MiB on a GPU.

    Returns:
        The loss and its terms; extra peak memory is one ``[..., V]`` gradient buffer plus the
        chunk's temporaries.

    Raises:
        ValueError: On bad shapes or settings, naming every problem at once.

    Example:
        >>> student = torch.randn(2, 3, 10, requires_grad=True)
        >>> labels = torch.tensor([[1, 2, -100], [4, -100, 6]])
        >>> teacher = torch.randn(2, 3, 10)
        >>> result = distill_loss(student, teacher, labels, alpha=0.5, temperature=2.0, top_k=5)
        >>> result.loss.backward()
    """
    options = Options(alpha, temperature, beta, top_k, chunk_tokens)
    teacher = TeacherInputs(logits=teacher_logits)
    return chunked_loss(LogitsStudent, (student_logits,), labels, teacher, options)


def distill_loss_sparse(
    student_logits: Tensor,
    teacher_values: Tensor,
    teacher_indices: Tensor,
    labels: Tensor,
    *,
    alpha: float,
    temperature: float,
    beta: float = 0.0,
    chunk_tokens: int | None = None,
) -> LossResult:
    """Distillation loss from student logits and the teacher's top-K logits (e.g. from a cache).

    Equals `distill_loss` with ``top_k=K`` given the same K values and ids: the teacher is
    renormalised over them.

    Args:
        student_logits: ``[..., V]`` student logits, any float dtype.
        teacher_values: ``[..., K]`` the teacher's K largest raw logits, any float dtype.
        teacher_indices: ``[..., K]`` their vocabulary ids, int64 or int32.
        labels: ``[...]`` target ids; -100 marks a position ignored by both terms.
        alpha, temperature, beta: As in `distill_loss`.
        chunk_tokens: As in `distill_loss`.

    Returns:
        The loss and its terms.

    Raises:
        ValueError: On bad shapes or settings, naming every problem at once.
    """
    options = Options(alpha, temperature, beta, None, chunk_tokens)
    teacher = TeacherInputs(None, teacher_values, teacher_indices)
    return chunked_loss(LogitsStudent, (student_logits,), labels, teacher, options)


def distill_loss_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    teacher_logits: Tensor | None = None,
    top_k: int | None = None,
    teacher_values: Tensor | None = None,
    teacher_indices: Tensor | None = None,
    alpha: float,
    temperature: float,
    beta: float = 0.0,
    chunk_tokens: int | None = None,
) -> LossResult:
    """Distillation loss from the student's hidden states, never holding its full logits.

    Student logits are ``hidden @ weight.T``, made one block of positions at a time in fp32, and
    the gradients w.r.t. ``hidden`` and ``weight`` are accumulated in the same pass. Give the
    teacher as ``teacher_logits`` (optionally with ``top_k``) or as ``teacher_values`` with
    ``teacher_indices``, or not at all when ``alpha == 0``.

    Args:
        hidden: ``[..., H]`` the student's last hidden states, any float dtype.
        weight: ``[V, H]`` the student's lm_head weight (may be tied to the input embedding).
        labels: ``[...]`` target ids; -100 marks a position ignored by both terms.
        teacher_logits: ``[..., V]`` raw teacher logits.
        top_k: With ``teacher_logits``, keep its top_k largest only, as in `distill_loss`.
        teacher_values, teacher_indices: As in `distill_loss_sparse`.
        alpha, temperature, beta: As in `distill_loss`.
        chunk_tokens: Positions per block, whose logits, then their gradient, are one fp32
            ``[block, V]`` buffer; None fits it in 192 MiB on a CPU (331 positions at
            V = 151,936) and 1 GiB on a GPU. Each block reads the weight three times (logits,
            hidden and weight gradients), so blocks much shorter than the hidden size turn the
            matmuls memory-bound. The math within goes over chunks sized as in `distill_loss`.

    Returns:
        The loss and its terms; extra peak memory is an fp32 ``[V, H]`` gradient (plus an fp32
        copy of a lower-precision weight), a ``[..., H]`` gradient, the block's buffer and the
        chunk's temporaries, whatever the number of positions.

    Raises:
        ValueError: On bad shapes or settings, naming every problem at once.
    """
    options = Options(alpha, temperature, beta, top_k, chunk_tokens)
    teacher = TeacherInputs(teacher_logits, teacher_values, teacher_indices)
    return chunked_loss(HiddenStudent, (hidden, weight), labels, teacher, options)
