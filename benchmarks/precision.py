"""bf16 autocast against fp32 on the CPU: the demo's distillation step and a 40M-parameter
student's step, their losses, and what ``train.precision: auto`` chooses on this CPU.

Run by hand from the repository root (the demo's models and teacher cache are built on first
use; ``KDSWEEP_CACHE`` says where they are kept)::

    python benchmarks/precision.py                 # a few minutes on a 2-core AVX2 CPU
    python benchmarks/precision.py --demo-steps 4 --steps 1 --seq 16 --vocab 512 --layers 1

Both precisions train the same student from the same weights on the same batches, taking turns
(``--rounds`` each), in this one process:

- the demo: ``studies/demo.yaml``'s student distilled from its teacher's top-K cache (alpha 0.5,
  T 2, top_k 16) for ``--demo-steps`` steps, through its trial runner;
- a 40M-parameter student (``benchmarks/optimizer.py``'s: Qwen3-shaped, hidden size 512, 8
  layers, vocabulary 32,000): plain fine-tuning through ``train.distill`` on ``--batch`` rows of
  ``--seq`` random tokens, one untimed step and ``--steps`` timed ones.

Reported: each precision's seconds per step (the median run), bf16's ratio to fp32, and the
first logged loss of each (the same batch) with their relative difference; then the CPU's
capability as torch sees it, whether it has AMX units, and what ``auto`` takes here.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import torch  # noqa: E402
from gpu import Clocked, build_model, kdsweep_run, synthetic_split  # noqa: E402
from optimizer import student_config  # noqa: E402
from rich.console import Console  # noqa: E402

from kdsweep.compat.torch import cpu_has_amx  # noqa: E402
from kdsweep.distill import models, train  # noqa: E402
from kdsweep.distill.loss import DistillSettings  # noqa: E402
from kdsweep.prepare.trial_runner import TrialRunner  # noqa: E402
from kdsweep.progress import SweepProgress  # noqa: E402
from kdsweep.study.reader import load_study  # noqa: E402

PRECISIONS = ("fp32", "bf16")


class Logged(train.TrialHooks):
    def __init__(self):
        self.losses = []

    def logged(self, log) -> None:
        self.losses.append(log.loss)


def demo_run(runner: TrialRunner, settings: DistillSettings) -> tuple[float, float]:
    """A fresh demo student trained at ``settings``: seconds per step and its first loss."""
    student = models.load_model("student", runner.inputs.student, runner.device)
    data = dataclasses.replace(runner.training_data, evaluate=lambda model, step: {})
    hooks = Logged()
    started = time.perf_counter()
    train.distill(student, settings, data, runner.teacher, hooks)
    return (time.perf_counter() - started) / settings.train.max_steps, hooks.losses[0]


def student_run(args, precision: str) -> tuple[float, float]:
    """The 40M-parameter student trained at ``precision``: seconds per step (after the first)
    and its first loss."""
    config = student_config(args.vocab, args.layers)
    vocab = models.Vocabulary(config.vocab_size, config.vocab_size, config.vocab_size)
    split = synthetic_split(args.batch * (1 + args.steps), args.seq, config.vocab_size)
    loop = SimpleNamespace(
        warmup=1,
        steps=args.steps,
        batch=args.batch,
        precision=precision,
        chunk_tokens=None,
        gen_tokens=1,
    )
    device = torch.device("cpu")
    student = build_model(config, device, torch.float32, seed=1)
    hooks = Clocked(device, loop.warmup)
    kdsweep_run(
        student,
        split,
        None,
        args=loop,
        top_k=None,
        alpha=0.0,
        device=device,
        vocab=vocab,
        hooks=hooks,
    )
    return (hooks.times[-1] - hooks.times[0]) / args.steps, hooks.losses[0]


def compare(name: str, runs: dict[str, list[tuple[float, float]]]) -> None:
    step = {p: statistics.median(s for s, _ in runs[p]) for p in PRECISIONS}
    loss = {p: runs[p][0][1] for p in PRECISIONS}
    ratio = step["bf16"] / step["fp32"]
    apart = abs(loss["bf16"] - loss["fp32"]) / abs(loss["fp32"])
    print(
        f"| {name} | {step['fp32']:.4f} | {step['bf16']:.4f} | {ratio:.2f} | "
        f"{loss['fp32']:.5f} | {loss['bf16']:.5f} | {apart:.1e} |"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default=str(REPO / "studies" / "demo.yaml"))
    parser.add_argument("--demo-steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each precision")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2, help="the 40M student's timed steps")
    parser.add_argument("--threads", type=int, default=2, help="torch's CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    steps = [f"train.max_steps={args.demo_steps}", f"train.eval_every={args.demo_steps}"]
    study = load_study(args.demo, steps)
    runner = TrialRunner.prepare(study, progress=SweepProgress(Console(stderr=True)))
    demo = DistillSettings(
        alpha=0.5, temperature=2.0, top_k=16, learning_rate=3e-3, train=study.train
    )
    cpu = torch.device("cpu")
    runs = {"demo": {p: [] for p in PRECISIONS}, "40M": {p: [] for p in PRECISIONS}}
    demo_threads = study.train.threads or args.threads  # the demo's own: one
    for _ in range(args.rounds):
        for precision in PRECISIONS:
            fixed = dataclasses.replace(study.train, precision=precision)
            torch.set_num_threads(demo_threads)
            runs["demo"][precision].append(
                demo_run(runner, dataclasses.replace(demo, train=fixed))
            )
            torch.set_num_threads(args.threads)
            runs["40M"][precision].append(student_run(args, precision))

    config = student_config(args.vocab, args.layers)
    parameters = sum(
        p.numel() for p in build_model(config, cpu, torch.float32, seed=1).parameters()
    )
    print(
        f"\ndemo: batch {study.train.batch_size}, {args.demo_steps} steps a run, {demo_threads} "
        f"torch threads; student: {parameters:,} parameters, batch {args.batch} x {args.seq} "
        f"tokens, {args.threads} threads; {args.rounds} runs of each precision"
    )
    print(
        "| student | fp32 s/step | bf16 s/step | bf16 / fp32 | fp32 loss | bf16 loss | rel. diff |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    compare("demo (distillation, cached top-16)", runs["demo"])
    compare(f"{parameters / 1e6:.0f}M (plain fine-tuning)", runs["40M"])
    autocast, _ = train.mixed_precision("auto", cpu)
    with autocast():
        chosen = (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    print(
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, AMX units: "
        f"{cpu_has_amx()}; precision auto takes {str(chosen).removeprefix('torch.')} here"
    )
    return runs


if __name__ == "__main__":
    main()
