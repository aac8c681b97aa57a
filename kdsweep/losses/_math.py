"""The per-chunk math that every entry point shares: cross-entropy, the generalized
Jensen-Shannon divergence, and their closed-form gradients w.r.t. the student's logits.

The divergence's gradient. Per position, with ``Q = softmax(z / T)`` and ``g_v = dD / dQ_v``::

    d(T^2 * D) / dz_u = T * (w_u - Q_u * W),      w = Q * g,   W = sum_v w_v

    forward KL (beta = 0):   w = -P                            (W = -1, so T * (Q - P))
    reverse KL (beta = 1):   w = Q * (log Q - log P)           (W = D; g's "+ 1" cancels)
    mixture:                 w = (1 - beta) * Q * log(Q / M)

Anything proportional to ``Q`` may be added to ``w``: it cancels in ``w - Q * W``.

Every ``[c, V]`` tensor here is fp32 and owned by the call; ops write in place where they can: on
a CPU every fresh ``[c, V]`` tensor costs page faults, on any device it costs memory, and each
extra pass costs bandwidth. `_chunks.live_temporaries` counts the ones each path keeps alive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# A probability of 0 (a masked vocabulary entry, an empty tail) enters a log as the smallest
# normal fp32 where a log(0) = -inf would make a reverse KL infinite (log = -87.3).
TINY = torch.finfo(torch.float32).tiny
LOG_TINY = math.log(TINY)
# Elsewhere -inf log-probs are clamped to the lowest float: 0 * (lowest - x) is the true term 0,
# where 0 * (-inf - x) would be NaN, and exp(lowest) is still 0.
LOWEST = torch.finfo(torch.float32).min


@dataclass(frozen=True)
class TeacherChunk:
    """The teacher at one chunk of ``c`` positions, at the loss temperature.

    Attributes:
        log_p: ``[c, V]`` fp32 log-probs (``support`` None), or ``[c, K]`` on ``support``,
            renormalised over it: the teacher has no mass off it.
        support: ``[c, K]`` int64 vocabulary ids, or None for the whole vocabulary.
    """

    log_p: Tensor
    support: Tensor | None


def chunk_terms(
    logits: Tensor,
    labels: Tensor,
    teacher: TeacherChunk | None,
    *,
    alpha: float,
    beta: float,
    temperature: float,
    grad_scale: float | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Loss sums over one chunk of kept positions and, optionally, their gradient.

    Args:
        logits: ``[c, V]`` fp32 student logits, owned by this call: overwritten.
        labels: ``[c]`` int64 target ids (no -100 left).
        teacher: The teacher at these positions (its tensors are overwritten), or None (CE only).
        alpha: Weight of the divergence term.
        beta: The generalized JSD's mixture weight, in [0, 1].
        temperature: Divergence temperature.
        grad_scale: ``1 / kept positions`` (d mean / d sum), or None to skip the gradient.

    Returns:
        ``kl_sum`` (``T^2`` times the divergence) and ``ce_sum``, 0-dim fp32 sums over the chunk,
        and the ``[c, V]`` fp32 gradient of the whole batch's loss w.r.t. ``logits`` (or None).
    """
    log_p = torch.log_softmax(logits, dim=-1)  # [c, V]
    ce_sum = -log_p.gather(-1, labels[:, None]).sum()
    divergence = None
    if teacher is not None:
        divergence = _divergence(logits, teacher, beta=beta, temperature=temperature)
    del logits  # spent, or holding one of the divergence's tensors
    kl_sum = log_p.new_zeros(()) if divergence is None else divergence.value
    if grad_scale is None:
        return kl_sum, ce_sum, None
    # d CE / dz = softmax(z) - onehot(label)
    ce_weight = (1.0 - alpha) * grad_scale
    grad = log_p.exp_().mul_(ce_weight)
    grad.scatter_add_(-1, labels[:, None], grad.new_full((len(labels), 1), -ce_weight))
    if divergence is not None:
        divergence.add_gradient(grad, weight=alpha * temperature * grad_scale)
    return kl_sum, ce_sum, grad


@dataclass(frozen=True)
class _Divergence:
    """A chunk's ``T^2 * sum of D`` and its gradient ``T * (w - Q * W)``, held as a dense part
    ``q_dense * dense_coef`` (``[c, V]`` times a scalar or ``[c, 1]``) plus ``part``, which is
    ``[c, V]`` (``support`` None) or ``[c, K]`` on ``support``.
    """

    value: Tensor
    part: Tensor
    support: Tensor | None
    q_dense: Tensor | None
    dense_coef: Tensor | float

    def add_gradient(self, grad: Tensor, *, weight: float) -> None:
        """``grad += weight * (w - Q * W)``: the term's gradient for ``weight = alpha * T / n``."""
        if self.q_dense is not None and isinstance(self.dense_coef, float):
            grad.add_(self.q_dense, alpha=weight * self.dense_coef)
        elif self.q_dense is not None:
            grad.addcmul_(self.q_dense, self.dense_coef, value=weight)
        if self.support is None:
            grad.add_(self.part, alpha=weight)
        else:
            grad.scatter_add_(-1, self.support, self.part.mul_(weight))


def _divergence(
    logits: Tensor, teacher: TeacherChunk, *, beta: float, temperature: float
) -> _Divergence:
    """The divergence of one chunk; ``logits`` ``[c, V]`` and the teacher's tensors are spent."""
    if teacher.support is not None and beta == 1.0:
        return _renormalized_reverse_kl(logits, teacher, temperature=temperature)
    # The same op as the teacher's, so that a student equal to the teacher gives exactly 0.
    log_q = torch.log_softmax(logits.div_(temperature), dim=-1)  # [c, V]
    if teacher.support is None:
        jsd = _jsd(teacher.log_p, log_q, beta=beta, scratch=logits)  # the logits are spent
        return _Divergence(temperature**2 * jsd.value, jsd.w, None, jsd.q, -jsd.total)
    value, part, q_dense, dense_coef = _truncated(log_q, teacher, beta=beta)
    return _Divergence(temperature**2 * value, part, teacher.support, q_dense, dense_coef)


def _renormalized_reverse_kl(
    logits: Tensor, teacher: TeacherChunk, *, temperature: float
) -> _Divergence:
    """``KL(Q_S || P_S)``: the student renormalised over the teacher's support ``S`` too, as
    ``KL(Q || P_S)`` is infinite wherever ``Q`` has mass off ``S``; only ``S`` gets a gradient.
    """
    support = teacher.support
    log_q = logits.gather(-1, support).div_(temperature).log_softmax(-1)  # [c, K]
    jsd = _jsd(teacher.log_p, log_q, beta=1.0)
    return _Divergence(temperature**2 * jsd.value, jsd.w - jsd.q * jsd.total, support, None, 0.0)


def _truncated(
    log_q: Tensor, teacher: TeacherChunk, *, beta: float
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | float]:
    """The divergence against a teacher renormalised over ``K`` ids (``_Divergence``'s fields
    but the support), beta < 1: the whole student against the teacher, which is 0 off its ids.
    """
    support = teacher.support
    log_q_kept = log_q.gather(-1, support)  # [c, K]
    q = log_q.exp_()  # [c, V]
    if beta == 0.0:
        # The teacher has no mass off S, where forward KL then has no terms: no rest bucket.
        jsd = _jsd(teacher.log_p, log_q_kept, beta=beta)
        return jsd.value, jsd.w, q, -jsd.total
    # One bucket for the rest of the vocabulary, where the teacher has nothing; the student's
    # mass there is summed where it is, not taken as 1 - Q(S), so that a small tail keeps its
    # digits.
    q_off = q.scatter_(-1, support, 0.0)
    log_q_rest = q_off.sum(-1, keepdim=True).clamp_(min=TINY).log_()
    log_p_rest = torch.full_like(log_q_rest, -math.inf)
    log_p = torch.cat([teacher.log_p, log_p_rest], dim=-1)  # [c, K + 1]
    jsd = _jsd(log_p, torch.cat([log_q_kept, log_q_rest], dim=-1), beta=beta)
    w, w_rest = jsd.w[:, :-1], jsd.w[:, -1:]
    q_kept, q_rest = jsd.q[:, :-1], jsd.q[:, -1:]
    # Off S every id shares the bucket's g = w_rest / q_rest: T * q_v * (g - W) there. On S the
    # dense part is zero (q_off), which keeps a huge g (a tiny floored Q_rest) away from Q(S).
    # (q_rest of 0, from an underflow at beta ~ 1, has w_rest 0 too: clamped, g = 0, not NaN.)
    g_rest = w_rest / q_rest.clamp(min=TINY)
    return jsd.value, w - q_kept * jsd.total, q_off, g_rest - jsd.total


# ---------------------------------------------------------------------------------------------
# The generalized JSD over the last dim's E entries (the vocabulary, or K ids and a bucket)


@dataclass(frozen=True)
class _Jsd:
    """``value``: 0-dim sum over rows of D; ``w`` and ``q``: ``[c, E]``; ``total``: ``W``,
    ``[c, 1]`` or its exact value.
    """

    value: Tensor
    w: Tensor
    q: Tensor
    total: Tensor | float


def _jsd(log_p: Tensor, log_q: Tensor, *, beta: float, scratch: Tensor | None = None) -> _Jsd:
    """TRL's generalized JSD of ``log_p`` and ``log_q`` ``[c, E]`` (both overwritten); ``scratch``
    is a spent ``[c, E]`` tensor to reuse.
    """
    if beta == 0.0:
        return _forward_kl(log_p, log_q, scratch)
    if beta == 1.0:
        return _reverse_kl(log_p, log_q, scratch)
    return _mixture(log_p, log_q, beta, scratch)


def _forward_kl(log_p: Tensor, log_q: Tensor, scratch: Tensor | None) -> _Jsd:
    p = log_p.exp() if scratch is None else torch.exp(log_p, out=scratch)
    terms = log_p.clamp_(min=LOWEST).sub_(log_q.clamp_(min=LOWEST)).mul_(p)
    # W = -sum(P) = -1: P is a distribution over the entries.
    return _Jsd(terms.sum(), p.neg_(), log_q.exp_(), -1.0)


def _reverse_kl(log_p: Tensor, log_q: Tensor, scratch: Tensor | None) -> _Jsd:
    log_p.clamp_(min=LOG_TINY)  # a teacher's 0 would make it infinite
    log_q.clamp_(min=LOWEST)
    q = log_q.exp() if scratch is None else torch.exp(log_q, out=scratch)
    w = torch.sub(log_q, log_p, out=log_p).mul_(q)
    total = w.sum(-1, keepdim=True)
    return _Jsd(total.sum(), w, q, total)


def _mixture(log_p: Tensor, log_q: Tensor, beta: float, scratch: Tensor | None) -> _Jsd:
    # log M by logaddexp of the logs: from probabilities it would underflow to log 0 wherever
    # both P and Q are below fp32's range.
    log_beta, log_1m_beta = math.log(beta), math.log1p(-beta)
    a = log_p.clamp_(min=LOWEST).add_(log_beta)  # log(beta * P)
    b = log_q.clamp_(min=LOWEST).add_(log_1m_beta)  # log((1 - beta) * Q)
    log_m = torch.logaddexp(a, b) if scratch is None else torch.logaddexp(a, b, out=scratch)
    e = a.exp()
    terms = a.sub_(log_m).mul_(e)  # beta * P * log(beta * P / M)
    e = torch.exp(b, out=e)  # (1 - beta) * Q
    w = b.sub_(log_m).mul_(e)  # (1 - beta) * Q * log((1 - beta) * Q / M)
    # beta * KL(P || M) + (1 - beta) * KL(Q || M) = sum(terms + w) + the entropy of (beta, 1 -
    # beta)
    entropy = -beta * log_beta - (1.0 - beta) * log_1m_beta
    value = terms.add_(w).sum() + entropy * terms.shape[0]
    # w holds (1 - beta) * Q * log(Q / M) plus log(1 - beta) * (1 - beta) * Q, which cancels.
    return _Jsd(value, w, e.div_(1.0 - beta), w.sum(-1, keepdim=True))
