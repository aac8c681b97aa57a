"""AdamW's step in torch's per-tensor loop, foreach and fused kernels, and kdsweep's whole step,
distillation against plain fine-tuning, on a 40M-parameter student.

Run by hand from the repository root::

    python benchmarks/optimizer.py                 # CPU, 2 threads: about two minutes
    python benchmarks/optimizer.py --layers 1 --vocab 512 --rounds 1 --steps 1   # a smoke run

The student is Qwen3-shaped (hidden size 512, 8 layers, vocabulary 32,000, tied embeddings:
41.6M parameters), random fp32 weights. Two measurements, each in this one process:

- the optimizer step: AdamW over copies of the student's parameters from the same gradients,
  in torch's per-tensor loop (its default on a CPU, and kdsweep's before it took the fused
  kernel), foreach (its default on a GPU) and fused (kdsweep's, ``train.adamw``); the kernels take
  turns step by step (``benchmarks/gpu.py``'s ``time_adamw``);
- kdsweep's step through its own loop (``train.distill``, fused AdamW): plain fine-tuning (alpha
  0, no teacher) and distillation from the teacher's top-K cache (alpha 0.5, top_k 16; the
  teacher is a random Qwen3 of the same shape, run once into the cache), on ``--batch`` rows of
  ``--seq`` random tokens, the first quarter of each row an unscored prompt; the two alternate,
  ``--rounds`` times.

It prints each kernel's median step and its ratio to the loop, how far the kernels' parameters
end apart, the distillation step against the plain one, and the optimizer's share of the plain
step. On a GPU, ``benchmarks/gpu.py`` measures the kernels at Qwen3-0.6B.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import torch  # noqa: E402
from gpu import (  # noqa: E402
    build_cache,
    build_model,
    kdsweep_run,
    synthetic_split,
    time_adamw,
)
from transformers import Qwen3Config  # noqa: E402

from kdsweep.distill.models import Vocabulary  # noqa: E402

TOP_K = 16


def student_config(vocab: int, layers: int) -> Qwen3Config:
    """A 40M-parameter Qwen3 (at vocabulary 32,000 and 8 layers), most of it its embeddings."""
    return Qwen3Config(
        vocab_size=vocab,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )


def time_steps(args, device: torch.device) -> dict[str, list[float]]:
    """kdsweep's step at alpha 0 and from the cache, alternating; seconds per step, per run."""
    config = student_config(args.vocab, args.layers)
    vocab = Vocabulary(config.vocab_size, config.vocab_size, config.vocab_size)
    split = synthetic_split(args.batch * (1 + args.steps), args.seq, config.vocab_size)
    loop = SimpleNamespace(
        warmup=1,
        steps=args.steps,
        batch=args.batch,
        seq=args.seq,
        precision="fp32",
        chunk_tokens=None,
        gen_tokens=1,
        top_k=TOP_K,
    )
    teacher = build_model(config, device, torch.float32, seed=2).eval().requires_grad_(False)
    seconds = {"plain fine-tuning": [], "distillation, cached top-16": []}
    with tempfile.TemporaryDirectory(prefix="kdsweep-optimizer-bench-") as tmp:
        cache, _ = build_cache(teacher, split, vocab, Path(tmp), args=loop, device=device)
        del teacher
        for _ in range(args.rounds):
            for name, signal, alpha in (
                ("plain fine-tuning", None, 0.0),
                ("distillation, cached top-16", cache, 0.5),
            ):
                student = build_model(config, device, torch.float32, seed=1)
                clock = kdsweep_run(
                    student,
                    split,
                    signal,
                    args=loop,
                    top_k=TOP_K if signal else None,
                    alpha=alpha,
                    device=device,
                    vocab=vocab,
                )
                seconds[name].append((clock[-1] - clock[0]) / args.steps)
    return seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run, after one")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each kind, alternating")
    parser.add_argument("--optimizer-steps", type=int, default=6, help="the first untimed")
    parser.add_argument("--threads", type=int, default=2, help="torch's CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    student = build_model(student_config(args.vocab, args.layers), device, torch.float32, seed=1)
    parameters = sum(p.numel() for p in student.parameters())
    kernels = time_adamw(student, device=device, warmup=1, steps=args.optimizer_steps - 1)
    del student
    steps = time_steps(args, device)

    print(f"student: Qwen3-shaped, {parameters:,} parameters; CPU, {args.threads} threads")
    print("| AdamW kernel | median step s | x loop | max abs diff from the loop |")
    print("|---|---:|---:|---:|")
    loop = kernels["loop"]["step_s"]
    for name, kernel in kernels.items():
        print(
            f"| {name} | {kernel['step_s']:.4f} | {kernel['step_s'] / loop:.3f} | "
            f"{kernel['max_abs_diff']:.2e} |"
        )
    print(f"\nkdsweep's step, batch {args.batch} x {args.seq} tokens (fused AdamW):")
    print("| step | median s | runs |")
    print("|---|---:|---|")
    median = {name: statistics.median(runs) for name, runs in steps.items()}
    for name, runs in steps.items():
        print(f"| {name} | {median[name]:.3f} | {', '.join(f'{s:.3f}' for s in runs)} |")
    plain, distilled = median["plain fine-tuning"], median["distillation, cached top-16"]
    fused = kernels["fused"]["step_s"]
    print(f"distillation step / plain fine-tuning step: {distilled / plain:.3f}")
    print(
        f"the optimizer's share of the plain step: {fused / plain:.1%} fused; with the loop "
        f"(estimated: the step less the fused kernel's time plus the loop's) "
        f"{loop / (plain - fused + loop):.1%}"
    )
    return {"kernels": kernels, "steps": steps}


if __name__ == "__main__":
    main()
