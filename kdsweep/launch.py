"""``kdsweep run --workers N``: N worker processes on one study, one device each, and one view.

The launcher first prepares what the workers share: the demo's models, and the teacher's top-K
cache when the study uses one. So bad input stops it with exit 2 before any worker starts, and
no worker loads the teacher to build a cache that the others wait for. Then it starts N
``kdsweep run --no-report`` processes, each pinned to one GPU by ``CUDA_VISIBLE_DEVICES`` (inside
it, the GPU is ``cuda:0``) and given its share of the CPU threads. The workers coordinate
through the Optuna storage as any processes running the same study do (``sweep.study``); the
launcher only reads their output, forwards Ctrl-C and SIGTERM, and writes the report once they
have all ended well.

**One view.** Each worker's printed lines are shown once, as they are, prefixed ``[w0]``,
``[w1]``, ...: they are for people, and a worker's error (a traceback, a ``kdsweep:`` line) always
reaches the user. What the view counts and draws comes from the worker's events instead, JSON
lines on a pipe of its own (``progress``): its study, trials, phases and steps. A launched worker
prints no per-step lines; on a terminal its steps move its progress bar, under a bar of the
study's trials.

**Signals.** The workers run in their own session, so a terminal's Ctrl-C reaches the launcher
only, which forwards exactly one SIGINT (or SIGTERM) to each: a worker that got two could be
interrupted again while it closes its trial. Each worker ends its running trial INTERRUPTED and
exits 130; the launcher waits ``STOP_GRACE_SECONDS``, then kills what is left. A second Ctrl-C
kills them at once (their trials are then ended by the study's next run, as a lost worker's).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import torch

from kdsweep import api
from kdsweep.distill import models, preemption
from kdsweep.errors import UsageError
from kdsweep.prepare.inputs import check_inputs
from kdsweep.prepare.teacher import build_cache
from kdsweep.progress import EVENTS_FD, LaunchView, parse_event
from kdsweep.store.storage import check_storage, load_existing_study
from kdsweep.study.config import StudyConfig
from kdsweep.sweep import StudySummary

# set in a worker: its name (w0, w1, ...); it leaves the summary to the launcher
WORKER_ENV = "KDSWEEP_WORKER"
STOP_GRACE_SECONDS = 60.0  # after Ctrl-C, how long workers may take to close their trials
DRAIN_SECONDS = 5.0  # after the last worker exits, how long its last lines may take to arrive
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def run_workers(
    study: StudyConfig,
    study_file: str,
    *,
    workers: int,
    devices: list[int] | None,
    overrides: list[str],
    n_trials: int | None,
    timeout: float | None,
    report: bool,
) -> tuple[int, StudySummary | None]:
    """Prepare what the workers share, run ``workers`` processes on the study until they have
    all ended, then write the report (when every worker ended well and ``report`` is set).
    Returns the launcher's exit status (the worst of the workers', ``worst_status``) and, when
    every worker ended well, where the study stands."""
    api.quiet_libraries()
    pinned = plan_devices(study, workers, devices)
    if pinned[0] is not None:
        # the cache is built on the first worker's GPU, not always on GPU 0
        torch.cuda.set_device(pinned[0])
    prepare_shared(study)
    command = worker_command(
        study_file,
        overrides=overrides,
        n_trials=n_trials,
        timeout=timeout,
        study=study,
        pinned=pinned,
    )
    threads = max(1, usable_cores() // workers)
    view = LaunchView(
        [f"w{i}" for i in range(workers)],
        target=n_trials or study.n_trials,
        steps=study.train.max_steps,
    )
    try:
        status = _run(command, pinned, threads, view)
    finally:
        view.close()
    if status != 0:
        return status, None
    return 0, _outcome(study, target=n_trials or study.n_trials, report=report)


# ---------------------------------------------------------------- before the workers


def plan_devices(study: StudyConfig, workers: int, devices: list[int] | None) -> list[int | None]:
    """Each worker's GPU, by its index in this process, or None for a worker on the CPU.

    ``devices`` (``--devices``) are GPU indices as this process sees them, given round-robin:
    ``0,0,1,1`` puts workers 0 and 1 on GPU 0. Without them, a study on the CPU keeps its
    workers there; on GPUs they go round-robin over the visible ones (or all on the study's
    ``cuda:N``).
    """
    # a cuda study on a machine without one stops here
    device = models.resolve_device(study.train.device)
    if devices is None:
        if device.type == "cpu":
            return [None] * workers
        devices = (
            [device.index] if device.index is not None else list(range(torch.cuda.device_count()))
        )
        flag = f"train.device {study.train.device}"
    else:
        flag = "--devices " + ",".join(map(str, devices))
        if not torch.cuda.is_available():
            raise UsageError(
                f"{flag}: no CUDA GPU is visible on this machine; drop --devices to share the "
                "CPU between the workers"
            )
        if study.train.device == "cpu":
            raise UsageError(
                f"{flag}: the study trains on the CPU (train.device: cpu); set train.device: "
                "auto, or drop --devices"
            )
    count = torch.cuda.device_count()
    if missing := sorted({i for i in devices if not 0 <= i < count}):
        raise UsageError(
            f"{flag}: no GPU {missing[0]} here ({count} visible); use indices 0 to {count - 1}"
        )
    return [devices[i % len(devices)] for i in range(workers)]


def cuda_visible(index: int) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` that shows a worker this process's GPU ``index``: when this
    process is itself restricted (CUDA_VISIBLE_DEVICES=2,3), its GPU 0 is the machine's 2."""
    restricted = os.environ.get("CUDA_VISIBLE_DEVICES")
    return restricted.split(",")[index].strip() if restricted else str(index)


def prepare_shared(study: StudyConfig) -> None:
    """Build, once and before any worker starts, what every worker would otherwise build or read
    first: the demo's models and the teacher's top-K cache. Reading the inputs checks them, so a
    missing model or dataset stops the launch here (a UsageError, nothing written)."""
    check_storage(study.storage_url)
    if study.cached_top_ks:
        build_cache(study)  # reads and checks every input; the workers then say "reusing"
    else:
        check_inputs(study)


def worker_command(
    study_file: str,
    *,
    overrides: list[str],
    n_trials: int | None,
    timeout: float | None,
    study: StudyConfig,
    pinned: list[int | None],
) -> list[str]:
    command = [sys.executable, "-m", "kdsweep", "run", study_file, "--no-report"]
    for override in overrides:
        command += ["--set", override]
    if pinned[0] is not None and study.train.device.startswith("cuda:"):
        command += ["--set", "train.device=cuda"]  # a worker sees one GPU, its cuda:0
    if n_trials is not None:
        # the study's total: the workers stop together at it
        command += [
            "--n-trials",
            str(n_trials),
        ]
    if timeout is not None:
        command += ["--timeout", str(timeout)]
    return command


def worker_env(name: str, gpu: int | None, threads: int) -> dict[str, str]:
    env = {
        **os.environ,
        WORKER_ENV: name,
        # Torch's intra-op pool is as wide as the machine by default: N workers would each start
        # one, and on a CPU run slower together than one alone. Read at torch's import.
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",  # lines as they are printed, not in blocks when the buffer fills
        "COLUMNS": "400",  # rich wraps lines at 80 columns in a pipe: one line must stay one line
        # Bars drawn with carriage returns, N times over, are noise in one shared view (the
        # datasets library's are off in every kdsweep run: api.quiet_libraries).
        "TQDM_DISABLE": "1",
    }
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible(gpu)
    return env


def usable_cores() -> int:
    """The cores this process may run on (a container or taskset may allow fewer than the
    machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def is_worker() -> bool:
    """In a ``kdsweep run`` process: True when a launcher started it (its environment already
    sized torch's threads to its share of the CPU)."""
    return bool(os.environ.get(WORKER_ENV))


# ---------------------------------------------------------------- while they run


@dataclass
class Worker:
    name: str
    process: subprocess.Popen
    events: int  # the read end of the worker's events pipe

    def send(self, signum: int) -> None:
        self.process.send_signal(signum)  # a no-op once it has exited

    @property
    def running(self) -> bool:
        return self.process.poll() is None


def _run(command: list[str], pinned: list[int | None], threads: int, view: LaunchView) -> int:
    workers: list[Worker] = []
    with _Stopper(workers) as stopper:
        try:
            for i, gpu in enumerate(pinned):
                if stopper.signum is not None:
                    break  # interrupted while starting: start no more
                workers.append(_start(f"w{i}", command, gpu, threads))
                where = "the CPU" if gpu is None else f"GPU {gpu}"
                view.message(
                    f"w{i}: pid {workers[-1].process.pid} on {where}, {threads} CPU "
                    f"thread{'s' * (threads > 1)}"
                )
            stopper.forward()  # to any worker started after a signal came
            _follow(workers, view, stopper)
        finally:
            _stop_leftovers(workers)
    statuses = [
        exit_status(w.process.returncode, interrupted=stopper.signum is not None) for w in workers
    ]
    return worst_status(statuses + ([stopper.status] if stopper.signum is not None else []))


def _start(name: str, command: list[str], gpu: int | None, threads: int) -> Worker:
    read_end, write_end = os.pipe()
    try:
        process = subprocess.Popen(
            command,
            env={**worker_env(name, gpu, threads), EVENTS_FD: str(write_end)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            pass_fds=(write_end,),
            # a terminal's Ctrl-C reaches the launcher only; it forwards one
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
    finally:
        os.close(write_end)  # the worker has its copy: its end closes the pipe when it exits
    return Worker(name, process, read_end)


def _die_with_parent():
    """On Linux, a worker gets SIGTERM when the launcher dies, even by SIGKILL: alone, its next
    line would hit a closed pipe and fail every trial it had left, one after the other. The
    prctl function is looked up here, before the fork, so the child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return functools.partial(prctl, _PR_SET_PDEATHSIG, signal.SIGTERM)


def _follow(workers: list[Worker], view: LaunchView, stopper: _Stopper) -> None:
    """Show the workers' lines and events until they have all exited and both are read."""
    lines: queue.Queue = queue.Queue()
    for worker in workers:
        threading.Thread(
            target=_read, args=(worker, worker.process.stdout, lines, False), daemon=True
        ).start()
        threading.Thread(
            target=_read,
            args=(worker, os.fdopen(worker.events, errors="replace"), lines, True),
            daemon=True,
        ).start()
    open_streams, ended, drain_until = 2 * len(workers), set(), None
    while open_streams or len(ended) < len(workers):
        try:
            worker, line, is_event = lines.get(timeout=0.2)
        except queue.Empty:
            pass
        else:
            if line is None:
                open_streams -= 1
            elif is_event:
                if (event := parse_event(line)) is not None:
                    view.event(worker.name, event)
            else:
                view.line(worker.name, line)
        for notice in stopper.check():
            view.message(notice)
        for worker in workers:
            if worker.name not in ended and not worker.running:
                ended.add(worker.name)
                view.ended(worker.name, worker.process.returncode)
        if len(ended) == len(workers):
            # A worker's own child may hold its pipe open after it exits: its last lines get a
            # bounded wait.
            drain_until = drain_until or time.monotonic() + DRAIN_SECONDS
            if time.monotonic() > drain_until:
                break


def _read(worker: Worker, stream, lines: queue.Queue, is_event: bool) -> None:
    try:
        for line in stream:
            lines.put((worker, line, is_event))
    finally:
        lines.put((worker, None, is_event))


def _stop_leftovers(workers: list[Worker]) -> None:
    """Whatever way the launcher leaves (an error in the view, a KeyboardInterrupt), it leaves no
    worker behind: SIGTERM, a bounded wait, then SIGKILL."""
    alive = [w for w in workers if w.running]
    for worker in alive:
        worker.send(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for worker in alive:
        try:
            worker.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()


class _Stopper:
    """Ctrl-C and SIGTERM while workers run: the first is forwarded to each worker once, a second
    kills them; past ``STOP_GRACE_SECONDS`` they are killed too. The handler only signals and
    records; ``check`` (called by the loop) says what happened, as printing from a signal
    handler could cut into a line the view is printing."""

    def __init__(self, workers: list[Worker]):
        self.workers = workers
        self.signum: int | None = None
        self._forwarded: set[str] = set()
        self._deadline: float | None = None
        self._notices: list[str] = []
        self._killed = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _Stopper:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            self._kill("a second interrupt: killing the workers")
            return
        self.signum = signum
        self._deadline = time.monotonic() + STOP_GRACE_SECONDS
        terminated = signum == signal.SIGTERM
        how = "checkpoints its running trial" if terminated else "ends its running trial"
        self._notices.append(
            f"{signal.Signals(signum).name}: stopping the workers (each {how}); again kills them"
        )
        self.forward()

    @property
    def status(self) -> int:
        """The launcher's own exit status once stopped: 143 for SIGTERM (preemption), else 130."""
        return preemption.EXIT_STATUS if self.signum == signal.SIGTERM else 130

    def forward(self) -> None:
        if self.signum is None:
            return
        for worker in self.workers:
            if worker.name not in self._forwarded:
                self._forwarded.add(worker.name)
                worker.send(self.signum)

    def check(self) -> list[str]:
        if self._deadline is not None and time.monotonic() > self._deadline and not self._killed:
            self._kill(
                f"workers still running {STOP_GRACE_SECONDS:.0f} s after the interrupt: killing "
                "them"
            )
        notices, self._notices = self._notices, []
        return notices

    def _kill(self, notice: str) -> None:
        if self._killed:
            return
        self._killed = True
        self._notices.append(notice + " (their trials are ended by the study's next run)")
        for worker in self.workers:
            if worker.running:
                worker.process.kill()


# The exit statuses of the workers, worst first. A failure (1) needs the user's eyes even when the
# others were interrupted; a usage error (2) is bad input that every worker met; an interruption
# (130) or a preemption (143) is what the user or the cluster asked for. The numeric maximum would
# rank 130 above 1, and a crashed worker would hide behind a Ctrl-C.
_WORST_FIRST = (1, 2, preemption.EXIT_STATUS, 130, 0)


def exit_status(returncode: int, *, interrupted: bool) -> int:
    """A worker's exit status as the launcher counts it. Killed by a signal (a negative code):
    by the launcher stopping it (130), or by something else (the kernel's OOM killer): a
    failure."""
    if returncode < 0:
        return 130 if interrupted else 1
    return returncode if returncode in _WORST_FIRST else 1


def worst_status(statuses: list[int]) -> int:
    return min(statuses, key=_WORST_FIRST.index, default=0)


# ---------------------------------------------------------------- after them


def _outcome(study: StudyConfig, *, target: int, report: bool) -> StudySummary:
    """Where the study stands, with its report written once by the launcher (as a single
    ``kdsweep run`` writes it: when the study holds a finished trial)."""
    summary = StudySummary.read(study, load_existing_study(study), target=target)
    if report and summary.finished:
        summary = dataclasses.replace(summary, report=api.write_report(study))
    return summary
