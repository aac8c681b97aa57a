"""Stopping a worker between steps: SIGTERM (preemption: a spot instance reclaimed, Slurm's
``--signal``, a Kubernetes eviction) and Ctrl-C.

The sweep's signal handlers call :func:`request`. While trials run (see :func:`deferred`) the
request waits for a safe point, so that no write to the storage or MLflow is cut in half (an
exception raised inside SQLAlchemy's commit leaves its session broken): the end of a training
step, where on SIGTERM the loop checkpoints its trial and raises :class:`Preempted` (the worker
exits 143) and on Ctrl-C raises KeyboardInterrupt (130), or the end of a trial. Anywhere else the
request is raised at once. Imports nothing of kdsweep.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

EXIT_STATUS = 143  # 128 + SIGTERM, as a process killed by it would report
PREEMPTED, INTERRUPTED = "preempted", "interrupted"  # what a request asks for


class Preempted(KeyboardInterrupt):
    """The worker was asked to stop; ``step`` is where its trial's checkpoint was written (None:
    no trial was training). A KeyboardInterrupt, so that Optuna ends the trial and re-raises it,
    and no ``except Exception`` swallows it."""

    def __init__(self, step: int | None = None):
        self.step = step
        super().__init__(f"preempted at step {step}" if step is not None else "preempted")


class _State:
    requested: str | None = None
    deferring = 0  # how many deferred() blocks are open


def request(kind: str) -> None:
    """Ask the running trial to stop after its step (``PREEMPTED`` or ``INTERRUPTED``); outside
    a deferred block, stop now."""
    _State.requested = _State.requested or kind
    if not _State.deferring:
        raise_if_requested()


def requested() -> str | None:
    """What was asked for, if anything: ``PREEMPTED`` or ``INTERRUPTED``."""
    return _State.requested


def raise_if_requested(step: int | None = None) -> None:
    """Stop as asked: Preempted (its checkpoint at ``step``) or KeyboardInterrupt."""
    if _State.requested == PREEMPTED:
        raise Preempted(step)
    if _State.requested == INTERRUPTED:
        raise KeyboardInterrupt


@contextmanager
def deferred() -> Iterator[None]:
    """A stretch in which a request waits for the code to call :func:`raise_if_requested` (a
    training step's end, a trial's end); blocks nest."""
    _State.deferring += 1
    try:
        yield
    finally:
        _State.deferring -= 1


def reset() -> None:
    """Forget a request (a process that runs studies one after another, a test)."""
    _State.requested = None
