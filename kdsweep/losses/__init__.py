"""Distillation loss: ``alpha * T^2 * D(teacher, student) + (1 - alpha) * cross-entropy``.

Three entry points share one per-chunk formula (`_math.chunk_terms`):

- `distill_loss`: student logits and full teacher logits, over the whole vocabulary or its top-k.
- `distill_loss_sparse`: student logits and the teacher's K largest logits with their ids (a
cache).
- `distill_loss_from_hidden`: the student's last hidden states and lm_head weight, so the student's
  ``[N, V]`` logits never exist for the whole batch at once.

Formulas, with ``z_s``, ``z_t`` the student and teacher logits, ``T`` the temperature and means
taken over the kept positions (label != -100)::

    P    = softmax(z_t / T)    Q = softmax(z_s / T)    M = beta * P + (1 - beta) * Q
    D    = KL(P || Q)                                  beta = 0 (the default: forward KL)
         = KL(Q || P)                                  beta = 1 (reverse KL)
         = beta * KL(P || M) + (1 - beta) * KL(Q || M)  otherwise
    KL   = mean T^2 * D                                (`LossResult.kl`, whatever beta)
    CE   = mean -log_softmax(z_s)[label]
    loss = alpha * KL + (1 - alpha) * CE

``D`` is TRL's generalized Jensen-Shannon divergence (``generalized_jsd_loss``). As there, the
family is discontinuous at its ends: the mixture form tends to 0 as beta goes to 0 or 1.

A truncated teacher
-------------------

With ``top_k`` (or the sparse form's K ids), the teacher is known on a set ``S`` of ids only, while
the student has mass everywhere. The teacher is then ``P_S``, its kept entries renormalised over
``S``, zero elsewhere; the student keeps its whole distribution ``Q``.

- beta = 0: ``sum_S P_S * log(P_S / Q)``, ``log Q`` over the whole vocabulary: the contract
  kdsweep always had.
- 0 < beta < 1: exact for ``(P_S, Q)``. Off ``S``, ``M = (1 - beta) * Q``: the teacher adds
  nothing there, and the student's mass there, ``Q_rest``, adds
  ``(1 - beta) * Q_rest * log(1 / (1 - beta))``, which is exact for one bucket.
- beta = 1: ``KL(Q || P_S)`` would be infinite wherever ``Q`` has mass off ``S``, so the student
  is renormalised over ``S`` too: ``KL(Q_S || P_S)``. Its mass off ``S`` then gets no gradient
  from the divergence (the cross-entropy still sees it).

This equals the whole-vocabulary result when ``S`` is the whole vocabulary (``top_k >= V``, or
K = V ids). Zero probabilities never reach a log as 0: an empty tail (``Q_rest = 0``),
and a teacher's 0 in a reverse KL (a logit of -inf, such as a masked vocabulary entry), count as
the smallest normal fp32 (``log = -87.3``), so such a KL is large, not infinite.

How it is computed, and why
---------------------------

- Work goes over chunks of tokens, never of the vocabulary: a softmax over part of the vocabulary
  is a different distribution.
- The gradient has a closed form (``d CE / dz_s = softmax(z_s) - onehot(label)``, and for the
  divergence ``T * Q * (g - sum(Q * g))`` with ``g = dD / dQ``: ``T * (Q - P)`` for forward KL; see
  `_math`), so a custom autograd function computes it in the forward pass, chunk by chunk, and
  backward only scales it (the Liger-Kernel trick). Extra memory is then one gradient buffer the
  size of the student's input plus a few fp32 ``[chunk, V]`` temporaries, instead of several
  ``[N, V]`` copies.
- ``chunk_tokens=None`` sizes the work from byte budgets, not token counts. The math's fp32
  ``[chunk, V]`` temporaries (2 to 5 alive at once, counted per path by
  `_chunks.live_temporaries`) fit in 136 MiB on a CPU and 512 MiB on a GPU, small beside a
  gradient of ``[N, V]`` or ``[V, H]``. The hidden-state form makes its logits in blocks, one
  reused fp32 ``[block, V]`` buffer of 192 MiB on a CPU and 1 GiB on a GPU, because its matmuls
  need long blocks; the math goes over chunks of each block, whose gradient then replaces its
  logits for the two backward matmuls. An explicit ``chunk_tokens`` sets the chunk (logits
  forms) or the block (hidden form).
- Math is fp32 whatever the input dtype; each chunk is upcast on its own. Divergences are taken in
  logs (``log M`` by logsumexp), so nothing underflows to ``log 0``. At very high temperatures
  (T of 1e3 and more) ``D`` shrinks as ``1 / T^2`` below the rounding of its fp32 terms: its value
  is then noise, while its gradient keeps its digits.

Conventions: ``logits[..., i, :]`` predicts ``labels[..., i]`` (the caller shifts); the teacher is
a
constant (it gets no gradient); `LossResult.kl` and `LossResult.ce` are detached values for logging
and only `LossResult.loss` carries a gradient; backward can run once per call, as in a training
step (a second backward through the same result raises torch's in-place modification error).
"""

from __future__ import annotations

from kdsweep.losses._api import distill_loss, distill_loss_from_hidden, distill_loss_sparse
from kdsweep.losses._chunks import IGNORE_INDEX, LossResult

__all__ = [
    "IGNORE_INDEX",
    "LossResult",
    "distill_loss",
    "distill_loss_from_hidden",
    "distill_loss_sparse",
]
