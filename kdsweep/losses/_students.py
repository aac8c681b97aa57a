"""Students: where a block's logits come from and where their gradient goes.

Positions are given as ``rows``, one index tensor per leading dim, so that inputs sliced for the
shift (``logits[:, :-1]``) are read where they are: flattening them would copy them whole.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MIB = 2**20


class LogitsStudent:
    """Student logits ``[..., V]``; their gradient is one buffer of the same size and dtype.

    A block is one chunk of the math, whose gradient goes straight into the gradient buffer.
    """

    block_budget = None  # blocks are the math's chunks

    def __init__(self, logits: Tensor, *, needs_grad: tuple[bool, ...]):
        self.logits = logits
        self.grad = torch.zeros_like(logits) if needs_grad[0] else None

    @staticmethod
    def vocab(logits: Tensor) -> int:
        return logits.shape[-1]

    @property
    def needs_grad(self) -> bool:
        return self.grad is not None

    def block_logits(self, rows: tuple[Tensor, ...]) -> Tensor:
        """``[b, V]`` fp32 logits of positions ``rows``: a copy, which the math overwrites."""
        return self.logits[rows].float()

    def store_gradient(self, rows: tuple[Tensor, ...], part: slice, grad_logits: Tensor) -> None:
        """The gradient ``[c, V]`` of positions ``rows``, rows ``part`` of their block."""
        self.grad.index_put_(rows, grad_logits.to(self.grad.dtype))

    def backprop(self, rows: tuple[Tensor, ...]) -> None:
        """The block of positions ``rows`` is done: its gradient is stored already."""

    def grads(self) -> tuple[Tensor | None, ...]:
        return (self.grad,)


class HiddenStudent:
    """Student hidden states ``[..., H]`` and lm_head weight ``[V, H]``; logits exist per block."""

    # Bytes of the one fp32 [block, V] logits buffer by default. Each block reads the whole [V, H]
    # weight three times (logits, hidden and weight gradients), so short blocks make the matmuls
    # memory-bound: on a 2-core CPU at V = 151,936, H = 1,024 they take 1.21x, 1.08x and 1.01x
    # the time of 1,024-token blocks at 128, 256 and 512 tokens. 192 MiB is 331 tokens there.
    block_budget = {"cpu": 192 * _MIB, "other": 1024 * _MIB}

    def __init__(self, hidden: Tensor, weight: Tensor, *, needs_grad: tuple[bool, ...]):
        self.hidden = hidden
        # One fp32 copy of a bf16/fp16 weight (none for fp32), so every block's matmul is fp32.
        self.weight = weight.float()
        self.weight_dtype = weight.dtype
        self.grad_hidden = torch.zeros_like(hidden) if needs_grad[0] else None
        # Accumulated over blocks in fp32, cast to the weight's dtype once at the end.
        self.grad_weight = torch.zeros_like(self.weight) if needs_grad[1] else None
        # Reused by every block: on a CPU a fresh tensor this large costs its page faults again.
        self.buffer: Tensor | None = None

    @staticmethod
    def vocab(hidden: Tensor, weight: Tensor) -> int:
        return weight.shape[0]

    @property
    def needs_grad(self) -> bool:
        return self.grad_hidden is not None or self.grad_weight is not None

    def block_logits(self, rows: tuple[Tensor, ...]) -> Tensor:
        """``[b, V]`` fp32 logits of positions ``rows`` in the buffer: the math overwrites them."""
        hidden = self.hidden[rows].float()
        if self.buffer is None or len(self.buffer) < len(hidden):
            self.buffer = hidden.new_empty(len(hidden), len(self.weight))
        return torch.matmul(hidden, self.weight.T, out=self.buffer[: len(hidden)])

    def store_gradient(self, rows: tuple[Tensor, ...], part: slice, grad_logits: Tensor) -> None:
        """The gradient ``[c, V]`` of rows ``part`` of the block takes their spent logits'
        place."""
        self.buffer[part].copy_(grad_logits)

    def backprop(self, rows: tuple[Tensor, ...]) -> None:
        """The block of positions ``rows`` is done: its gradient goes through the matmuls."""
        grad_logits = self.buffer[: len(rows[0])]  # [b, V]
        if self.grad_hidden is not None:
            grad_hidden = grad_logits @ self.weight  # [b, H]
            self.grad_hidden.index_put_(rows, grad_hidden.to(self.grad_hidden.dtype))
        if self.grad_weight is not None:
            self.grad_weight.addmm_(grad_logits.T, self.hidden[rows].float())

    def grads(self) -> tuple[Tensor | None, ...]:
        if self.grad_weight is None:
            return self.grad_hidden, None
        return self.grad_hidden, self.grad_weight.to(self.weight_dtype)


Student = LogitsStudent | HiddenStudent
