"""A trial's device time, split by what it was spent on: training steps, evaluation, generation,
checkpoint writes.

Parts nest, and each second goes to the innermost one open: the generation inside an on-policy
step or inside an evaluation's accuracy decoding counts as generation, not twice. The code marks
its parts with :func:`part`; a trial's objective opens the :class:`Clock` that counts them with
:func:`counting`. Outside one, :func:`part` costs nothing. The clock is found through a context
variable, not passed down: generation is reached from training and from evaluation, in layers
that know nothing of trials. Imports only kdsweep's names.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from kdsweep.names import Metric

# The parts a trial's time is spent on.
CACHED_STEP = "cached_step"  # a training step on the teacher's cache (or the teacher online)
ON_POLICY_STEP = "on_policy_step"  # a training step on the student's own completions
EVAL = "eval"  # an evaluation: perplexity, KL, accuracy
GENERATION = "generation"  # the student generating: on-policy completions, accuracy's answers
CHECKPOINT = "checkpoint"  # writing a resume checkpoint, copying the best one

_counting: ContextVar[Clock | None] = ContextVar("kdsweep_clock", default=None)


class Clock:
    """Seconds since it started, and by part: ``own`` (the part's own, nested parts excluded),
    ``total`` (nested parts included) and ``count`` (how many times the part ran)."""

    def __init__(self):
        self.started = time.perf_counter()
        self.own: dict[str, float] = defaultdict(float)
        self.total: dict[str, float] = defaultdict(float)
        self.count: dict[str, int] = defaultdict(int)
        self._open: list[list] = []  # [name, started, nested seconds] of each open part

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def mean(self, name: str) -> float | None:
        """A part's mean seconds per run, nested parts included (None: it never ran)."""
        return self.total[name] / self.count[name] if self.count.get(name) else None

    def cost(self) -> dict[str, float]:
        """The trial's cost as its run logs it: ``device_seconds`` (a trial holds one device: its
        worker's GPU, or the CPU) and its parts, and the mean seconds of each kind of training
        step it took."""
        own = self.own
        spent = {
            Metric.DEVICE_SECONDS: self.seconds,
            Metric.TRAIN_SECONDS: own[CACHED_STEP] + own[ON_POLICY_STEP],
            Metric.EVAL_SECONDS: own[EVAL],
            Metric.GENERATION_SECONDS: own[GENERATION],
            Metric.CHECKPOINT_SECONDS: own[CHECKPOINT],
        }
        for part, name in (
            (CACHED_STEP, Metric.CACHED_STEP_SECONDS),
            (ON_POLICY_STEP, Metric.ON_POLICY_STEP_SECONDS),
        ):
            if (mean := self.mean(part)) is not None:
                spent[name] = mean
        return spent

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        entry = [name, time.perf_counter(), 0.0]
        self._open.append(entry)
        try:
            yield
        finally:
            self._open.pop()
            spent = time.perf_counter() - entry[1]
            self.total[name] += spent
            self.own[name] += spent - entry[2]
            self.count[name] += 1
            if self._open:
                self._open[-1][2] += spent


@contextmanager
def counting(clock: Clock) -> Iterator[Clock]:
    """Count every :func:`part` opened inside on ``clock``."""
    token = _counting.set(clock)
    try:
        yield clock
    finally:
        _counting.reset(token)


@contextmanager
def part(name: str) -> Iterator[None]:
    """Mark a stretch as ``name`` on the clock counting, if any."""
    clock = _counting.get()
    if clock is None:
        yield
        return
    with clock.part(name):
        yield
