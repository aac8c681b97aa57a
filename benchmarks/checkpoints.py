"""Checkpoints: what resume checkpoints cost a demo trial, and their size and write time, for the
demo student and for Qwen3-0.6B; and the best checkpoint's copy (``train.select: best``).

Run by hand from the repository root (the demo models and the teacher cache are built on first
use; ``KDSWEEP_CACHE`` says where they are kept)::

    python benchmarks/checkpoints.py              # the demo trial, 3 times each way; Qwen3-0.6B
    python benchmarks/checkpoints.py --no-qwen3   # the demo only (Qwen3-0.6B takes ~10 GB of
                                                  # memory and writes a ~7 GB file)

What it measures:

- overhead: one demo trial as the objective runs it (a fresh student, its 500 steps, an
  evaluation every 100 with the best checkpoint kept, accuracy at the end), once writing a resume
  checkpoint at each evaluation (the default, ``train.checkpoint_every`` unset) and once writing
  none; after a warm-up trial the runs alternate, ``--repeats`` of each, and the fastest of each
  counts (the least disturbed by the rest of the machine). Reported: both times, and the time
  spent writing checkpoints inside the trial (capture and write, timed around each). Goal: the
  checkpoints add at most 5% (both measures).
- size and write time of one resume checkpoint (weights, AdamW's two moments, schedule, random
  states, evaluations) for the demo student after its trial, and for Qwen3-0.6B's shape in fp32
  (random weights; AdamW's moments filled as after a step), written to ``--dir`` (default: the
  cache's checkpoint folder, where a study writes them).
- the best checkpoint's copy: the time to copy the student's weights to the CPU when an
  evaluation beats the best, and its size (one copy per running trial, in memory).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from kdsweep.distill import checkpoints, models, train  # noqa: E402
from kdsweep.paths import cache_dir  # noqa: E402
from kdsweep.prepare.trial_runner import TrialRunner  # noqa: E402
from kdsweep.progress import SweepProgress  # noqa: E402
from kdsweep.study.reader import load_study  # noqa: E402
from kdsweep.study.space import SEARCH_SPACE, WHOLE_VOCAB, neutral  # noqa: E402

GOAL = 0.05


def demo_params(study) -> dict:
    """A distilled configuration of the study: alpha 0.5, T 2, its smallest top_k."""
    params = {p.name: neutral(study.search, p.name) for p in SEARCH_SPACE}
    top_ks = [k for k in study.search.top_k.values if k != WHOLE_VOCAB]
    return params | {"alpha": 0.5, "temperature": 2.0, "top_k": min(top_ks or [WHOLE_VOCAB])}


class Saving(train.TrialHooks):
    """A trial's resume checkpoints written to ``folder`` (None: none), each timed."""

    def __init__(self, folder: Path | None):
        self.folder, self.checkpointing, self.saved = folder, folder is not None, []

    def checkpoint(self, state) -> None:
        started = time.perf_counter()
        checkpoints.save(state, self.folder / "trial.resume.pt")
        self.saved.append((state.step, time.perf_counter() - started))


def timed_trial(runner: TrialRunner, params: dict, folder: Path | None) -> tuple[float, list]:
    """Seconds of one trial, and the states it saved (written to ``folder``; None: none)."""
    hooks = Saving(folder)
    started = time.perf_counter()
    runner(params, hooks)
    return time.perf_counter() - started, hooks.saved


def write_once(state: checkpoints.TrainState, folder: Path) -> tuple[float, int]:
    """Seconds to write ``state`` (through to the disk), and the file's bytes."""
    path = folder / "trial.resume.pt"
    started = time.perf_counter()
    checkpoints.save(state, path)
    with open(path, "rb") as written:
        os.fsync(written.fileno())
    seconds = time.perf_counter() - started
    size = path.stat().st_size
    path.unlink()
    return seconds, size


def best_copy(model) -> tuple[float, int]:
    """Seconds for the best checkpoint's copy of ``model``, and its bytes."""
    best = checkpoints.BestCheckpoint(lambda new, old: True)
    started = time.perf_counter()
    best.offer(1, {}, model, last=False)
    seconds = time.perf_counter() - started
    unique = {t.data_ptr(): t for t in best.state.values()}
    return seconds, sum(t.numel() * t.element_size() for t in unique.values())


def loop_state(student, optimizer) -> checkpoints.TrainState:
    """A resume checkpoint of ``student`` and ``optimizer``, holding what the loop's does."""
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return checkpoints.TrainState(
        step=100,
        student=student.state_dict(),
        optimizer=optimizer.state_dict(),
        schedule=schedule.state_dict(),
        scaler={},
        torch_rng=torch.get_rng_state(),
        cuda_rng=None,
        coin=random.Random(0).getstate(),
        window={"loss": torch.tensor(0.0), "steps": 0, "tokens": 0},
        evaluations=[(step, {"student_ppl": 1.0}) for step in range(100, 600, 100)],
    )


def qwen3_state(folder: Path) -> dict:
    """Qwen3-0.6B in fp32 with AdamW's moments: the size and write time of its checkpoint."""
    from transformers import Qwen3ForCausalLM

    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu import qwen3_0_6b  # the published configuration

    torch.manual_seed(0)
    student = Qwen3ForCausalLM(qwen3_0_6b())
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    for param in student.parameters():  # the moments as after a step, without a backward pass
        optimizer.state[param] = {
            "step": torch.tensor(1.0),
            "exp_avg": torch.zeros_like(param),
            "exp_avg_sq": torch.zeros_like(param),
        }
    parameters = sum(p.numel() for p in student.parameters())
    seconds, size = write_once(loop_state(student, optimizer), folder)
    copy_seconds, copy_size = best_copy(student)
    del student, optimizer
    gc.collect()
    return {
        "parameters": parameters,
        "seconds": seconds,
        "bytes": size,
        "copy_seconds": copy_seconds,
        "copy_bytes": copy_size,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", nargs="?", default=str(REPO / "studies" / "demo.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-qwen3", dest="qwen3", action="store_false")
    parser.add_argument("--dir", type=Path, default=None, help="where checkpoints are written")
    parser.add_argument(
        "--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE"
    )
    args = parser.parse_args(argv)
    study = load_study(args.study, args.overrides)
    runner = TrialRunner.prepare(study, progress=SweepProgress(Console(stderr=True)))
    params = demo_params(study)
    folder = args.dir or cache_dir() / "checkpoints" / "benchmark"
    folder.mkdir(parents=True, exist_ok=True)

    timed_trial(runner, params, None)  # warm-up: first-call costs belong to neither side
    without, with_, writes = [], [], []
    for _ in range(args.repeats):
        without.append(timed_trial(runner, params, None)[0])
        seconds, saved = timed_trial(runner, params, folder)
        with_.append(seconds)
        writes += [s for _, s in saved]
    (folder / "trial.resume.pt").unlink(missing_ok=True)
    base, checkpointed = min(without), min(with_)
    overhead = checkpointed / base - 1
    written = sum(writes) / args.repeats  # seconds of writes in one trial

    student = models.load_model("student", runner.inputs.student, runner.device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    demo_seconds, demo_bytes = write_once(loop_state(student, optimizer), folder)
    copy_seconds, copy_bytes = best_copy(student)

    trial = study.train
    print(
        f"\n{study.name}: one trial of {trial.max_steps} steps, an evaluation every "
        f"{trial.eval_every} (so {len(writes) // args.repeats} resume checkpoints), device "
        f"{runner.device}, fastest of {args.repeats}"
    )
    print(f"  trial without checkpoints   {base:8.2f} s")
    print(f"  trial with checkpoints      {checkpointed:8.2f} s")
    print(
        f"  difference                  {overhead:8.1%}  (end to end: within the machine's noise)"
    )
    share = written / checkpointed
    verdict = "met" if max(share, overhead) <= GOAL else "NOT met"
    print(
        f"  writing the checkpoints     {1e3 * written:8.1f} ms = {share:.2%} of the trial "
        f"(goal <= {GOAL:.0%}: {verdict})"
    )
    print(f"\nresume checkpoint, written to {folder}")
    print(f"  {'student':<14} {'parameters':>12} {'file':>10} {'write (fsync)':>14}")
    params_n = sum(p.numel() for p in student.parameters())
    print(f"  {'demo':<14} {params_n:12,} {demo_bytes / 2**20:8.2f} MB {demo_seconds:12.3f} s")
    print("\nbest checkpoint (CPU copy, train.select: best)")
    print(f"  {'demo':<14} {copy_bytes / 2**20:8.2f} MB in {1e3 * copy_seconds:.1f} ms")
    if args.qwen3:
        q = qwen3_state(folder)
        print(
            f"\nresume checkpoint, Qwen3-0.6B (fp32 weights + AdamW's two moments)\n"
            f"  {'qwen3-0.6b':<14} {q['parameters']:12,} {q['bytes'] / 2**30:8.2f} GB "
            f"{q['seconds']:12.1f} s  ({q['bytes'] / 2**30 / q['seconds']:.2f} GB/s)"
        )
        print(
            f"best checkpoint, Qwen3-0.6B: {q['copy_bytes'] / 2**30:.2f} GB in "
            f"{q['copy_seconds']:.2f} s"
        )


if __name__ == "__main__":
    main()
