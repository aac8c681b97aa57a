"""On-policy distillation: the cost of a step at lmbda 0, 0.5 and 1 against the cached step.

Run by hand from the repository root (the demo models and the teacher cache are built on first
use; ``KDSWEEP_CACHE`` says where they are kept)::

    python benchmarks/onpolicy.py                 # studies/demo.yaml, 60 steps per setting
    python benchmarks/onpolicy.py --steps 10      # a smoke run

What it measures: the demo study's student trained for ``--steps`` optimizer steps with the
same distillation settings (alpha 0.5, T 2, the smallest top_k of the study, beta 0), once per
lmbda. lmbda 0 is the off-policy step, reading the teacher's top-K cache; at lmbda > 0 that share
of the steps (drawn by the trial's seeded coin) generates the student's completions of its rows'
prompts (sampling at ``train.generation_temperature``, up to ``train.generation_max_new_tokens``,
batched with the KV cache), scores them with the teacher run online, and adds the reference
cross-entropy: two forward and backward passes and a generation. Reported per lmbda: the mean
step time and its ratio to lmbda 0, the share of the time spent generating, and the
student-generated tokens per on-policy step. Times are wall clock and process CPU time (the
flagged ratio is of CPU time when the machine is shared, as in benchmarks/loss.py).

Evaluation is left out (a no-op): it costs the same at every lmbda.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from kdsweep.distill import clock, models, train  # noqa: E402
from kdsweep.distill.loss import DistillSettings  # noqa: E402
from kdsweep.prepare.trial_runner import TrialRunner  # noqa: E402
from kdsweep.progress import SweepProgress  # noqa: E402
from kdsweep.study.reader import load_study  # noqa: E402
from kdsweep.study.space import BY_NAME, WHOLE_VOCAB, neutral  # noqa: E402

LMBDAS = (0.0, 0.5, 1.0)


class LastLog(train.TrialHooks):
    def logged(self, log) -> None:
        self.last = log


def time_steps(ws, settings: DistillSettings) -> dict:
    """Train a fresh student; wall and CPU seconds per step, the seconds spent generating and
    the on-policy steps (the trial's clock), and the tokens generated."""
    student = models.load_model("student", ws.inputs.student, ws.device)
    data = dataclasses.replace(ws.training_data, evaluate=lambda model, step: {})
    hooks, trial_clock = LastLog(), clock.Clock()
    wall, cpu = time.perf_counter(), time.process_time()
    with clock.counting(trial_clock):
        train.distill(student, settings, data, ws.teacher, hooks)
    steps = settings.train.max_steps
    return {
        "wall": (time.perf_counter() - wall) / steps,
        "cpu": (time.process_time() - cpu) / steps,
        "generating": trial_clock.own[clock.GENERATION],
        "generated": hooks.last.generated_tokens or 0,
        "on-policy steps": trial_clock.count[clock.ON_POLICY_STEP],
        "total": time.perf_counter() - wall,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", nargs="?", default=str(REPO / "studies" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="KEY=VALUE",
        help="as in kdsweep run",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    # A study that may step on-policy: its runner keeps the teacher loaded and the rows' prompts.
    on_policy_study = [
        f"search.lmbda=[{', '.join(map(str, LMBDAS))}]",
        f"train.max_steps={args.steps}",
        f"train.eval_every={args.steps}",
    ]
    study = load_study(args.study, [*args.overrides, *on_policy_study])
    ws = TrialRunner.prepare(study, progress=SweepProgress(Console(stderr=True)))
    top_k = min(study.search.top_k.values, key=lambda k: math.inf if k == WHOLE_VOCAB else k)
    base = DistillSettings(
        alpha=0.5,
        temperature=2.0,
        top_k=BY_NAME["top_k"].setting(top_k),
        learning_rate=float(neutral(study.search, "learning_rate")),
        train=study.train,
    )
    results = {}
    for lmbda in LMBDAS:
        results[lmbda] = time_steps(ws, dataclasses.replace(base, lmbda=lmbda))

    print(
        f"\n{study.name}: {args.steps} steps of batch {study.train.batch_size} x "
        f"{study.train.grad_accum_steps} per setting, "
        f"alpha 0.5, T 2, top_k {top_k}, device {ws.device}, torch threads "
        f"{torch.get_num_threads()}"
    )
    print(
        f"generation: temperature {study.train.generation_temperature}, up to "
        f"{study.train.generation_max_new_tokens} new tokens"
    )
    print(
        f"{'lmbda':>6} {'ms/step (wall)':>15} {'ms/step (CPU)':>14} {'x cached (CPU)':>15} "
        f"{'generating':>11} "
        f"{'on-policy steps':>16} {'tokens/step':>12}"
    )
    cached = results[0.0]
    for lmbda, r in results.items():
        steps = r["on-policy steps"]
        per_step = f"{r['generated'] / steps:.0f}" if steps else "-"
        print(
            f"{lmbda:6.1f} {1e3 * r['wall']:15.1f} {1e3 * r['cpu']:14.1f} "
            f"{r['cpu'] / cached['cpu']:15.2f} "
            f"{r['generating'] / r['total']:10.0%} {steps:16} {per_step:>12}"
        )


if __name__ == "__main__":
    main()
