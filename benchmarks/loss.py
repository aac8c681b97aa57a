"""kdsweep's distillation loss against a naive PyTorch version of the same formulas.

Run by hand from the repository root::

    python benchmarks/loss.py              # V = 151,936, fp32, CPU (~25 min on 2 cores)
    python benchmarks/loss.py --quick      # small N and V: a smoke run
    python benchmarks/loss.py --tokens 1024,2048 --betas 0.5
    python benchmarks/loss.py --device cuda

Each case is one forward + backward of ``alpha * T^2 * D + (1 - alpha) * CE`` (alpha 0.5, T 2, 10%
of labels -100), ``D`` the generalized JSD at ``beta`` in {0, 0.5, 1} (forward KL, the mixture,
reverse KL), with the teacher as full logits ("full") or as its top-64 values and ids ("top64",
kdsweep's `distill_loss_sparse`, default tail "renormalize"), in two forms, by default at
N = 1024 in the logits form and N = 2048 in the hidden one:

- logits: the student's ``[N, V]`` logits are the input; kdsweep uses `distill_loss(_sparse)`.
- hidden: the input is hidden states ``[N, H]`` and the lm_head weight ``[V, H]``; kdsweep uses
  `distill_loss_from_hidden`, the naive version computes ``logits = hidden @ weight.T`` first.

The naive version (`naive_loss`) is what one writes first: ``log_softmax`` over ``[N, V]``, the
divergence as TRL's ``generalized_jsd_loss`` writes it (``F.kl_div`` with log targets; the
mixture's
log by ``logsumexp`` of a stack), a ``[N, V]`` tensor of -inf with the top-k scattered in,
``F.cross_entropy``, autograd for the backward. It computes the same numbers as kdsweep's default
tail, so the last column compares the two losses.

How it measures, and why it is honest:

- Each (case, implementation) runs in a fresh subprocess, so no allocator cache or heap left by
  another case hides or adds memory.
- Memory on CPU: after the inputs exist (and any throw-away tensors used to make them are
  freed), the process's RSS high-water mark is reset (Linux: ``echo 5 > /proc/self/clear_refs``)
  and its RSS read; "extra peak" is the high-water mark after one forward + backward minus that
  RSS. The gradients left behind (``.grad`` of the inputs) are included: they are part of what
  a training step holds. The "excl. grads" ratio subtracts their size from both sides, leaving
  the working memory each implementation needs on top of its unavoidable outputs.
- That RSS includes what glibc's heap keeps after a free. The naive version's tensors are all
  above glibc's largest mmap threshold (32 MiB), so they are returned to the system when freed;
  so are most of kdsweep's per-chunk temporaries on a CPU (34 MiB), while smaller ones (the
  mixture's, 27 MiB) are recycled through the heap, which can hold more than their live size.
  ``--live-memory`` runs every case with ``MALLOC_MMAP_THRESHOLD_=65536``, so each tensor gets
  its own mapping and RSS follows the live tensors, like CUDA's ``max_memory_allocated``.
- Memory on CUDA: ``torch.cuda.max_memory_allocated()`` after a reset, minus the memory allocated
  before the call.
- Time: the median of ``--reps`` forward + backward calls (``--hidden-reps`` in the hidden form,
  whose matmuls make each call long), the first being the one whose memory is measured. On CPU
  the flagged ratio is of process CPU time (user + system, all threads), because the machine may
  be shared and wall time then measures the neighbours; wall time is shown too, with the load
  average. On CUDA it is synchronised wall time.

Targets flagged in the table: extra peak memory <= 0.25x naive in the logits form and <= 0.15x
in the hidden form (there the fp32 ``[V, H]`` weight gradient alone is ~0.085x at N = 2048);
time <= 1.0x naive.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdsweep.losses import distill_loss, distill_loss_from_hidden, distill_loss_sparse  # noqa: E402

V, H = 151_936, 1024  # Qwen3's vocabulary, Qwen3-0.6B's hidden size
ALPHA, TEMPERATURE, TOP_K, IGNORED = 0.5, 2.0, 64, 0.1
BETAS = (0.0, 0.5, 1.0)
MEMORY_TARGET = {"logits": 0.25, "hidden": 0.15}
TIME_TARGET = 1.0
TOKENS = {"logits": (1024,), "hidden": (2048,)}  # the default N of each form
LOWEST, LOG_TINY = torch.finfo(torch.float32).min, math.log(torch.finfo(torch.float32).tiny)


@dataclass(frozen=True)
class Case:
    form: str  # "logits" or "hidden"
    tokens: int
    teacher: str  # "full" or "top64"
    beta: float
    impl: str  # "naive" or "kdsweep"
    vocab: int
    hidden_size: int
    device: str
    reps: int
    chunk_tokens: int | None = None  # hidden form only; None: the function's default


def naive_loss(
    student: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float,
    teacher: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """The formulas written plainly over ``[N, V]``; teacher as logits or top-k values + ids.

    A top-k teacher is renormalised over its ids by the softmax of its -inf-filled logits, and
    at beta = 1 the student over the same ids (kdsweep's default tail); their -inf logs are
    clamped, as 0 * -inf would be NaN (to log(smallest normal) for a teacher's in reverse KL).
    """
    log_q = F.log_softmax(student / TEMPERATURE, dim=-1)
    if teacher is None:
        teacher = torch.full_like(student, float("-inf")).scatter(-1, indices, values.float())
        log_p = F.log_softmax(teacher / TEMPERATURE, dim=-1)
        log_p = log_p.clamp(min=LOG_TINY if beta == 1.0 else LOWEST)
        if beta == 1.0:
            kept = torch.full_like(student, float("-inf")).scatter(
                -1, indices, student.gather(-1, indices)
            )
            log_q = F.log_softmax(kept / TEMPERATURE, dim=-1).clamp(min=LOWEST)
    else:
        log_p = F.log_softmax(teacher / TEMPERATURE, dim=-1)
    return ALPHA * TEMPERATURE**2 * mean_kept(generalized_jsd(log_p, log_q, beta), labels) + (
        1 - ALPHA
    ) * F.cross_entropy(student, labels, ignore_index=-100)


def generalized_jsd(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """Per row, as TRL's ``generalized_jsd_loss`` computes it."""
    if beta == 0.0:
        return kl(log_p, log_q)
    if beta == 1.0:
        return kl(log_q, log_p)
    log_m = torch.logsumexp(torch.stack([log_q + math.log1p(-beta), log_p + math.log(beta)]), 0)
    return beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)


def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Per-row KL(a || b), TRL's ``F.kl_div(log_b, log_a, log_target=True)``."""
    return F.kl_div(log_b, log_a, reduction="none", log_target=True).sum(-1)


def mean_kept(rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    keep = labels != -100
    return (rows * keep).sum() / keep.sum()


def make_inputs(case: Case) -> dict[str, torch.Tensor]:
    """Inputs of one case on its device; teacher top-k is taken from random full logits."""
    gen = torch.Generator().manual_seed(0)
    n, v, device = case.tokens, case.vocab, case.device
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < IGNORED] = -100
    inputs = {"labels": labels.to(device)}
    teacher = (3 * torch.randn(n, v, generator=gen)).to(device)
    if case.teacher == "full":
        inputs["teacher"] = teacher
    else:
        top = teacher.topk(TOP_K, dim=-1)
        inputs["values"], inputs["indices"] = top.values, top.indices
    del teacher
    if case.form == "logits":
        inputs["student"] = (2 * torch.randn(n, v, generator=gen)).to(device).requires_grad_()
    else:
        h = case.hidden_size
        inputs["hidden"] = torch.randn(n, h, generator=gen).to(device).requires_grad_()
        inputs["weight"] = (torch.randn(v, h, generator=gen) / h**0.5).to(device).requires_grad_()
    return inputs


def step(case: Case, x: dict[str, torch.Tensor]) -> float:
    """One forward + backward; returns the loss value."""
    teacher = {"teacher": x.get("teacher"), "values": x.get("values"), "indices": x.get("indices")}
    settings = dict(alpha=ALPHA, temperature=TEMPERATURE, beta=case.beta)
    if case.impl == "naive":
        student = x["student"] if case.form == "logits" else x["hidden"] @ x["weight"].T
        loss = naive_loss(student, x["labels"], beta=case.beta, **teacher)
    elif case.form == "logits" and case.teacher == "full":
        loss = distill_loss(x["student"], x["teacher"], x["labels"], **settings).loss
    elif case.form == "logits":
        loss = distill_loss_sparse(
            x["student"], x["values"], x["indices"], x["labels"], **settings
        ).loss
    else:
        loss = distill_loss_from_hidden(
            x["hidden"],
            x["weight"],
            x["labels"],
            teacher_logits=teacher["teacher"],
            teacher_values=teacher["values"],
            teacher_indices=teacher["indices"],
            chunk_tokens=case.chunk_tokens,
            **settings,
        ).loss
    loss.backward()
    return loss.item()


class Memory:
    """Extra peak memory of the code between `start` and `peak`: RSS on CPU, allocator on CUDA."""

    def __init__(self, device: str):
        self.device = device

    def start(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.base = _proc_status_kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _proc_status_kib("VmHWM") * 1024 - self.base


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status: CPU memory needs Linux")


def run_child(case: Case) -> dict[str, object]:
    """Measures one case in this process (a fresh subprocess of `main`)."""
    x = make_inputs(case)
    memory = Memory(case.device)
    walls, cpus = [], []
    for rep in range(case.reps):
        for t in x.values():
            t.grad = None
        if rep == 0:
            memory.start()
        wall, cpu = time.perf_counter(), time.process_time()
        loss = step(case, x)
        if case.device == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        if rep == 0:
            peak = memory.peak()
            grads = sum(
                t.grad.numel() * t.grad.element_size() for t in x.values() if t.grad is not None
            )
    return {
        "loss": loss,
        "peak": peak,
        "grads": grads,
        "wall": statistics.median(walls),
        "cpu": statistics.median(cpus),
    }


def measure(case: Case, *, live_memory: bool) -> dict[str, object]:
    command = [sys.executable, __file__, "--child", json.dumps(asdict(case))]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if live_memory else None
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def gib(n: float) -> str:
    return f"{n / 2**30:6.2f}"


def row(case: Case, naive: dict, ours: dict, timer: str) -> str:
    memory = ours["peak"] / naive["peak"]
    workspace = (ours["peak"] - ours["grads"]) / (naive["peak"] - naive["grads"])
    speed = ours[timer] / naive[timer]
    target = MEMORY_TARGET[case.form]
    memory_flag = "ok" if memory <= target else "MISS"
    time_flag = "ok" if speed <= TIME_TARGET else "MISS"
    loss_gap = abs(ours["loss"] - naive["loss"]) / abs(naive["loss"])
    return (
        f"{case.form:6} {case.tokens:5} {case.teacher:5} {case.beta:4.2f} | "
        f"{gib(naive['peak'])} {gib(ours['peak'])} {gib(ours['grads'])} | {memory:5.3f} "
        f"{memory_flag:4} (<={target:.2f}) {workspace:5.3f} | {naive[timer]:6.1f} "
        f"{ours[timer]:6.1f} {speed:5.2f} {time_flag:4} | {naive['wall']:6.1f} "
        f"{ours['wall']:6.1f} {ours['wall'] / naive['wall']:5.2f} | {loss_gap:.0e}"
    )


HEADER = (
    "                        | extra peak memory, GiB | kds/naive              | {timer:>6} time,"
    " s           | wall time, s         | loss\n"
    "form       N teach beta |  naive    kds  grads  | ratio       (target)  excl.grads"
    " |  naive    kds ratio      |  naive    kds ratio | rel.diff"
)


def load() -> str:
    return "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="N in {128, 256}, V = 8192, H = 64")
    parser.add_argument(
        "--tokens",
        help="comma-separated N for every form (default: logits "
        f"{TOKENS['logits']}, hidden {TOKENS['hidden']})",
    )
    parser.add_argument("--betas", default=",".join(map(str, BETAS)), help="comma-separated")
    parser.add_argument("--reps", type=int, default=3, help="calls per logits-form case (median)")
    parser.add_argument("--hidden-reps", type=int, default=1, help="calls per hidden-form case")
    parser.add_argument(
        "--hidden-chunk",
        type=int,
        help="chunk_tokens of the hidden form (default: distill_loss_from_hidden's)",
    )
    parser.add_argument("--forms", default="logits,hidden", help="comma-separated subset")
    parser.add_argument(
        "--live-memory",
        action="store_true",
        help="CPU: glibc mmaps every tensor, so RSS follows live tensors",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(Case(**json.loads(args.child)))))
        return
    vocab, hidden_size = (8192, 64) if args.quick else (V, H)
    timer = "wall" if args.device == "cuda" else "cpu"
    print(
        f"V={vocab} H={hidden_size} fp32 {args.device} threads={torch.get_num_threads()} "
        f"reps={args.reps}/{args.hidden_reps} (logits/hidden) hidden chunk_tokens="
        f"{args.hidden_chunk or 'default'} alpha={ALPHA} T={TEMPERATURE} "
        f"{'live-memory ' if args.live_memory else ''}{load()}"
    )
    print(HEADER.format(timer=timer))
    for form in args.forms.split(","):
        reps = args.reps if form == "logits" else args.hidden_reps
        chunk = args.hidden_chunk if form == "hidden" else None
        for tokens in sizes(form, args):
            for teacher in ("full", "top64"):
                for beta in map(float, args.betas.split(",")):
                    cases = {
                        impl: Case(
                            form,
                            tokens,
                            teacher,
                            beta,
                            impl,
                            vocab,
                            hidden_size,
                            args.device,
                            reps,
                            chunk,
                        )
                        for impl in ("naive", "kdsweep")
                    }
                    results = {
                        impl: measure(case, live_memory=args.live_memory)
                        for impl, case in cases.items()
                    }
                    print(
                        row(cases["kdsweep"], results["naive"], results["kdsweep"], timer),
                        flush=True,
                    )
    print(load())


def sizes(form: str, args: argparse.Namespace) -> tuple[int, ...]:
    if args.tokens:
        return tuple(int(n) for n in args.tokens.split(","))
    return (128, 256) if args.quick else TOKENS[form]


if __name__ == "__main__":
    main()
