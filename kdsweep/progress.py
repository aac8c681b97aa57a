"""Progress of a sweep: rich bars on a terminal, plain log lines anywhere else (CI, log files),
and, in a worker that ``run --workers`` launched, events for the launcher's view (``events``)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kdsweep.events import STEP, STUDY, TRIAL_FINISHED, TRIAL_STARTED, EventWriter
from kdsweep.names import TrialAttr
from kdsweep.redact import redact
from kdsweep.space import describe


def trial_title(number: int, attrs: dict) -> str:
    """How a trial is named: "trial 3", or, for a seed-check run, the trial it runs again."""
    checked = attrs.get(TrialAttr.SEED_CHECK_OF)
    if checked is None:
        return f"trial {number}"
    return f"seed check of trial {checked}, seed {attrs.get(TrialAttr.SEED)}"


def values_text(values: list[float]) -> str:
    """A trial's objective value, or its values: "5.2119", "5.2119, 0.358"."""
    return ", ".join(f"{v:.4f}" for v in values)


class SweepProgress:
    """Study bar (trials done, best so far) and trial bar (step, loss, tokens/s)."""

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

    def study_started(self, name: str, *, done: int, target: int) -> None:
        self._send(STUDY, done=done, target=target)
        self.message(
            f"study {name!r}: {done} of {target} trials finished, running {target - done} more"
        )
        if not self.live:
            return
        self._bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.console,
        )
        self._bars.start()
        self._study_task = self._bars.add_task(
            "trials", total=target, completed=done, info="best -"
        )

    def trial_started(self, trial, params: dict, steps: int) -> None:
        text = describe(params, short=True)
        title = trial_title(trial.number, trial.user_attrs)
        self._trial = trial.number
        self._send(TRIAL_STARTED, trial=trial.number, title=title, label=text, steps=steps)
        if not self.live:
            self.message(f"{title} started: {text}")
            return
        if self._trial_task is not None:
            self._bars.remove_task(self._trial_task)
        self._trial_task = self._bars.add_task(title, total=steps, info=text)

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

    def _send(self, event: str, **fields) -> None:
        if self.events is not None:
            self.events.send(event, **fields)

    def close(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None
