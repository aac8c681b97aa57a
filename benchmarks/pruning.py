"""Pruning, measured: what the median pruner and Hyperband save on a kdsweep study, and whether
they still find the best configuration.

Run by hand from the repository root (the demo models and teacher cache are built on first use
and kept under ``KDSWEEP_CACHE``)::

    python benchmarks/pruning.py               # 3 pruners x 3 sampler seeds, ~30 min on a CPU
    python benchmarks/pruning.py --seeds 0     # one seed each
    python benchmarks/pruning.py STUDY.yaml    # another study: the same changes to it
    python benchmarks/pruning.py --fairness    # the median's two rules, with fast baselines

The study is a demo variant (``studies/demo.yaml`` with these changes): 24 trials of 300 steps,
evaluated every 50, no seed check, no test split and no accuracy decoding (neither bears on
pruning, and both cost time), each study in a store of its own. For each pruner (``none``,
``median``, ``hyperband``) and each sampler seed, one study runs to its 24 trials; the sampler
seed changes which configurations are tried, the training seed stays. Each trial is judged
against its own arm (``sweep.samplers.make_pruner``: baselines against baselines, distilled
trials against distilled trials).

``--fairness`` measures that rule against the one before it, one pool for every sweep trial, on
a study whose baselines train at a high learning rate (plain fine-tuning's loss then falls fast
in its first steps) while distillation softens its targets (a high temperature and alpha): under
one pool, the baselines set the bar every distilled trial is held to at its first evaluations.
Reported per rule: the distilled trials pruned, the best distilled and baseline values, and
which won.

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

import optuna  # noqa: E402
from variants import QUIET, arguments, each, run_variant  # noqa: E402

import kdsweep.sweep.study as sweep_run  # noqa: E402
from kdsweep.store import cost  # noqa: E402
from kdsweep.store.trials import Trials, in_sweep, is_baseline  # noqa: E402
from kdsweep.sweep import samplers  # noqa: E402

PRUNERS = ("none", "median", "hyperband")
GOAL_RATIO = 0.5
VARIANT = QUIET | {"n_trials": 24, "train.max_steps": 300, "train.eval_every": 50}
# Baselines that learn fast early, distillation that starts slow: the case one pool is unfair in.
FAIRNESS = VARIANT | {
    "n_trials": 10,
    "pruner.name": "median",
    "baselines": [{"alpha": 0.0, "learning_rate": 1.0e-2, "trials": 2}],
    "search.alpha": {"low": 0.9, "high": 0.98},
    "search.temperature": {"low": 4.0, "high": 8.0, "log": True},
}


def one_pool(study) -> optuna.pruners.BasePruner:
    """The rule before the arms: every sweep trial judged against all the others."""
    cfg = study.pruner
    median = optuna.pruners.MedianPruner(
        n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps
    )
    return samplers.ArmPruner(median, arm_of=lambda t: "sweep" if in_sweep(t) else None)


def fairness(rule: str, seed: int, folder: Path, study: Path, variant: dict) -> dict:
    """One study of ``variant`` under ``rule`` (``arms``, or ``one pool``)."""
    kept = sweep_run.make_pruner
    if rule == "one pool":
        sweep_run.make_pruner = one_pool
    try:
        name = f"fairness-{rule.replace(' ', '-')}-{seed}"
        optuna_study = run_variant(study, name, variant | {"sampler.seed": seed}, folder)
    finally:
        sweep_run.make_pruner = kept
    view = Trials.of(optuna_study)
    distilled = [t for t in view.sweep if not is_baseline(t)]
    return {
        "pruned": sum(t.state.name == "PRUNED" for t in distilled),
        "distilled": len(distilled),
        "best distilled": view.best_distilled.value if view.best_distilled else None,
        "best baseline": view.compared_baseline.value if view.compared_baseline else None,
    }


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
    parser.add_argument("--fairness", action="store_true", help="the two rules, fast baselines")
    args = parser.parse_args(argv)
    if args.fairness:
        return main_fairness(args)
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


def main_fairness(args) -> None:
    variant = FAIRNESS | {
        "n_trials": min(args.n_trials, FAIRNESS["n_trials"]),
        "train.max_steps": args.max_steps,
        "train.eval_every": args.eval_every,
    }
    results = each(
        ["one pool", "arms"],
        args.seeds,
        lambda rule, seed, folder: fairness(rule, seed, folder, args.study, variant),
    )
    print("\n| rule | seed | distilled pruned | best distilled | best baseline | winner |")
    print("|---|---:|---:|---:|---:|---|")
    for rule, rows in results.items():
        for seed, row in zip(args.seeds, rows):
            ours, theirs = row["best distilled"], row["best baseline"]
            winner = "-" if ours is None else "distilled" if ours < theirs else "baseline"
            print(
                f"| {rule} | {seed} | {row['pruned']} of {row['distilled']} | "
                f"{'none complete' if ours is None else f'{ours:.3f}'} | {theirs:.3f} | {winner} |"
            )


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
