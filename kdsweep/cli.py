"""The ``kdsweep`` command: each subcommand checks its flags, then calls one library function.

``main`` is the one place that turns errors into messages and exit codes: 0 success, 2 usage or
study-file error (one line per problem, no traceback), 1 any other failure, 130 interrupted,
143 preempted (SIGTERM: the running trial checkpointed, to be resumed).
``KDSWEEP_DEBUG=1`` shows tracebacks. Importing this module loads neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from kdsweep.distill import preemption
from kdsweep.distill.preemption import Preempted
from kdsweep.errors import StudyError, UsageError, described
from kdsweep.redact import redact
from kdsweep.study.config import StudyConfig
from kdsweep.study.reader import load_study
from kdsweep.study.space import searched_names
from kdsweep.version import __version__


def entry() -> None:
    """The ``kdsweep`` command (and ``python -m kdsweep``): ``main``, then exit with its status.

    After an interrupt the process exits at once: a thread a library left behind (transformers
    loads weights in a thread pool) must not keep a stopped worker alive.
    """
    status = main()
    if status in (130, preemption.EXIT_STATUS):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.command(args) or 0
    except StudyError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"kdsweep: {exc}", file=sys.stderr)
        return 2
    except Preempted as exc:
        where = f"its trial checkpointed at step {exc.step}; " if exc.step is not None else ""
        print(
            f"kdsweep: preempted (SIGTERM): {where}the same command resumes the study",
            file=sys.stderr,
        )
        return preemption.EXIT_STATUS
    except KeyboardInterrupt:
        print("kdsweep: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last line of defence: one line, the traceback on request
        if os.environ.get("KDSWEEP_DEBUG") == "1":
            print(redact(traceback.format_exc()), file=sys.stderr)
        print(
            f"kdsweep: error: {described(exc)} (KDSWEEP_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdsweep", description="Sweep knowledge-distillation hyperparameters."
    )
    parser.add_argument("--version", action="version", version=f"kdsweep {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, handler, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("study", metavar="STUDY.yaml", help="the study file")
        sub.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY.PATH=VALUE",
            help="override a study field, e.g. --set train.max_steps=50 (repeatable)",
        )
        sub.set_defaults(command=handler)
        return sub

    run = command("run", cmd_run, "run (or continue) the study's trials, then write its report")
    run.add_argument(
        "--n-trials", type=_positive_int, help="total finished trials the study should hold"
    )
    run.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="start no new trial after this long"
    )
    run.add_argument("--no-report", action="store_true", help="skip the report at the end")
    run.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help="run N worker processes on the study, one device each (default 1, or one per "
        "--devices entry)",
    )
    run.add_argument(
        "--devices",
        metavar="0,1,...",
        help="GPU indices for the workers, round-robin (0,0,1,1: two workers per GPU); default: "
        "the visible GPUs, else the CPU",
    )
    command(
        "check",
        cmd_check,
        "validate the study file, and read its data's first rows as the trials will (tokenizers "
        "only, no weights)",
    )
    report = command("report", cmd_report, "write the study's Markdown report")
    report.add_argument(
        "--output", metavar="PATH", help="report file (default reports/<study>.md)"
    )
    command("status", cmd_status, "show the study's trials as a table")
    ui = command("ui", cmd_ui, "open the MLflow UI on the study's runs")
    ui.add_argument("--port", type=int, default=5000)
    command("cache", cmd_cache, "build the teacher's top-K cache ahead of a many-worker launch")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _study(args) -> StudyConfig:
    return load_study(args.study, args.overrides)


def cmd_check(args) -> int:
    from kdsweep.report.status import estimate_line

    study = _study(args)
    searched = searched_names(study.search)
    ceilings = ", ".join(f"{name} <= {value:g}" for name, value in study.constraints.items())
    ceilings = f" under {ceilings}" if ceilings else ""
    print(
        f"{args.study}: ok: study {study.name!r}, {study.n_trials} trials of "
        f"{study.train.max_steps} steps, "
        f"{study.teacher.label} -> {study.student.label} on {study.data.dataset}, "
        f"searching {', '.join(searched) or 'nothing'}, optimizing "
        f"{', '.join(study.objectives)}{ceilings} (fingerprint {study.fingerprint()})"
    )
    print(f"{args.study}: {estimate_line(study)}")
    if study.data.test_split is None:
        print(
            f"{args.study}: warning: data.test_split is not set: the verdict will come from the "
            f"validation split ({study.data.eval_split!r}) the sweep selects on, and be "
            "optimistic; set data.test_split to rows of their own",
            file=sys.stderr,
        )
    _check_data(args.study, study)
    return 0


def _check_data(path: str, study: StudyConfig) -> None:
    """The first rows of each split as the trials will read them: rendered, scored, and what
    became of their reasoning; or why they could not be read from here."""
    import dataclasses

    from kdsweep.prepare.preview import preview  # transformers and datasets load here
    from kdsweep.progress import SweepProgress
    from kdsweep.report.text import reasoning_note

    progress = SweepProgress()
    try:
        found = preview(study, progress)
    finally:
        progress.close()
    if found.unread:
        print(f"{path}: data: not read: {found.unread}", file=sys.stderr)
    for split in found.splits:
        where = f"{path}: data {split.split!r}"
        counts = split.counts
        note = reasoning_note(**dataclasses.asdict(counts)) or f"{counts.answers:,} answers"
        print(
            f"{where}: the first {split.rows:,} rows read, {split.kept:,} with scored tokens "
            f"({split.scored_tokens:,}); {note}"
        )
        if split.prompt_end is not None:
            print(
                f"{where}: accuracy prompts end {split.prompt_end!r}; the answer generated "
                f"after it begins {split.answer_start!r}"
            )


def cmd_run(args) -> int:
    study = _study(args)
    devices = _devices(args.devices)
    workers = args.workers or (len(devices) if devices else 1)
    if workers == 1 and devices is None:
        return _run_here(study, args)
    from kdsweep import launch  # torch, transformers, Optuna and MLflow load here

    status, summary = launch.run_workers(
        study,
        args.study,
        workers=workers,
        devices=devices,
        overrides=args.overrides,
        n_trials=args.n_trials,
        timeout=args.timeout,
        report=not args.no_report,
    )
    if status == 130:
        print("kdsweep: interrupted", file=sys.stderr)
    if status == preemption.EXIT_STATUS:
        print("kdsweep: preempted (SIGTERM): the same command resumes the study", file=sys.stderr)
    if summary is not None:
        _print_outcome(study, summary)
    return status


def _run_here(study: StudyConfig, args) -> int:
    """One worker, in this process (a launched worker too: the launcher prints the summary)."""
    from kdsweep import api, launch  # torch, transformers, Optuna and MLflow load here

    launched = launch.is_worker()
    summary = api.run_study(
        study, n_trials=args.n_trials, timeout=args.timeout, report=not args.no_report
    )
    if not launched:
        _print_outcome(study, summary)
    return 0


def _print_outcome(study: StudyConfig, summary) -> None:
    """The answer in a few lines, and where the report is (``summary``: a ``StudySummary``)."""
    from kdsweep.report.status import print_summary

    if summary.best_trial is not None:
        print_summary(study)
    if summary.report is not None:
        print(f"report: {summary.report}")


def _devices(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        devices = [int(part) for part in text.split(",")]
    except ValueError:
        devices = []
    if not devices or min(devices) < 0:
        raise UsageError(
            f"--devices {text}: expected GPU indices separated by commas, e.g. --devices 0,1"
        )
    return devices


def cmd_report(args) -> int:
    from kdsweep import api

    print(f"report: {api.write_report(_study(args), output=args.output)}")
    return 0


def cmd_status(args) -> int:
    from kdsweep.report.status import print_status

    print_status(_study(args))
    return 0


def cmd_ui(args) -> int:
    from kdsweep.mlflow.ui import serve

    return serve(_study(args), port=args.port)


def cmd_cache(args) -> int:
    from kdsweep.prepare.teacher import build_cache

    path = build_cache(_study(args))
    print(f"teacher cache: {path}")
    return 0
