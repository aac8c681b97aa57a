"""Pruning, measured: what the median pruner and Hyperband save on a kdsweep study, and whether
they still find the best configuration.

Run by hand from the repository root (the demo models and teacher cache are built on first use
and kept under ``KDSWEEP_CACHE``)::

    python benchmarks/pruning.py               # 3 pruners x 3 sampler seeds, ~30 min on a CPU
    python benchmarks/pruning.py --seeds 0     # one seed each
    python benchmarks/pruning.py STUDY.yaml    # another study: the same changes to it

The study is a demo variant (``studies/demo.yaml`` with these changes): 24 trials of 300 steps,
evaluated every 50, no seed check, no test split and no accuracy decoding (neither bears on
pruning, and both cost time), each study in a store of its own. For each pruner (``none``,
``median``, ``hyperband``) and each sampler seed, one study runs to its 24 trials; the sampler
seed changes which configurations are tried, the training seed stays. Baselines and distilled
trials are pruned by the same rule (the pruner compares every sweep trial with the others at
the same step), so plain fine-tuning gets the same chance as distillation.

Reported per pruner: the study's best value (mean and spread over the seeds: max - min), the
trials' device-seconds (every trial, pruned ones included, from each trial's cost) and the study's
total (preparation and teacher cache too), and the ratio of the trials' device-seconds to the
unpruned studies'. Goal: a pruner reaches the unpruned best within the unpruned seed spread, at
no more than 0.5x the device-seconds.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from variants import QUIET, arguments, each, run_variant  # noqa: E402

from kdsweep.store import cost  # noqa: E402
from kdsweep.store.trials import Trials  # noqa: E402

PRUNERS = ("none", "median", "hyperband")
GOAL_RATIO = 0.5
VARIANT = QUIET | {"n_trials": 24, "train.max_steps": 300, "train.eval_every": 50}


def run_one(pruner: str, seed: int, folder: Path, variant: dict, study: Path) -> dict:
    """One study of ``variant`` with ``pruner`` and sampler ``seed``: its best value and cost."""
    overrides = variant | {"pruner.name": pruner, "sampler.seed": seed}
    optuna_study = run_variant(study, f"pruning-{pruner}-{seed}", overrides, folder)
    spent = cost.study_cost(optuna_study, max_steps=variant["train.max_steps"])
    states = [t.state.name for t in optuna_study.trials]
    return {
        "best": Trials.of(optuna_study).best.value,
        "trials_seconds": spent.trials,
        "total_seconds": spent.total,
        "pruned": states.count("PRUNED"),
        "saved_seconds": spent.pruning_saved,
    }


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__, n_trials=VARIANT["n_trials"])
    parser.add_argument("--pruners", nargs="+", default=list(PRUNERS), choices=PRUNERS)
    parser.add_argument("--max-steps", type=int, default=VARIANT["train.max_steps"])
    parser.add_argument("--eval-every", type=int, default=VARIANT["train.eval_every"])
    args = parser.parse_args(argv)
    variant = VARIANT | {
        "n_trials": args.n_trials,
        "train.max_steps": args.max_steps,
        "train.eval_every": args.eval_every,
    }

    def run(pruner: str, seed: int, folder: Path) -> dict:
        found = run_one(pruner, seed, folder, variant, args.study)
        print(
            f"{pruner:9s} seed {seed}: best {found['best']:.4f}, {found['pruned']} pruned, "
            f"trials {found['trials_seconds']:.0f} device-s, study {found['total_seconds']:.0f} "
            "device-s",
            flush=True,
        )
        return found

    results = each(args.pruners, args.seeds, run)
    print_table(results)


def print_table(results: dict[str, list[dict]]) -> None:
    none = results.get("none")
    base_seconds = statistics.mean(r["trials_seconds"] for r in none) if none else None
    base_best = statistics.mean(r["best"] for r in none) if none else None
    base_spread = max(r["best"] for r in none) - min(r["best"] for r in none) if none else None
    print(
        "\n| pruner | best student_ppl (mean) | spread (max - min) | pruned trials (mean) | "
        "trials' device-s (mean) | study device-s (mean) | trials' device-s vs none | goal |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for pruner, rows in results.items():
        best = [r["best"] for r in rows]
        seconds = statistics.mean(r["trials_seconds"] for r in rows)
        total = statistics.mean(r["total_seconds"] for r in rows)
        pruned = statistics.mean(r["pruned"] for r in rows)
        ratio = seconds / base_seconds if base_seconds else None
        goal = ""
        if pruner != "none" and ratio is not None:
            reaches = statistics.mean(best) - base_best <= base_spread
            met = reaches and ratio <= GOAL_RATIO
            goal = (
                f"{'met' if met else 'not met'} (best {'within' if reaches else 'outside'} the "
                f"unpruned spread, {ratio:.2f}x {'<=' if ratio <= GOAL_RATIO else '>'} "
                f"{GOAL_RATIO}x)"
            )
        print(
            f"| {pruner} | {statistics.mean(best):.3f} | {max(best) - min(best):.3f} | "
            f"{pruned:.1f} | {seconds:.0f} | {total:.0f} | "
            f"{'' if ratio is None else f'{ratio:.2f}x'} | {goal} |"
        )


if __name__ == "__main__":
    main()
