"""Samplers, measured: Optuna's GP sampler, TPE and random search on the demo at equal trials.

Run by hand from the repository root (the demo models and teacher cache are built on first use
and kept under ``KDSWEEP_CACHE``)::

    python benchmarks/samplers.py              # 3 samplers x 3 sampler seeds, ~20 min on a CPU
    python benchmarks/samplers.py --seeds 0    # one seed each
    python benchmarks/samplers.py STUDY.yaml   # another study: the same changes to it

The study is ``studies/demo.yaml`` with 12 trials (its 3 baselines, then 9 the sampler draws),
no seed check, no test split and no accuracy decoding, each study in a store of its own. For
each sampler and each sampler seed, one study runs to its 12 trials, with the same random start
(``sampler.n_startup_trials: 3``) for the two that model the trials. Reported per sampler: the
best distilled trial's value after the 12 trials, as the mean and spread (max - min) over the
seeds, and its ratio to random search's mean.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from variants import QUIET, arguments, each, run_variant  # noqa: E402

from kdsweep.store.trials import Trials  # noqa: E402

SAMPLERS = ("random", "tpe", "gp")
VARIANT = QUIET | {"n_trials": 12, "sampler.n_startup_trials": 3}


def best_distilled(sampler: str, seed: int, folder: Path, variant: dict, study: Path) -> float:
    """The best distilled trial's value of one study drawn by ``sampler`` with ``seed``."""
    overrides = variant | {"sampler.name": sampler, "sampler.seed": seed}
    optuna_study = run_variant(study, f"samplers-{sampler}-{seed}", overrides, folder)
    distilled = Trials.of(optuna_study).distilled
    return distilled[0].value


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__, n_trials=VARIANT["n_trials"])
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    parser.add_argument("--max-steps", type=int, help="a smoke test (default: the study's)")
    args = parser.parse_args(argv)
    variant = VARIANT | {"n_trials": args.n_trials}
    if args.max_steps:
        variant |= {"train.max_steps": args.max_steps, "train.eval_every": args.max_steps}

    def run(sampler: str, seed: int, folder: Path) -> float:
        best = best_distilled(sampler, seed, folder, variant, args.study)
        print(f"{sampler:6s} seed {seed}: best distilled {best:.4f}", flush=True)
        return best

    results = each(args.samplers, args.seeds, run)
    random_mean = statistics.mean(results["random"]) if "random" in results else None
    print(f"\n| sampler | best after {variant['n_trials']} trials (mean) | spread | vs random |")
    print("|---|---:|---:|---:|")
    for sampler, values in results.items():
        mean = statistics.mean(values)
        ratio = f"{mean / random_mean:.2f}x" if random_mean else ""
        print(f"| {sampler} | {mean:.3f} | {max(values) - min(values):.3f} | {ratio} |")


if __name__ == "__main__":
    main()
