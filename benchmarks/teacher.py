"""The teacher's top-K cache against the teacher run online, on the demo sweep.

Run by hand from the repository root (the demo models are built on first use, about two minutes;
``KDSWEEP_CACHE`` says where they are kept)::

    python benchmarks/teacher.py                       # 6 trials of 100 steps, then 300 steps
    python benchmarks/teacher.py --trials 2 --steps 20 --step-reps 50    # a smoke run

What it measures, in one process and one run:

1. The same sweep twice: ``studies/demo.yaml`` with top_k in {8, 16, 32}, a random sampler (so
   both runs train the very same trials), no pruning and no baseline. Once with the teacher
   cache (built inside the timed run, in a fresh cache folder), once with
   ``train.teacher_cache=false`` (the teacher runs online at every step of every trial).
   Reported: the wall time of each ``sweep.run`` (preparation included; the cached run goes
   first, so it pays for warming the process up) and their ratio, and the tokens the teacher ran
   on over the training split against the split's tokens: the cached sweep must show one pass.
2. One optimizer step of the same student on the same batches: distillation from the cached
   teacher (alpha 0.5, T 2, top_k 32: gather the rows, move them, KL + CE) against plain
   cross-entropy (alpha 0). Steps alternate between the two so that load from other processes
   hits both alike; the ratio is of the medians. Target: at most 1.10x.

Torch runs one intra-op thread by default here (``--threads``): the demo's models are too small
to gain from more, and on a shared machine OpenMP's spin-waiting makes extra threads far slower.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Runnable from a checkout without installing the package.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from kdsweep import sweep  # noqa: E402
from kdsweep.distill import models, train  # noqa: E402
from kdsweep.distill.loss import DistillSettings, batch_loss  # noqa: E402
from kdsweep.prepare import demo  # noqa: E402
from kdsweep.prepare.trial_runner import TrialRunner  # noqa: E402
from kdsweep.progress import SweepProgress  # noqa: E402
from kdsweep.study.reader import load_study  # noqa: E402

STEP_RATIO_TARGET = 1.10
TOP_KS = "[8, 16, 32]"


def study_for(root: Path, name: str, *, trials: int, steps: int, cached: bool):
    overrides = [
        f"name={name}",
        f"n_trials={trials}",
        # Stores of its own for each run: both pay for creating them.
        f"storage=sqlite:///{root / name}-optuna.db",
        f"tracking.uri=sqlite:///{root / name}-mlflow.db",
        "sampler.name=random",
        "pruner.name=none",
        "baselines=[]",
        f"search.top_k={TOP_KS}",
        f"train.max_steps={steps}",
        f"train.eval_every={max(steps // 2, 1)}",
        f"train.teacher_cache={'true' if cached else 'false'}",
    ]
    return load_study(REPO / "studies" / "demo.yaml", overrides)


def timed_sweep(study) -> tuple[float, TrialRunner]:
    """The whole sweep's seconds (preparing included), and its runner, to read the teacher's
    counters."""
    quiet = SweepProgress(Console(file=io.StringIO()))
    started = time.perf_counter()
    runner = TrialRunner.prepare(study, progress=quiet)
    sweep.run(study, progress=quiet, runner=runner)
    return time.perf_counter() - started, runner


def teacher_training_tokens(ws: TrialRunner) -> int:
    """Tokens the teacher ran on over the training split during this sweep."""
    if ws.teacher.cached:
        # the one build, in this run's fresh folder
        return ws.teacher.train_cache.manifest["teacher_tokens"]
    eval_tokens = sum(batch.num_tokens for batch in ws.eval_set.batches)  # its targets, made once
    return ws.teacher.tokens_processed - eval_tokens


def step_times(ws: TrialRunner, *, reps: int, top_k: int) -> dict[str, float]:
    """Median seconds of one optimizer step: cached-teacher distillation vs plain cross-entropy."""
    student = models.load_model("student", ws.inputs.student, ws.device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    base = dict(temperature=2.0, top_k=top_k, learning_rate=1e-3, train=ws.study.train)
    settings = {
        "ce": DistillSettings(alpha=0.0, **base),
        "cached": DistillSettings(alpha=0.5, **base),
    }
    batches = train.endless_batches(
        ws.inputs.train_split, settings["ce"], pad_id=ws.tokenizer.pad_token_id
    )
    times = {name: [] for name in settings}
    for rep in range(reps + 5):
        batch = next(batches)
        for name, setting in settings.items():
            started = time.perf_counter()
            one_step(
                student,
                optimizer,
                batch.to(ws.device),
                ws.teacher if name == "cached" else None,
                setting,
                ws.inputs.vocab,
            )
            if rep >= 5:  # the first steps warm up allocators and kernels
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def one_step(student, optimizer, batch, teacher, settings: DistillSettings, vocab) -> None:
    """What ``train.distill`` does per step (fp32 on the CPU: no autocast, no scaler)."""
    targets = teacher.targets(batch, top_k=settings.top_k) if teacher is not None else None
    result = batch_loss(student, batch, targets, settings, vocab)
    result.loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), settings.train.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if batch.input_ids.is_cuda:
        torch.cuda.synchronize()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, "
        f"load average {load:.1f} at start"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per trial")
    parser.add_argument("--step-reps", type=int, default=300, help="timed steps of each kind")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # see the module's docstring

    print(f"machine: {machine()}")
    models_dir = demo.ensure_models()["teacher"].parents[1]  # built once, shared with other runs
    with tempfile.TemporaryDirectory(prefix="kdsweep-bench-") as tmp:
        root = Path(tmp)
        # A fresh cache folder, so the cached sweep pays for building the cache; same demo models.
        (root / "cache").mkdir()
        (root / "cache" / "demo").symlink_to(models_dir)
        os.environ["KDSWEEP_CACHE"] = str(root / "cache")
        runs = {}
        for name, cached in (("cached", True), ("online", False)):
            study = study_for(
                root, f"bench-{name}", trials=args.trials, steps=args.steps, cached=cached
            )
            runs[name] = timed_sweep(study)
        (cached_s, cached_ws), (online_s, online_ws) = runs["cached"], runs["online"]
        train_tokens = sum(len(ids) for ids in cached_ws.train_split.input_ids)
        steps = step_times(cached_ws, reps=args.step_reps, top_k=32)

    build = cached_ws.teacher.manifest
    tokens = {
        "cached": teacher_training_tokens(cached_ws),
        "online": teacher_training_tokens(online_ws),
    }
    print(
        f"\ndemo sweep: {args.trials} trials x {args.steps} steps, batch "
        f"{cached_ws.study.train.batch_size}, "
        f"top_k {TOP_KS}, random sampler, no pruning; training split "
        f"{len(cached_ws.train_split):,} rows, "
        f"{train_tokens:,} tokens"
    )
    print(f"{'':34} {'cached':>12} {'online':>12} {'cached/online':>14}")
    print(
        f"{'sweep wall time (s)':34} {cached_s:12.1f} {online_s:12.1f} {cached_s / online_s:14.3f}"
    )
    print(
        f"{'teacher tokens, training split':34} {tokens['cached']:12,} {tokens['online']:12,} "
        f"{tokens['cached'] / tokens['online']:14.4f}"
    )
    print(
        f"{'  / training tokens (one pass)':34} {tokens['cached'] / train_tokens:12.3f} "
        f"{tokens['online'] / train_tokens:12.3f}"
    )
    print(
        f"cache build: {build['build_seconds']:.1f} s for {build['teacher_tokens']:,} tokens, "
        f"K={build['k']}, "
        f"{build['rows']:,} scored rows; mass kept at T=1: "
        + ", ".join(f"top-{k} {cached_ws.teacher.mass(k):.3f}" for k in (8, 16, 32))
    )
    once = "ok" if tokens["cached"] == train_tokens else "MISS"
    print(f"teacher tokens with the cache == training tokens once: {once}")

    ratio = steps["cached"] / steps["ce"]
    flag = "ok" if ratio <= STEP_RATIO_TARGET else "MISS"
    print(
        f"\none optimizer step, same student and batches, median of {args.step_reps} interleaved "
        "steps"
    )
    print(f"{'plain CE (ms)':>14} {'cached KD (ms)':>15} {'ratio':>7}  target")
    print(
        f"{steps['ce'] * 1e3:14.2f} {steps['cached'] * 1e3:15.2f} {ratio:7.3f}  <= "
        f"{STEP_RATIO_TARGET:.2f} {flag}"
    )


if __name__ == "__main__":
    main()
