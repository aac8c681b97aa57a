"""The teacher's side of the loss: its log-probabilities at the loss temperature, chunk by chunk,
over the whole vocabulary or renormalised over K ids (see "A truncated teacher" in the
`kdsweep.losses` docstring).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdsweep.losses._math import TeacherChunk


@dataclass(frozen=True)
class TeacherInputs:
    """The teacher as a caller gives it: ``logits`` ``[..., V]``, or ``values`` and ``indices``
    ``[..., K]``.
    """

    logits: Tensor | None = None
    values: Tensor | None = None
    indices: Tensor | None = None


@dataclass(frozen=True)
class Teacher:
    """A checked, detached teacher; ``top_k`` None with ``logits``: the whole vocabulary."""

    inputs: TeacherInputs
    top_k: int | None

    @staticmethod
    def build(inputs: TeacherInputs, *, top_k: int | None, vocab: int) -> Teacher | None:
        if inputs.logits is None and inputs.values is None:
            return None
        detach = lambda t: None if t is None else t.detach()  # noqa: E731
        inputs = TeacherInputs(**{name: detach(t) for name, t in vars(inputs).items()})
        # Top-V renormalised is the softmax over the whole vocabulary, which needs no top-k.
        top_k = None if top_k is None or top_k >= vocab else top_k
        return Teacher(inputs, top_k)

    @property
    def whole_vocabulary(self) -> bool:
        return self.inputs.logits is not None and self.top_k is None

    def chunk(self, rows: tuple[Tensor, ...], *, temperature: float) -> TeacherChunk:
        """The teacher at positions ``rows`` (one index tensor per leading dim)."""
        logits = None if self.inputs.logits is None else self.inputs.logits[rows]
        if self.whole_vocabulary:
            return TeacherChunk(_scaled(logits, temperature).log_softmax(-1), None)
        if logits is None:
            values, support = self.inputs.values[rows], self.inputs.indices[rows].long()
        else:
            values, support = torch.topk(logits, self.top_k, dim=-1)
        # Renormalised over the K ids: the teacher has no mass off them.
        return TeacherChunk(_scaled(values, temperature).log_softmax(-1), support)


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """fp32 ``logits / T``; ``logits`` came from indexing or topk, a copy: divided in place."""
    return logits.float().div_(temperature)
