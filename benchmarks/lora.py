"""LoRA against full fine-tuning, measured: a Qwen3-0.6B-shaped student's peak memory and step
time through kdsweep's own training loop, whole and with a LoRA adapter.

Run by hand from the repository root::

    python benchmarks/lora.py                    # CPU: 4 of Qwen3-0.6B's 28 layers, ranks 16
    python benchmarks/lora.py --layers 28 --device cuda --batch 8 --seq 512   # on a GPU
    python benchmarks/lora.py --ranks 8 16 64    # other ranks

The student is Qwen3-0.6B's configuration (vocabulary 151,936, hidden size 1,024, tied
embeddings) with ``--layers`` layers and random fp32 weights (no hub access). Each form trains in
a process of its own, for ``--steps`` optimizer steps of ``--batch`` rows of ``--seq`` random
tokens (the first untimed), through ``benchmarks/gpu.py``'s loop: ``train.distill`` at alpha 0
(the distillation term's memory is the same for every
form: the cached teacher's top-K, see ``benchmarks/loss.py``), AdamW on what the form trains, the
adapter on every linear layer but the output layer (``student.lora`` defaults). Peak memory is,
on a CPU, the process's peak resident set above what it held before the model was built (weights,
gradients, AdamW's two moments, activations: all the training holds), on a GPU
``torch.cuda.max_memory_allocated`` over the timed steps. Goal: LoRA at most 0.5x full
fine-tuning's peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import psutil  # noqa: E402
import torch  # noqa: E402
from gpu import build_model, kdsweep_run, peak_bytes, qwen3_0_6b, synthetic_split  # noqa: E402

from kdsweep.distill import lora  # noqa: E402
from kdsweep.distill.models import Vocabulary  # noqa: E402
from kdsweep.study.config import LoraConfig  # noqa: E402

GOAL = 0.5


def one_form(args) -> dict:
    """Train one form in this process; what it trained, its peak memory and its step time."""
    device = torch.device(args.device)
    before = psutil.Process().memory_info().rss  # the process with its libraries, no model yet
    config = qwen3_0_6b()
    config.num_hidden_layers = args.layers
    config.vocab_size = args.vocab or config.vocab_size
    student = build_model(config, device, torch.float32, seed=0)
    student = lora.adapt(student, args.rank, LoraConfig())
    vocab = Vocabulary(config.vocab_size, config.vocab_size, config.vocab_size)
    # The GPU benchmark's loop: its first step warms up allocators and kernels, untimed.
    loop = SimpleNamespace(
        warmup=1,
        steps=args.steps - 1,
        batch=args.batch,
        precision="auto",
        chunk_tokens=None,
        gen_tokens=1,  # no on-policy step
    )
    split = synthetic_split(args.batch * args.steps, args.seq, config.vocab_size)
    clock = kdsweep_run(
        student, split, None, args=loop, top_k=None, alpha=0.0, device=device, vocab=vocab
    )
    # CUDA's allocator counts the model's tensors only; on a CPU, the peak resident set above the
    # process's start (Python, torch and transformers imported)
    peak = (
        peak_bytes(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    )
    return {
        "rank": args.rank,
        "trainable": sum(p.numel() for p in student.parameters() if p.requires_grad),
        "parameters": sum(p.numel() for p in student.parameters()),
        "peak_gb": peak / 1e9,
        "step_s": (clock[-1] - clock[0]) / loop.steps,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="of Qwen3-0.6B's 28")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16], help="LoRA ranks")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="the first one untimed (>= 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch's CPU threads")
    parser.add_argument("--vocab", type=int, help="a smoke test (default: Qwen3's 151,936)")
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)  # one form, in a child
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rank is not None:
        print(json.dumps(one_form(args)))
        return
    shared = [
        *("--layers", str(args.layers), "--batch", str(args.batch), "--seq", str(args.seq)),
        *("--steps", str(args.steps), "--device", args.device, "--threads", str(args.threads)),
        *(("--vocab", str(args.vocab)) if args.vocab else ()),
    ]
    rows = []
    for rank in [0, *args.ranks]:  # each in a fresh process: a peak RSS only grows
        child = subprocess.run(
            [sys.executable, __file__, *shared, "--rank", str(rank)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(f"rank {rank}: {rows[-1]}", flush=True)
    full = rows[0]
    print(
        f"\nQwen3-0.6B-shaped student, {args.layers} of 28 layers, {full['parameters']:,} "
        f"parameters; batch {args.batch} x {args.seq} tokens, {args.steps} steps, {args.device}"
    )
    print("| form | trainable parameters | peak GB | x full | step s | x full | goal |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for row in rows:
        ratio = row["peak_gb"] / full["peak_gb"]
        goal = "" if not row["rank"] else ("met" if ratio <= GOAL else "not met") + f" (<= {GOAL})"
        name = f"LoRA rank {row['rank']}" if row["rank"] else "full fine-tuning"
        print(
            f"| {name} | {row['trainable']:,} | {row['peak_gb']:.2f} | {ratio:.2f} | "
            f"{row['step_s']:.2f} | {row['step_s'] / full['step_s']:.2f} | {goal} |"
        )


if __name__ == "__main__":
    main()
