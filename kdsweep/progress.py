"""What a person sees while a study runs: rich bars on a terminal, plain log lines anywhere else
(CI, log files), and, for ``run --workers N``, the launcher's one view of its workers.

**A worker** (:class:`SweepProgress`) shows a bar of the study's trials, one of the running
trial's steps, and a bar for each long phase outside trials (the teacher cache, the references,
the finals). In a worker that ``run --workers`` launched it also sends *events* to its launcher:
one JSON object per line, on a pipe of its own (``KDSWEEP_EVENTS_FD``)::

    {"event": "study", "done": 3, "target": 9}                         the study opened
    {"event": "trial_started", "trial": 4, "title": "trial 4", "label": "a=0.52 ...", "steps": 500}
    {"event": "step", "trial": 4, "step": 20, "info": "loss 1.2  40,000 tok/s"}
    {"event": "trial_finished", "trial": 4, "state": "complete", "best": "trial 3 (3.957)"}
    {"event": "phase", "title": "teacher cache", "done": 120, "total": 1000, "unit": "rows"}

**The launcher** (:class:`LaunchView`) shows each worker's printed lines once, prefixed with its
name; on a terminal, under them, a bar of the study's trials and one per worker, moved by the
events. What either side prints is for people only, shown as it is and never parsed.

Imports rich and kdsweep's leaves only: every layer may report progress.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from kdsweep.names import TrialAttr
from kdsweep.redact import redact

EVENTS_FD = "KDSWEEP_EVENTS_FD"
STUDY, TRIAL_STARTED, STEP, TRIAL_FINISHED, PHASE = (
    "study",
    "trial_started",
    "step",
    "trial_finished",
    "phase",
)
PHASE_LINES_SECONDS = 30.0  # off a terminal, a long phase prints a line at most this often


def bars(console: Console) -> Progress:
    """The bars every view draws: what, how far, how many of how many, a note, time spent and
    time left."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def trial_title(number: int, attrs: dict) -> str:
    """How a trial is named: "trial 3", or, for a seed-check run or a control, the trial it runs
    again."""
    if (controlled := attrs.get(TrialAttr.CONTROL_OF)) is not None:
        return f"control of trial {controlled} (alpha 0)"
    checked = attrs.get(TrialAttr.SEED_CHECK_OF)
    if checked is None:
        return f"trial {number}"
    return f"seed check of trial {checked}, seed {attrs.get(TrialAttr.SEED)}"


def values_text(values: list[float]) -> str:
    """A trial's objective value, or its values: "5.2119", "5.2119, 0.358"."""
    return ", ".join(f"{v:.4f}" for v in values)


# ---------------------------------------------------------------------------------------------
# A worker


class SweepProgress:
    """Study bar (trials done, best so far), trial bar (step, loss, tokens/s), phase bars."""

    def __init__(self, console: Console | None = None, *, events: EventWriter | None = None):
        # No "progress.py:20" on each line, and a long line stays one line in a log file or a pipe.
        self.console = console or Console(stderr=True, log_path=False, soft_wrap=True)
        self.live = self.console.is_terminal
        self.events = events or EventWriter.from_environment()
        self._trial: int | None = None
        self._bars: Progress | None = None
        self._study_task = self._trial_task = None
        self._best = "-"

    def message(self, text: str) -> None:
        text = redact(text)  # a storage URL in a message keeps its password to itself
        self.console.log(text) if self.live else self.console.print(text, highlight=False)

    @contextmanager
    def phase(self, title: str, total: int, *, unit: str = "rows") -> Iterator[Phase]:
        """A long stretch outside trials (``total`` ``unit`` to go through): a bar with its ETA
        on a terminal, a line now and then elsewhere, an event for a launcher."""
        phase = Phase(self, title, total, unit)
        try:
            yield phase
        finally:
            phase.close()

    def study_started(self, name: str, *, done: int, target: int) -> None:
        self._send(STUDY, done=done, target=target)
        self.message(
            f"study {name!r}: {done} of {target} trials finished, running {target - done} more"
        )
        if not self.live:
            return
        self._start_bars()
        self._study_task = self._bars.add_task(
            "trials", total=target, completed=done, info="best -"
        )

    def trial_started(self, trial, label: str, steps: int) -> None:
        """``label``: the trial's parameters as its run name shows them."""
        title = trial_title(trial.number, trial.user_attrs)
        self._trial = trial.number
        self._send(TRIAL_STARTED, trial=trial.number, title=title, label=label, steps=steps)
        if not self.live:
            self.message(f"{title} started: {label}")
            return
        self._start_bars()
        if self._trial_task is not None:
            self._bars.remove_task(self._trial_task)
        self._trial_task = self._bars.add_task(title, total=steps, info=label)

    def step(self, log) -> None:
        info = f"loss {log.loss:.4f}  {log.tokens_per_second:,.0f} tok/s"
        self._send(STEP, trial=self._trial, step=log.step, info=info)
        if self.live and self._trial_task is not None:
            self._bars.update(self._trial_task, completed=log.step, info=info)
        elif not self.live and self.events is None:  # a launcher shows a worker's steps as its bar
            self.message(f"  step {log.step}: {info}")

    def trial_finished(self, trial, best) -> None:
        value = "" if trial.values is None else f" {values_text(trial.values)}"
        if best is not None:
            self._best = f"trial {best.number} ({values_text(best.values)})"
        self._send(
            TRIAL_FINISHED, trial=trial.number, state=trial.state.name.lower(), best=self._best
        )
        title = trial_title(trial.number, trial.user_attrs)
        self.message(f"{title} {trial.state.name.lower()}{value}; best: {self._best}")
        if self.live and self._study_task is not None:
            self._bars.update(self._study_task, advance=1, info=f"best {self._best}")

    def _start_bars(self) -> None:
        if self._bars is None:
            self._bars = bars(self.console)
            self._bars.start()

    def _send(self, event: str, **fields) -> None:
        if self.events is not None:
            self.events.send(event, **fields)

    def close(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None


class Phase:
    """One long phase's progress (see :meth:`SweepProgress.phase`): ``advance(n)`` as rows are
    done."""

    def __init__(self, progress: SweepProgress, title: str, total: int, unit: str):
        self.progress, self.title, self.total, self.unit = progress, title, total, unit
        self.done = 0
        self._task = None
        self._started = self._shown = time.monotonic()
        progress._send(PHASE, title=title, done=0, total=total, unit=unit)
        if progress.live:
            progress._start_bars()
            self._task = progress._bars.add_task(title, total=total, info=unit)
        else:
            progress.message(f"{title}: {total:,} {unit}")

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if self._task is not None:
            self.progress._bars.update(self._task, completed=self.done)
        elif now - self._shown >= PHASE_LINES_SECONDS:
            self._shown = now
            self.progress.message(f"{self.title}: {self._status(now)}")
        self.progress._send(
            PHASE, title=self.title, done=self.done, total=self.total, unit=self.unit
        )

    def _status(self, now: float) -> str:
        spent = now - self._started
        left = spent * (self.total - self.done) / self.done if self.done else None
        eta = f", about {left:.0f} s left" if left is not None else ""
        return f"{self.done:,} of {self.total:,} {self.unit} in {spent:.0f} s{eta}"

    def close(self) -> None:
        if self._task is not None and self.progress._bars is not None:
            self.progress._bars.remove_task(self._task)
        spent = time.monotonic() - self._started
        self.progress.message(f"{self.title}: {self.done:,} {self.unit} in {spent:.1f} s")


# ---------------------------------------------------------------------------------------------
# The events between a worker and its launcher


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


def parse_event(line: str) -> dict | None:
    """An event read from the pipe; None for anything that is not one."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


# ---------------------------------------------------------------------------------------------
# The launcher


class LaunchView:
    """The workers' lines, each once with its worker's name; on a terminal, under them, a bar of
    the study's trials (with the best so far) and one bar per worker for its running trial or
    phase, both moved by the workers' events."""

    def __init__(
        self, names: list[str], *, target: int, steps: int, console: Console | None = None
    ):
        self.console = console or Console(stderr=True, log_path=False)
        self.live = self.console.is_terminal
        self.trials_done: Counter[str] = Counter()  # trials each worker ended
        self._steps = steps
        self._seen_study = False
        self._bars: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        if self.live:
            self._bars = bars(self.console)
            self._bars.start()
            self._tasks["trials"] = self._bars.add_task("trials", total=target, info="best -")
            for name in names:
                self._tasks[name] = self._bars.add_task(name, total=steps, info="preparing")

    def message(self, text: str) -> None:
        # Text, not markup: a worker's line may hold brackets ("top_k=[4, 8]", a traceback).
        if self.live:
            self.console.log(Text(text))
        else:
            self.console.print(Text(text), soft_wrap=True)  # a pipe: never wrapped at 80 columns

    def line(self, name: str, line: str) -> None:
        """A line the worker printed, shown as it is."""
        text = line.rstrip("\n").rsplit("\r", 1)[-1]  # a bar redrawn with \r: its last state
        if text.strip():
            self.message(f"[{name}] {text}")

    def event(self, name: str, event: dict) -> None:
        """An event the worker sent: it moves the bars and the counts."""
        kind = event["event"]
        if kind == STEP:
            self._update(name, completed=event.get("step", 0), info=event.get("info", ""))
        elif kind == TRIAL_STARTED:
            self._update(
                name,
                completed=0,
                total=event.get("steps"),
                description=f"{name} {event.get('title', '')}",
                info=event.get("label", ""),
            )
        elif kind == PHASE:
            self._update(
                name,
                completed=event.get("done", 0),
                total=event.get("total"),
                description=f"{name} {event.get('title', '')}",
                info=event.get("unit", ""),
            )
        elif kind == TRIAL_FINISHED:
            self.trials_done[name] += 1
            self._update("trials", advance=1, info=f"best {event.get('best', '-')}")
        elif kind == STUDY and not self._seen_study:
            self._seen_study = True  # the first worker to open the study says what it held before
            self._update("trials", completed=event.get("done", 0))

    def ended(self, name: str, returncode: int) -> None:
        how = (
            f"exit {returncode}"
            if returncode >= 0
            else f"killed by {signal.Signals(-returncode).name}"
        )
        self._update(name, info=how)
        trials = self.trials_done[name]
        self.message(f"{name} ended ({how}) after {trials} trial{'s' * (trials != 1)}")

    def _update(self, key: str, **fields) -> None:
        if self._bars is not None and key in self._tasks:
            self._bars.update(self._tasks[key], **fields)

    def close(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None
