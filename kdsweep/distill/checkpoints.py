"""A trial's checkpoints on disk: where they live, and the resume checkpoint's contents.

**Where.** ``train.checkpoint_dir`` (a folder every machine of a study sees, for many machines),
else the cache, in a folder named for the study and its storage. It holds, per trial, its resume
checkpoint (``trial-<n>.resume.pt``, while it runs) and, for a study with a test split, a
finalist contender's best weights (``trial-<n>.pt``, see ``finalists``).

**The resume checkpoint** (:class:`TrainState`) holds what the training loop needs to go on
exactly: the student's trained weights (a LoRA student's adapter alone, ``lora``), the
optimizer's and the schedule's states, the gradient scaler's, torch's random state (CPU and GPU)
and the on-policy coin's, the step (which also places the data order: every epoch's order is
seeded), the log window's partial sums, the evaluations so far, the best checkpoint
(``train.select``) and the on-policy counters. It is
written under a temporary name and renamed, so a reader sees a whole checkpoint or the previous
one, and one trial keeps one.

On the CPU a resumed trial computes what the uninterrupted one would, to the last bit. On a GPU
the match is close but may not be exact: some kernels (atomics in backward passes, cuBLAS's
choice of algorithm) are not deterministic, run to run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel

from kdsweep.distill.lora import load_trained_state, trained_state
from kdsweep.paths import cache_dir, store_identity
from kdsweep.study.config import StudyConfig


def checkpoint_dir(study: StudyConfig) -> Path:
    """Where the study's checkpoints live: ``train.checkpoint_dir``, else under the cache."""
    if study.train.checkpoint_dir:
        return Path(study.resolve_path(study.train.checkpoint_dir))
    # Two studies of one name in two folders (each with its own sqlite:///kdsweep.db) must not
    # share a folder: one's finals would delete the other's checkpoints.
    store = hashlib.sha256(store_identity(study.storage_url).encode()).hexdigest()[:8]
    return cache_dir() / "checkpoints" / f"{study.name}-{store}"


# Settings that change where or how fast a trial runs, not what it computes: a resume checkpoint
# stays good across them (another machine, another thread count).
_NOT_TRAJECTORY = {"device", "threads", "checkpoint_dir", "checkpoint_every", "oom_retry"}


def trajectory(study: StudyConfig) -> str:
    """A hash of what a trial's training depends on besides its parameters and seed: the
    models, the data, the evaluation and the fixed training settings."""
    plain = study.to_dict()
    parts = {key: plain[key] for key in ("teacher", "student", "data", "eval", "objective")}
    train = {k: v for k, v in plain["train"].items() if k not in _NOT_TRAJECTORY}
    text = json.dumps(parts | {"train": train}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def resume_path(study: StudyConfig, trial: int) -> Path:
    """The resume checkpoint of trial number ``trial``."""
    return checkpoint_dir(study) / f"trial-{trial}.resume.pt"


def best_path(study: StudyConfig, trial: int) -> Path:
    """Where a finalist contender's best weights wait to be scored on the test split."""
    return checkpoint_dir(study) / f"trial-{trial}.pt"


def best_paths(study: StudyConfig) -> dict[int, Path]:
    """Every trial's best weights on disk, by trial number (resume checkpoints aside)."""
    found = (re.fullmatch(r"trial-(\d+)\.pt", p.name) for p in checkpoint_dir(study).glob("*.pt"))
    return {int(m[1]): checkpoint_dir(study) / m[0] for m in found if m}


def write(value, path: Path) -> None:
    """``torch.save`` to ``path``, under a temporary name first: a reader sees a whole file (or
    the one it replaces), never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    torch.save(value, staging)
    os.replace(staging, path)


@dataclass
class TrainState:
    """Everything one trial's training loop needs to go on from ``step`` (see the module)."""

    step: int
    student: dict
    optimizer: dict
    schedule: dict
    scaler: dict
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None
    coin: tuple  # random.Random.getstate() of the on-policy coin
    window: dict  # the log window's sums since the last log
    evaluations: list[tuple[int, dict]] = field(default_factory=list)  # (step, metrics), in order
    best_step: int = 0
    best_metrics: dict | None = None
    best_weights: dict | None = None  # None while the best is the current weights
    on_policy: dict = field(default_factory=dict)  # generated tokens, seconds, batches so far
    trajectory: str = ""  # the study's (:func:`trajectory`): a retry resumes only under the same


def save(state: TrainState, path: Path) -> None:
    write(state.__dict__, path)


def load(path: Path) -> TrainState | None:
    """The state at ``path``, or None when there is none."""
    if not path.exists():
        return None
    # Not weights_only: the state holds Python objects (the coin's state, metric dicts) that
    # kdsweep wrote itself, in a folder of its own.
    return TrainState(**torch.load(path, map_location="cpu", weights_only=False))


def take_over(path: Path, own: Path) -> TrainState | None:
    """The state at ``path`` (a retried trial's), moved to ``own`` (its retry's): one trial keeps
    one checkpoint, and a retry that dies before writing its first leaves it for the next."""
    if not path.exists():
        return None
    os.replace(path, own)
    return load(own)


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)


class BestCheckpoint:
    """The best evaluation so far and a copy of the weights it was measured on, on the CPU (one
    copy per running trial, made when an evaluation beats the best; the last one needs none)."""

    def __init__(self, better: Callable[[dict, dict], bool]):
        self.better = better
        self.step = 0
        self.metrics: dict[str, float] | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def offer(self, step: int, metrics: dict[str, float], model: PreTrainedModel, *, last: bool):
        if self.metrics is not None and not self.better(metrics, self.metrics):
            return
        self.step, self.metrics = step, metrics
        self.state = None if last else _cpu_copy(model)

    def restore(self, model: PreTrainedModel) -> None:
        """Put the best weights back into ``model`` (nothing to do when the last step was best)."""
        if self.state is not None:
            load_trained_state(model, self.state)


def _cpu_copy(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The weights the model trains (a LoRA student's adapter alone), on the CPU; tied weights
    (Qwen3's embeddings) are copied once."""
    copies: dict[int, torch.Tensor] = {}
    state = {}
    for name, tensor in trained_state(model).items():
        key = tensor.data_ptr()
        if key not in copies:
            copies[key] = tensor.detach().to("cpu", copy=True)
        state[name] = copies[key]
    return state
