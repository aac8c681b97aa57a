"""The teacher's side of the loss: its log-probabilities at the loss temperature, chunk by chunk,
over the whole vocabulary or over K ids, and the tail that stands for the rest (see ``tail`` in
the `kdsweep.losses` docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from kdsweep.losses._math import LOG_TINY, TINY, TeacherChunk

Tail = Literal["renormalize", "bucket"]


@dataclass(frozen=True)
class TeacherInputs:
    """The teacher as a caller gives it: ``logits`` ``[..., V]``, or ``values`` and ``indices``
    ``[..., K]`` with, optionally, ``logsumexp`` ``[...]`` of all its logits / T.
    """

    logits: Tensor | None = None
    values: Tensor | None = None
    indices: Tensor | None = None
    logsumexp: Tensor | None = None


@dataclass(frozen=True)
class Teacher:
    """A checked, detached teacher; ``top_k`` None with ``logits``: the whole vocabulary."""

    inputs: TeacherInputs
    top_k: int | None
    tail: Tail

    @staticmethod
    def build(
        inputs: TeacherInputs, *, top_k: int | None, tail: Tail, vocab: int
    ) -> Teacher | None:
        if inputs.logits is None and inputs.values is None:
            return None
        detach = lambda t: None if t is None else t.detach()  # noqa: E731
        inputs = TeacherInputs(**{name: detach(t) for name, t in vars(inputs).items()})
        # Top-V renormalised is the softmax over the whole vocabulary, which needs no top-k.
        top_k = None if top_k is None or top_k >= vocab else top_k
        # K ids that cover the vocabulary leave no tail: both tails are the whole-vocabulary one.
        if inputs.values is not None and inputs.values.shape[-1] >= vocab:
            tail = "renormalize"
        return Teacher(inputs, top_k, tail)

    @property
    def whole_vocabulary(self) -> bool:
        return self.inputs.logits is not None and self.top_k is None

    def chunk(self, rows: tuple[Tensor, ...], *, temperature: float) -> TeacherChunk:
        """The teacher at positions ``rows`` (one index tensor per leading dim)."""
        logits = None if self.inputs.logits is None else self.inputs.logits[rows]
        if self.whole_vocabulary:
            return TeacherChunk(_scaled(logits, temperature).log_softmax(-1), None, None)
        if logits is None:
            values, support = self.inputs.values[rows], self.inputs.indices[rows].long()
        else:
            values, support = torch.topk(logits, self.top_k, dim=-1)
        scaled = _scaled(values, temperature)  # [c, K]
        if self.tail == "renormalize":
            return TeacherChunk(scaled.log_softmax(-1), support, None)
        if logits is None:
            log_p, log_rest = _bucket_from_normaliser(scaled, self.inputs.logsumexp[rows])
        else:
            log_p, log_rest = _bucket_from_logits(scaled, support, _scaled(logits, temperature))
        return TeacherChunk(log_p, support, log_rest.clamp_(min=LOG_TINY))


def _bucket_from_logits(
    scaled: Tensor, support: Tensor, scaled_logits: Tensor
) -> tuple[Tensor, Tensor]:
    """``log P`` on ``support`` and ``log P_rest`` ``[c, 1]`` from ``scaled`` ``[c, K]`` and the
    whole ``scaled_logits`` ``[c, V]`` (overwritten), all divided by T already.
    """
    log_norm = scaled_logits.logsumexp(-1, keepdim=True)
    # The tail summed where it lies, not taken as 1 - P(S), so that a small one keeps its digits.
    off_support = scaled_logits.scatter_(-1, support, -math.inf)
    return scaled.sub_(log_norm), off_support.logsumexp(-1, keepdim=True).sub_(log_norm)


def _bucket_from_normaliser(scaled: Tensor, logsumexp: Tensor) -> tuple[Tensor, Tensor]:
    """``log P`` on the K ids and ``log P_rest`` ``[c, 1]`` from ``scaled`` ``[c, K]`` (divided by
    T, overwritten) and the teacher's ``logsumexp`` ``[c]`` at the same temperature.
    """
    log_p = scaled.sub_(logsumexp.float()[:, None])
    return log_p, _log_one_minus_sum(log_p)


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """fp32 ``logits / T``; ``logits`` came from indexing or topk, a copy: divided in place."""
    return logits.float().div_(temperature)


def _log_one_minus_sum(log_p: Tensor) -> Tensor:
    """``log(1 - sum(exp(log_p)))`` over the last dim, ``[c, K]`` -> ``[c, 1]``.

    A sum close to 1 keeps ~1e-7 of absolute precision in fp32, a relative error of 1e-4 in a
    tail of 1e-3; ``1 - P_top`` from expm1 keeps its digits, leaving only the smaller terms.
    """
    top, at = log_p.max(-1, keepdim=True)
    others = log_p.exp().scatter_(-1, at, 0.0).sum(-1, keepdim=True)
    # Clamped: a kept mass rounded up to 1 or more leaves an empty tail.
    return (-torch.expm1(top)).sub_(others).clamp_(min=TINY).log_()
