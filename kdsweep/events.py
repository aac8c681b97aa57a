"""What a launched worker tells its launcher: one JSON object per line, on a pipe of its own.

``kdsweep run --workers N`` gives each worker the write end of a pipe and its number in
``KDSWEEP_EVENTS_FD``. The worker's progress (``progress.SweepProgress``) writes these events to
it, and the launcher's view (``launch.LaunchView``) reads them; what either prints is for people
only, shown as it is and never parsed::

    {"event": "study", "done": 3, "target": 9}                         the study opened
    {"event": "trial_started", "trial": 4, "title": "trial 4", "label": "a=0.52 ...", "steps": 500}
    {"event": "step", "trial": 4, "step": 20, "info": "loss 1.2  40,000 tok/s"}
    {"event": "trial_finished", "trial": 4, "state": "complete", "best": "trial 3 (3.957)"}

Imports nothing of kdsweep.
"""

from __future__ import annotations

import functools
import json
import os

EVENTS_FD = "KDSWEEP_EVENTS_FD"
STUDY, TRIAL_STARTED, STEP, TRIAL_FINISHED = "study", "trial_started", "step", "trial_finished"


class EventWriter:
    """Writes events, one JSON line each, to a file descriptor the launcher reads."""

    def __init__(self, fd: int):
        self._file = os.fdopen(fd, "w", buffering=1)  # line-buffered: each event as it happens

    @staticmethod
    @functools.cache  # one writer per process: the pipe is opened once, and never closed early
    def from_environment() -> EventWriter | None:
        """The writer a launcher set up for this process, or None outside a launched worker."""
        fd = os.environ.get(EVENTS_FD)
        return EventWriter(int(fd)) if fd else None

    def send(self, event: str, **fields) -> None:
        try:
            self._file.write(json.dumps({"event": event, **fields}) + "\n")
        except (BrokenPipeError, ValueError, OSError):
            pass  # the launcher is gone: the worker's own work goes on, and its SIGTERM follows


def parse(line: str) -> dict | None:
    """An event read from the pipe; None for anything that is not one."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None
