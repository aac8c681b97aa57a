"""The launcher's one view of its workers: their printed lines, once each with the worker's
name, and on a terminal, under them, a bar of the study's trials and a bar per worker, moved by
the events the workers send (``events``)."""

from __future__ import annotations

import signal
from collections import Counter

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from kdsweep import events


class LaunchView:
    """The workers' lines, each once with its worker's name; on a terminal, under them, a bar of
    the study's trials (with the best so far) and one bar per worker for its running trial, both
    moved by the workers' events."""

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
            self._start_bars(names, target)

    def _start_bars(self, names: list[str], target: int) -> None:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
        )
        self._bars = Progress(*columns, console=self.console)
        self._bars.start()
        self._tasks["trials"] = self._bars.add_task("trials", total=target, info="best -")
        for name in names:
            self._tasks[name] = self._bars.add_task(name, total=self._steps, info="preparing")

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
        """An event the worker sent (``events``): it moves the bars and the counts."""
        kind = event["event"]
        if kind == events.STEP:
            self._update(name, completed=event.get("step", 0), info=event.get("info", ""))
        elif kind == events.TRIAL_STARTED:
            self._update(
                name,
                completed=0,
                total=event.get("steps"),
                description=f"{name} {event.get('title', '')}",
                info=event.get("label", ""),
            )
        elif kind == events.TRIAL_FINISHED:
            self.trials_done[name] += 1
            self._update("trials", advance=1, info=f"best {event.get('best', '-')}")
        elif kind == events.STUDY and not self._seen_study:
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
