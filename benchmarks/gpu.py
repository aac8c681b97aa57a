"""Distillation throughput on one GPU: the original notebook's loop against kdsweep's, online and
cached.

Run by hand on a machine with one H100 or H200; the Qwen3-0.6B student and Qwen3-4B teacher are
built from their configurations (written out below) with random weights, so no hub access is
needed. It finishes in a few minutes (``--budget-s`` skips what would not fit)::

    python benchmarks/gpu.py --output gpu.json
    python benchmarks/gpu.py --tiny --output tiny.json     # CPU smoke run, tiny configurations
    python benchmarks/gpu.py --tiny --precision bf16 --teacher-dtype bfloat16   # ... in the GPU's
    dtypes

Every mode trains the same student on the same batches (``--batch`` rows of ``--seq`` tokens, the
first quarter of each row a prompt that is not scored) for ``--warmup`` + ``--steps`` optimizer
steps; tokens/s, MFU and peak memory are measured over the last ``--steps``:

- notebook: the original notebook's loop: fp32 weights, the teacher run in fp32 at every step
  (outside autocast), the student under fp16 autocast with a GradScaler, the notebook's
  ``DistillationLossWithTopK`` (full ``[B, S, V]`` softmaxes, a -inf tensor for the top-k,
  ``KLDivLoss(batchmean)``) and its ``loss.item()`` per step.
- online: kdsweep's ``train.distill``: the teacher in bf16, run at every step on the scored
  positions only; fp32 master weights under bf16 autocast; the chunked hidden-state loss.
- cached: the same loop reading the teacher's top-K from kdsweep's cache, built once beforehand
  (its build time is reported apart; the teacher is freed before training, as a sweep does).
- ce: the same loop with alpha 0 (plain cross-entropy, no teacher): the floor for any of them.
- lora-16: the cached loop with the student as a LoRA adapter of rank 16 on every linear layer
  but the output layer (``student.lora``'s defaults, peft): only the adapter trains.
- onpolicy-0.5, onpolicy-1: the cached loop with lmbda 0.5 and 1: that share of the steps has the
  student sample ``--gen-tokens`` new tokens after each row's prompt (its first quarter), with the
  KV cache, the bf16 teacher score them online, and trains on them (plus the reference CE); their
  tokens/s count the training tokens only, and their MFU is left out (generation is not a matmul
  workload of the same shape).
- cached-gc: the cached loop with the student's gradient checkpointing
  (``train.gradient_checkpointing``): the memory it saves, the recompute it costs.
- cached-eager, cached-fa2: the cached loop with the student's attention in transformers' eager
  implementation and in flash_attention_2 (``train.attn_implementation``; sdpa elsewhere);
  cached-fa2 is skipped without the flash-attn package.

Then AdamW's step over the student's parameters in torch's per-tensor loop, its foreach kernels
(torch's default on a GPU) and the fused kernel kdsweep uses, taking turns step by step.

Its time, estimated from its work: 10 modes of ``--warmup`` + ``--steps`` (13) steps at batch 8 x
512; the cached modes' steps are a fraction of a second on an H100, the notebook's about a
second (its fp32 teacher), the on-policy modes' a few seconds (64 tokens generated per step);
with the models' building and the cache, about 4 to 6 minutes. ``--budget-s`` (420) starts no
mode after 7 minutes, so a slower GPU still ends within 10.

MFU = (model FLOPs of the work the mode does) / time / the GPU's dense bf16 peak: the student's
forward and backward (3x its forward), plus the teacher's forward where the teacher runs. A
forward is 2 FLOPs per weight of every matmul (the output layer included) plus causal attention.
The notebook's fp32 teacher is counted against the same bf16 peak: the GPU could do that work in
bf16. Peak memory is ``torch.cuda.max_memory_allocated`` over the timed run, weights included.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402
from transformers.utils import is_flash_attn_2_available  # noqa: E402

from kdsweep.data import TokenizedSplit, make_batches  # noqa: E402
from kdsweep.distill import lora, train  # noqa: E402
from kdsweep.distill.loss import DistillSettings  # noqa: E402
from kdsweep.distill.models import Vocabulary, resolve_dtype  # noqa: E402
from kdsweep.distill.targets import OnlineTeacher  # noqa: E402
from kdsweep.errors import described  # noqa: E402
from kdsweep.losses import IGNORE_INDEX  # noqa: E402
from kdsweep.prepare.teacher_cache import (  # noqa: E402
    CachedTeacher,
    CacheKey,
    open_or_build,
    write_cache,
)
from kdsweep.study.config import LoraConfig, TrainConfig  # noqa: E402

ALPHA, TEMPERATURE = 0.5, 2.0
ROPE = {"rope_type": "default", "rope_theta": 1_000_000.0}


def qwen3_0_6b() -> Qwen3Config:
    """Qwen/Qwen3-0.6B's config.json, as published."""
    return _qwen3(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16
    )


def qwen3_4b() -> Qwen3Config:
    """Qwen/Qwen3-4B's config.json, as published."""
    return _qwen3(
        hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32
    )


def _qwen3(**sizes: int) -> Qwen3Config:
    """What the Qwen3 family shares: vocabulary, head layout, RoPE, tied embeddings."""
    return Qwen3Config(
        vocab_size=151936,
        num_key_value_heads=8,
        head_dim=128,
        hidden_act="silu",
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_parameters=ROPE,
        tie_word_embeddings=True,
        attention_bias=False,
        bos_token_id=151643,
        eos_token_id=151645,
        **sizes,
    )


def tiny_configs() -> tuple[Qwen3Config, Qwen3Config]:
    """Student and teacher small enough for a CPU smoke run; same code paths as the real ones."""
    shape = dict(
        vocab_size=512, max_position_embeddings=256, rope_parameters=ROPE, tie_word_embeddings=True
    )
    student = Qwen3Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        **shape,
    )
    teacher = Qwen3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        **shape,
    )
    return student, teacher


# ---------------------------------------------------------------------------------------------
# FLOPs and the GPU's peak


def matmul_weights(config: Qwen3Config) -> int:
    """Weights that take part in a matmul per token: attention, MLP and the output layer (the
    input embedding is a lookup)."""
    heads = config.head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    per_layer = config.hidden_size * heads + 3 * config.hidden_size * config.intermediate_size
    return config.num_hidden_layers * per_layer + config.vocab_size * config.hidden_size


def forward_flops_per_token(config: Qwen3Config, seq: int) -> float:
    # QK^T and AV: 2 FLOPs per multiply-add each, over a causal context of seq/2 on average.
    attention = (
        2 * 2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq / 2
    )
    return 2 * matmul_weights(config) + attention


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """Dense bf16 peak of the GPU (NVIDIA's data sheets), None where unknown (a CPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for marker, tflops in (
        ("H100 PCIe", 756),
        ("H100 NVL", 835),
        ("H100", 989),
        ("H200", 989),
        ("A100", 312),
    ):
        if marker in name:
            return tflops * 1e12
    return None


# ---------------------------------------------------------------------------------------------
# Data and models


def synthetic_split(rows: int, seq: int, vocab: int, *, seed: int = 0) -> TokenizedSplit:
    """Rows of ``seq`` random tokens, the first quarter a prompt (label -100), like a chat row;
    the prompt is what an on-policy step has the student complete."""
    rng = random.Random(seed)
    prompt = seq // 4
    input_ids, labels = [], []
    for _ in range(rows):
        ids = tuple(rng.randrange(vocab) for _ in range(seq))
        input_ids.append(ids)
        labels.append((IGNORE_INDEX,) * prompt + ids[prompt:])
    prompts = tuple(ids[:prompt] for ids in input_ids)
    # No end-of-turn in a random vocabulary: generation runs to its cap (stop_id is out of range).
    return TokenizedSplit(
        tuple(input_ids), tuple(labels), prompts=prompts, answers=("",) * rows, stop_id=vocab
    )


def build_model(
    config: Qwen3Config, device: torch.device, dtype: torch.dtype, *, seed: int
) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    with torch.device(device):
        # random weights, made on the device: no copy from the CPU
        model = Qwen3ForCausalLM(config)
    return model.to(dtype)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(device: torch.device) -> int:
    return train.peak_memory(device)


# ---------------------------------------------------------------------------------------------
# The notebook's loop, as the notebook writes it


class DistillationLossWithTopK(nn.Module):
    """The notebook's loss, unchanged in substance (its bugs included: they cost the same)."""

    def __init__(self, alpha: float, temperature: float, pad_id: int, topk: int):
        super().__init__()
        self.alpha, self.temperature, self.topk = alpha, temperature, topk
        self.kl_loss = nn.KLDivLoss(reduction="batchmean")
        self.ce_loss = nn.CrossEntropyLoss(ignore_index=pad_id)

    def forward(self, student_logits, teacher_logits, labels):
        student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
        t = self.temperature
        b, s, v = teacher_logits.size()
        if self.topk is not None and self.topk < v:
            flat_teacher = teacher_logits.view(b * s, v)
            topk_vals, topk_idx = torch.topk(flat_teacher, self.topk, dim=-1)
            mask = torch.full_like(flat_teacher, float("-inf"))
            mask.scatter_(1, topk_idx, topk_vals)
            teacher_logits = mask.view(b, s, v)
        soft_teacher = torch.softmax(teacher_logits / t, dim=-1)
        log_student = torch.log_softmax(student_logits / t, dim=-1)
        kl = self.kl_loss(log_student, soft_teacher) * (t * t)
        ce = self.ce_loss(student_logits.view(-1, v), labels.view(-1))
        return self.alpha * kl + (1.0 - self.alpha) * ce


def notebook_run(
    student, teacher, batches, *, top_k: int, device: torch.device, warmup: int
) -> list[float]:
    """The notebook's training loop over ``batches``; returns the time after each step."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=5e-5)
    # no padding here
    loss_fn = DistillationLossWithTopK(ALPHA, TEMPERATURE, pad_id=-1, topk=top_k)
    scaler = torch.amp.GradScaler(device.type)
    clock = []
    student.train()
    for step, batch in enumerate(batches):
        if step == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # the steady state, as for the other modes
        inputs = {
            "input_ids": batch.input_ids.to(device),
            "attention_mask": batch.attention_mask.to(device),
        }
        labels = inputs["input_ids"].clone()
        optimizer.zero_grad()
        with torch.no_grad():
            teacher_logits = teacher(**inputs).logits.float()
        with torch.autocast(device.type, dtype=torch.float16):
            student_logits = student(**inputs).logits
            loss = loss_fn(student_logits, teacher_logits, labels)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        loss.item()  # the notebook's running total: one sync per step
        synchronize(device)
        clock.append(time.perf_counter())
    return clock


# ---------------------------------------------------------------------------------------------
# kdsweep's loop


@dataclass(frozen=True)
class CacheBesideTeacher:
    """The cache for off-policy steps, the teacher online for on-policy ones: what a study's
    teacher serves a trial that searches lmbda."""

    cache: CachedTeacher
    teacher: OnlineTeacher

    def targets(self, batch, *, top_k: int | None):
        return self.cache.targets(batch, top_k=top_k)

    def online(self, why: str = "") -> OnlineTeacher:
        return self.teacher


class Clocked(train.TrialHooks):
    """The time after each step (every step is logged) and its loss, the peak memory counted
    from the end of the warmup."""

    def __init__(self, device: torch.device, warmup: int):
        self.device, self.warmup, self.times, self.losses = device, warmup, [], []

    def logged(self, log) -> None:
        synchronize(self.device)
        self.times.append(time.perf_counter())
        self.losses.append(log.loss)
        if len(self.times) == self.warmup and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)


def kdsweep_run(
    student,
    split,
    teacher,
    *,
    args,
    top_k: int | None,
    alpha: float,
    device: torch.device,
    vocab,
    lmbda: float = 0.0,
    checkpointing: bool = False,
    hooks: Clocked | None = None,
) -> list[float]:
    """``train.distill`` for warmup + steps optimizer steps; returns the time after each step.
    With ``lmbda`` > 0 that share of the steps is on-policy, scored by ``teacher.online()``;
    ``checkpointing``: with the student's gradient checkpointing. ``hooks`` hear the run."""
    total = args.warmup + args.steps
    config = TrainConfig(
        max_steps=total,
        batch_size=args.batch,
        log_every=1,
        eval_every=total,
        warmup_ratio=0.0,
        precision=args.precision,
        device=device.type,
        loss_chunk_tokens=args.chunk_tokens,
        select="last",
        generation_temperature=1.0,
        generation_max_new_tokens=args.gen_tokens,
        gradient_checkpointing=checkpointing,
    )
    settings = DistillSettings(
        alpha=alpha,
        temperature=TEMPERATURE,
        top_k=top_k,
        learning_rate=5e-5,
        train=config,
        group_by_length=False,
        lmbda=lmbda,
    )
    hooks = hooks or Clocked(device, args.warmup)
    data = train.TrainingData(split, vocab, 0, lambda model, step: {})
    train.distill(student, settings, data, teacher, hooks)
    return hooks.times


# ---------------------------------------------------------------------------------------------
# The optimizer's step

# torch's AdamW kernels, by the argument that selects each
ADAMW_KERNELS = {
    "loop": {"foreach": False},  # torch's default on a CPU: one tensor at a time
    "foreach": {"foreach": True},  # torch's default on a GPU: kernels over groups of tensors
    "fused": {"fused": True},  # kdsweep's (train.adamw): one kernel for the whole step
}


def time_adamw(model: nn.Module, *, device: torch.device, warmup: int, steps: int) -> dict:
    """AdamW's step over copies of ``model``'s parameters, in each kernel, from the same
    gradients; the kernels take turns step by step (in alternating order), so a shared machine's
    load falls on all of them alike. Each kernel's median step seconds over the last ``steps``,
    and how far its parameters end from the loop's."""
    generator = torch.Generator(device).manual_seed(0)
    grads = [
        torch.randn(p.shape, generator=generator, device=device) * 1e-3 for p in model.parameters()
    ]
    copies = {name: [p.detach().clone() for p in model.parameters()] for name in ADAMW_KERNELS}
    optimizers = {}
    for name, params in copies.items():
        for param, grad in zip(params, grads):
            param.grad = grad  # shared: no kernel writes a gradient
        optimizers[name] = torch.optim.AdamW(
            params, lr=1e-4, weight_decay=0.01, **ADAMW_KERNELS[name]
        )
    seconds = {name: [] for name in copies}
    for step in range(warmup + steps):
        for name in list(copies) if step % 2 == 0 else reversed(list(copies)):
            synchronize(device)
            started = time.perf_counter()
            optimizers[name].step()
            synchronize(device)
            if step >= warmup:
                seconds[name].append(time.perf_counter() - started)
    return {
        name: {
            "step_s": statistics.median(seconds[name]),
            "max_abs_diff": max(
                float((p - q).abs().max()) for p, q in zip(params, copies["loop"])
            ),
        }
        for name, params in copies.items()
    }


# ---------------------------------------------------------------------------------------------
# The modes

MODES = (
    "notebook",
    "online",
    "cached",
    "lora-16",
    "ce",
    "onpolicy-0.5",
    "onpolicy-1",
    "cached-gc",
    "cached-eager",
    "cached-fa2",
)


@dataclass(frozen=True)
class Result:
    mode: str
    what: str
    tokens_per_s: float
    mfu: float | None
    peak_gib: float
    batch: int
    step_s: float


def measure(
    mode: str, what: str, clock: list[float], *, args, flops_per_token: float, peak, device
) -> Result:
    seconds = clock[-1] - clock[args.warmup - 1]
    rate = args.steps * args.batch * args.seq / seconds
    return Result(
        mode,
        what,
        rate,
        rate * flops_per_token / peak if peak else None,
        peak_bytes(device) / 2**30,
        args.batch,
        seconds / args.steps,
    )


def run_modes(args, device: torch.device) -> dict:
    student_config, teacher_config = tiny_configs() if args.tiny else (qwen3_0_6b(), qwen3_4b())
    vocab = Vocabulary(
        size=student_config.vocab_size,
        teacher_rows=teacher_config.vocab_size,
        student_rows=student_config.vocab_size,
    )
    split = synthetic_split(
        args.batch * (args.warmup + args.steps), args.seq, student_config.vocab_size
    )
    peak = peak_flops(device, args.peak_tflops)
    student_flops = 3 * forward_flops_per_token(student_config, args.seq)
    with_teacher = student_flops + forward_flops_per_token(teacher_config, args.seq)
    # auto: bf16 on a GPU, as kdsweep
    teacher_dtype = resolve_dtype(args.teacher_dtype, device, frozen=True)
    started = time.perf_counter()
    results, notes = {}, {}

    def attempt(
        mode: str, what: str, flops_per_token: float, run: Callable[[], list[float]]
    ) -> None:
        if time.perf_counter() - started > args.budget_s:
            notes[mode] = "skipped: over the time budget"
            return
        try:
            clock = run()
            results[mode] = measure(
                mode,
                what,
                clock,
                args=args,
                flops_per_token=flops_per_token,
                peak=peak,
                device=device,
            )
        except torch.OutOfMemoryError:
            notes[mode] = f"out of memory at batch {args.batch} x {args.seq}"
        except Exception as exc:  # one broken mode must not cost the others' numbers
            notes[mode] = f"failed: {described(exc, limit=300)}"
        free_memory(device)

    def student(rank: int = 0, attention: str = "sdpa") -> Qwen3ForCausalLM:
        model = build_model(student_config, device, torch.float32, seed=1)  # fp32 master weights
        model.set_attn_implementation(attention)  # as train.attn_implementation loads it
        return lora.adapt(model, rank, LoraConfig())

    def kdsweep(
        teacher,
        *,
        alpha: float,
        top_k: int | None,
        lmbda: float = 0.0,
        rank=0,
        attention="sdpa",
        checkpointing=False,
    ) -> Callable[[], list[float]]:
        return lambda: kdsweep_run(
            student(rank, attention),
            split,
            teacher,
            args=args,
            top_k=top_k,
            alpha=alpha,
            device=device,
            vocab=vocab,
            lmbda=lmbda,
            checkpointing=checkpointing,
        )

    teacher = (
        build_model(teacher_config, device, torch.float32, seed=2).eval().requires_grad_(False)
    )
    batches = make_batches(
        split, batch_size=args.batch, pad_id=0, shuffle_seed=None, group_by_length=False
    )
    attempt(
        "notebook",
        "fp32 weights, fp16 autocast + scaler, fp32 teacher online, naive loss",
        with_teacher,
        lambda: notebook_run(
            student(), teacher, batches, top_k=args.top_k, device=device, warmup=args.warmup
        ),
    )
    teacher.to(teacher_dtype)  # the same random weights, as kdsweep loads a frozen teacher
    dtype_name = str(teacher_dtype).removeprefix("torch.")
    attempt(
        "online",
        f"kdsweep, {dtype_name} teacher online",
        with_teacher,
        kdsweep(OnlineTeacher(teacher, vocab), alpha=ALPHA, top_k=args.top_k),
    )
    with tempfile.TemporaryDirectory(prefix="kdsweep-gpu-bench-") as tmp:
        cache, build = build_cache(teacher, split, vocab, Path(tmp), args=args, device=device)
        # on-policy: the cache for the other steps, the teacher kept loaded beside it
        for lmbda in (
            0.5,
            1.0,
        ):
            attempt(
                f"onpolicy-{lmbda:g}",
                f"kdsweep, cached top-{args.top_k}, lmbda {lmbda:g}: {args.gen_tokens} sampled "
                "tokens",
                0.0,
                kdsweep(
                    CacheBesideTeacher(cache, OnlineTeacher(teacher, vocab)),
                    alpha=ALPHA,
                    top_k=args.top_k,
                    lmbda=lmbda,
                ),
            )
        teacher = None  # a sweep reading the cache holds no teacher
        free_memory(device)
        attempt(
            "cached",
            f"kdsweep, cached teacher top-{args.top_k}",
            student_flops,
            kdsweep(cache, alpha=ALPHA, top_k=args.top_k),
        )
        attempt(
            "lora-16",
            f"kdsweep, cached teacher top-{args.top_k}, LoRA rank 16 student",
            student_flops,
            kdsweep(cache, alpha=ALPHA, top_k=args.top_k, rank=16),
        )
        # The memory knobs: model FLOPs as for "cached" (a recomputed forward is not counted).
        attempt(
            "cached-gc",
            f"kdsweep, cached teacher top-{args.top_k}, gradient checkpointing",
            student_flops,
            kdsweep(cache, alpha=ALPHA, top_k=args.top_k, checkpointing=True),
        )
        attempt(
            "cached-eager",
            f"kdsweep, cached teacher top-{args.top_k}, eager attention",
            student_flops,
            kdsweep(cache, alpha=ALPHA, top_k=args.top_k, attention="eager"),
        )
        if is_flash_attn_2_available() and device.type == "cuda":
            attempt(
                "cached-fa2",
                f"kdsweep, cached teacher top-{args.top_k}, flash_attention_2",
                student_flops,
                kdsweep(cache, alpha=ALPHA, top_k=args.top_k, attention="flash_attention_2"),
            )
        else:
            notes["cached-fa2"] = "skipped: flash_attention_2 needs flash-attn and a CUDA GPU"
    attempt(
        "ce",
        "kdsweep, plain cross-entropy (no teacher)",
        student_flops,
        kdsweep(None, alpha=0.0, top_k=None),
    )
    build["split_tokens"] = sum(len(ids) for ids in split.input_ids)
    optimizer = time_adamw(student(), device=device, warmup=1, steps=args.steps)
    free_memory(device)
    return {"results": results, "notes": notes, "cache_build": build, "optimizer": optimizer}


def build_cache(teacher, split, vocab, root: Path, *, args, device) -> tuple[CachedTeacher, dict]:
    """The teacher's top-K cache of the benchmark's rows, built as a sweep builds it."""
    online = OnlineTeacher(teacher, vocab)
    key = CacheKey(
        teacher={"benchmark": "random weights"},
        tokenizer="-",
        data={"rows": len(split)},
        tokens="-",
    )

    def write(folder: Path) -> dict:
        return write_cache(
            online,
            split,
            folder,
            k=args.top_k,
            batch_size=args.batch,
            pad_id=0,
            chunk_tokens=args.chunk_tokens,
        )

    synchronize(device)
    cache, _ = open_or_build(root, key, k=args.top_k, write=write)
    manifest = cache.manifest
    seconds = manifest["build_seconds"]
    build = {
        "seconds": seconds,
        "teacher_tokens": manifest["teacher_tokens"],
        "k": manifest["k"],
        "tokens_per_s": manifest["teacher_tokens"] / seconds if seconds else math.inf,
        "disk_mib": sum(f.stat().st_size for f in cache.folder.iterdir()) / 2**20,
    }
    return cache, build


# ---------------------------------------------------------------------------------------------
# Report


def describe_machine(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        info |= {
            "gpu": torch.cuda.get_device_name(device),
            "cuda": torch.version.cuda,
            "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30,
        }
    else:
        info |= {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        }
    return info


def print_table(report: dict) -> None:
    machine, setup = report["machine"], report["setup"]
    print(
        f"machine: {machine.get('gpu') or machine.get('cpu')} ({machine['device']}), torch "
        f"{machine['torch']}"
    )
    print(
        f"student {setup['student']}, teacher {setup['teacher']} (random weights); batch "
        f"{setup['batch']} x "
        f"{setup['seq']} tokens, top_k {setup['top_k']}; {setup['steps']} timed steps after "
        f"{setup['warmup']}"
    )
    results = report["results"]
    base = results.get("notebook")
    print(
        f"{'mode':12} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9} {'step s':>7} "
        f"{'x notebook tok/s':>17} "
        f"{'x notebook mem':>15}  what"
    )
    for mode in MODES:
        if mode not in results:
            print(f"{mode:12} {report['notes'].get(mode, 'not run')}")
            continue
        r = results[mode]
        mfu = f"{r['mfu']:6.1%}" if r["mfu"] else f"{'-':>6}"
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:17.2f}" if base else f"{'-':>17}"
        memory = f"{r['peak_gib'] / base['peak_gib']:15.2f}" if base else f"{'-':>15}"
        print(
            f"{mode:12} {r['tokens_per_s']:10,.0f} {mfu} {r['peak_gib']:9.2f} {r['step_s']:7.3f} "
            f"{speed} {memory}  {r['what']}"
        )
    build = report["cache_build"]
    print(
        f"cache build: {build['seconds']:.2f} s for {build['teacher_tokens']:,} teacher tokens "
        f"({build['tokens_per_s']:,.0f} tokens/s; the split holds {build['split_tokens']:,}), "
        f"top-{build['k']}, {build['disk_mib']:.1f} MiB on disk"
    )
    if "cached" in results and "ce" in results:
        print(
            "cached distillation step / plain CE step: "
            f"{results['cached']['step_s'] / results['ce']['step_s']:.3f}"
        )
    if "cached" in results and "lora-16" in results:
        lora16, cached = results["lora-16"], results["cached"]
        print(
            "lora-16 / cached (full fine-tuning): peak memory "
            f"{lora16['peak_gib'] / cached['peak_gib']:.2f}, step "
            f"{lora16['step_s'] / cached['step_s']:.2f}"
        )
    for mode in ("onpolicy-0.5", "onpolicy-1", "cached-gc", "cached-eager", "cached-fa2"):
        if "cached" in results and mode in results:
            mode_result, cached = results[mode], results["cached"]
            print(
                f"{mode} / cached: step {mode_result['step_s'] / cached['step_s']:.2f}, peak "
                f"memory {mode_result['peak_gib'] / cached['peak_gib']:.2f}"
            )
    kernels = report["optimizer"]
    print(
        "AdamW step on the student's parameters: "
        + ", ".join(f"{name} {kernel['step_s']:.4f} s" for name, kernel in kernels.items())
        + f"; fused / foreach {kernels['fused']['step_s'] / kernels['foreach']['step_s']:.2f}"
        + f", fused's largest difference from the loop {kernels['fused']['max_abs_diff']:.1e}"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiny", action="store_true", help="tiny configurations on the CPU (a smoke run)"
    )
    parser.add_argument("--batch", type=int, help="rows per step (default 8; tiny 2)")
    parser.add_argument("--seq", type=int, help="tokens per row (default 512; tiny 32)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 3; tiny 1)")
    parser.add_argument("--steps", type=int, help="timed steps (default 10; tiny 2)")
    parser.add_argument(
        "--top-k", type=int, default=None, help="teacher top-k (default 100; tiny 16)"
    )
    parser.add_argument("--chunk-tokens", type=int, default=1024, help="kdsweep's loss chunk")
    parser.add_argument(
        "--gen-tokens",
        type=int,
        help="new tokens an on-policy step samples per row (default 64; tiny 4)",
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help="kdsweep's train.precision (auto: bf16 on a GPU, fp32 on a CPU)",
    )
    parser.add_argument(
        "--teacher-dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="the kdsweep modes' teacher weights (auto: bf16 on a GPU, fp32 on a CPU)",
    )
    parser.add_argument(
        "--budget-s", type=float, default=420, help="start no mode after this many seconds"
    )
    parser.add_argument(
        "--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not an H100/H200/A100"
    )
    parser.add_argument("--output", default="gpu-benchmark.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    defaults = (
        dict(batch=2, seq=32, warmup=1, steps=2, top_k=16, gen_tokens=4)
        if args.tiny
        else dict(batch=8, seq=512, warmup=3, steps=10, top_k=100, gen_tokens=64)
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible; use --tiny for a CPU smoke run")

    run = run_modes(args, device)
    report = {
        "machine": describe_machine(device),
        "setup": {
            "student": "tiny" if args.tiny else "Qwen3-0.6B",
            "teacher": "tiny" if args.tiny else "Qwen3-4B",
            "batch": args.batch,
            "seq": args.seq,
            "warmup": args.warmup,
            "steps": args.steps,
            "top_k": args.top_k,
            "alpha": ALPHA,
            "temperature": TEMPERATURE,
        },
        "results": {mode: r.__dict__ for mode, r in run["results"].items()},
        "notes": run["notes"],
        "cache_build": run["cache_build"],
        "optimizer": run["optimizer"],
    }
    Path(args.output).write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"written: {args.output}")
    return report


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
