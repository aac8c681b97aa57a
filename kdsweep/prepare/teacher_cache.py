"""The teacher's top-K cache: the teacher run once per study, its summary on disk for every trial.

The cache exists because a study's trials all distill from the same frozen teacher on the same
tokens: when every trial keeps only the teacher's top-k, the teacher runs once per study, at
K = the largest top_k, and every trial of every worker reads the prefix it needs from disk.

Layout of a cache folder (one per split, teacher, tokenizer, tokens and K)::

    manifest.json   what it was built from (the key), K, row count, teacher tokens, "complete"
    values.npy      [N, K] fp16   each scored position's K largest raw logits, largest first
    indices.npy     [N, K] int32  their vocabulary ids
    lse.npy         [N]    fp32   log-sum-exp of all the logits: the top-k's share of the mass
    nll.npy         [N]    fp32   the teacher's NLL of the label: its perplexity on the split
    offsets.npy     [E+1]  int64  example e's rows are offsets[e]:offsets[e + 1]
    covered.npy     [E]    bool   the examples it holds rows of: the study's trials may read only
                                  some (none for the others: offsets[e] == offsets[e + 1])

Rows follow the split's examples in order and, within an example, its scored positions in order,
so a right-padded batch's rows are its examples' row ranges concatenated in batch order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from transformers.utils import cached_file

from kdsweep.data import Batch, TokenizedSplit, count_scored, make_batches
from kdsweep.distill.targets import OnlineTeacher, TeacherTargets
from kdsweep.paths import atomic_folder, remove_stale_staging

CACHE_VERSION = 2  # bump when the layout or what the rows mean changes: it is part of the key
_FP16_MAX = float(np.finfo(np.float16).max)
_HASH_WHOLE_FILE_BELOW = 64 * 2**20  # larger weight files are identified by size, head and tail
_HASH_EDGE_BYTES = 4 * 2**20


# ---------------------------------------------------------------------------------------------
# What a cache is keyed by


@dataclass(frozen=True)
class CacheKey:
    """Everything the teacher's outputs on a split depend on; K is kept apart (in the folder
    name) so that a cache of a larger K serves a study that needs a smaller one."""

    teacher: dict  # name, revision, weights dtype, and a digest of its files or its hub commit
    tokenizer: str  # digest of the vocabulary
    data: dict  # dataset, split, text field, assistant_only, max_length
    tokens: str  # digest of the split's input ids and labels: exact, whatever produced them
    rows: str = "all"  # the examples it covers: all, or a digest of their indices
    version: int = CACHE_VERSION

    def digest(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def split_digest(split: TokenizedSplit) -> str:
    digest = hashlib.sha256()
    for ids, labels in zip(split.input_ids, split.labels):
        digest.update(np.asarray([len(ids), *ids, *labels], dtype=np.int64).tobytes())
    return digest.hexdigest()


def rows_digest(rows: list[int]) -> str:
    """The examples a cache covers, as its key names them."""
    return hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


def vocab_digest(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def model_digest(location: str, revision: str | None) -> dict:
    """A local model folder by its files; a hub model by the commit its cached snapshot holds
    (a moving revision like "main" must not reuse a cache built from an older commit)."""
    path = Path(location)
    if path.is_dir():
        return {"files": _folder_digest(path)}
    config = Path(cached_file(location, "config.json", revision=revision))
    return {"commit": config.parent.name}


def _folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as handle:
            if file.stat().st_size <= _HASH_WHOLE_FILE_BELOW:
                digest.update(handle.read())
            else:
                # Multi-GB shards: the header and both ends change with any retraining, at the
                # cost of reading 8 MiB instead of the whole file on every worker start.
                digest.update(handle.read(_HASH_EDGE_BYTES))
                handle.seek(-_HASH_EDGE_BYTES, os.SEEK_END)
                digest.update(handle.read())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The cache on disk


class CachedTeacher:
    """The teacher's top-K cache of one split, memory-mapped: workers on a machine share its pages.

    A trial with ``top_k <= K`` reads the first ``top_k`` columns (the values are sorted) and
    applies its own temperature in the loss.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / "manifest.json").read_text())
        self.k: int = self.manifest["k"]
        self.vocab_size: int = self.manifest["vocab_size"]
        self.values = self._mapped("values")  # [N, K] fp16
        self.indices = self._mapped("indices")  # [N, K] int32
        self.lse = self._mapped("lse")  # [N] fp32
        self.nll = self._mapped("nll")  # [N] fp32
        self.offsets = np.load(self.folder / "offsets.npy")  # [E + 1], small: read whole
        self.covered = np.load(self.folder / "covered.npy")  # [E]
        self.tokens_processed = 0  # a trial reading the cache runs no teacher
        self._mass: dict[int, float] = {}

    def _mapped(self, name: str) -> np.ndarray:
        # Read-only memory maps: pages come from the OS page cache, shared by all workers.
        return np.load(self.folder / f"{name}.npy", mmap_mode="r")

    @property
    def rows(self) -> int:
        """Scored positions in the split."""
        return int(self.offsets[-1])

    def targets(self, batch: Batch, *, top_k: int | None) -> TeacherTargets:
        """The top ``top_k`` logits and ids of the batch's scored positions, on the batch's
        device."""
        width = self.width(top_k)
        ids = batch.example_ids.cpu().numpy()
        if not self.covered[ids].all():
            missing = ids[~self.covered[ids]].tolist()
            raise ValueError(
                f"the teacher cache {self.folder} holds the rows the study's trials read, and a "
                f"batch wants rows it does not (examples {missing[:5]}); rebuild it for these "
                "training settings (kdsweep cache STUDY.yaml)"
            )
        rows = np.concatenate([np.arange(self.offsets[e], self.offsets[e + 1]) for e in ids])
        device = batch.input_ids.device
        values = torch.from_numpy(self.values[rows, :width]).to(device)
        indices = torch.from_numpy(self.indices[rows, :width]).to(device)
        return TeacherTargets(values=values, indices=indices)

    def width(self, top_k: int | None) -> int:
        """Columns a trial with ``top_k`` reads; the whole vocabulary only if the cache holds
        it."""
        if top_k is not None and top_k <= self.k:
            return top_k
        if self.k >= self.vocab_size:
            return self.k
        wanted = "the whole vocabulary" if top_k is None else f"top_k={top_k}"
        raise ValueError(
            f"the teacher cache {self.folder} holds the top {self.k} logits but a trial wants "
            f"{wanted}; "
            "build it for the study's top_k values (kdsweep cache STUDY.yaml)"
        )

    def mass(self, top_k: int, *, chunk_rows: int = 2**16) -> float:
        """Mean over the split's scored tokens of the teacher probability (T=1) its top_k keep."""
        width = self.width(top_k)
        if width not in self._mass:
            total = 0.0
            for start in range(0, self.rows, chunk_rows):
                values = torch.from_numpy(
                    np.array(self.values[start : start + chunk_rows, :width], dtype=np.float32)
                )
                lse = torch.from_numpy(np.array(self.lse[start : start + chunk_rows]))
                total += float(
                    torch.exp(torch.logsumexp(values, dim=-1) - lse).clamp_(max=1.0).double().sum()
                )
            self._mass[width] = total / max(self.rows, 1)
        return self._mass[width]

    def perplexity(self) -> float:
        """The teacher's token-weighted perplexity on the split's scored tokens."""
        return (
            math.exp(float(np.sum(self.nll, dtype=np.float64)) / self.rows)
            if self.rows
            else float("nan")
        )


def write_cache(
    teacher: OnlineTeacher,
    split: TokenizedSplit,
    folder: Path,
    *,
    k: int,
    batch_size: int,
    pad_id: int,
    chunk_tokens: int | None,
    rows: list[int] | None = None,
    on_rows: Callable[[int], None] = lambda done: None,
) -> dict:
    """Run ``teacher`` once over the examples ``rows`` of ``split`` (None: all of them) and
    write the arrays into ``folder``; ``on_rows(n)`` hears each batch's examples. Returns build
    facts."""
    started = time.perf_counter()
    tokens_before = teacher.tokens_processed
    covered = np.zeros(len(split), dtype=bool)
    covered[rows if rows is not None else slice(None)] = True
    counts = [count_scored(labels) if c else 0 for labels, c in zip(split.labels, covered)]
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    arrays = _open_arrays(folder, rows=int(offsets[-1]), k=k)
    device = next(teacher.model.parameters()).device
    kept = np.flatnonzero(covered)
    subset = TokenizedSplit(
        tuple(split.input_ids[e] for e in kept), tuple(split.labels[e] for e in kept)
    )
    # Grouped by length: the teacher computes little padding; example ids put rows in place.
    for batch in make_batches(
        subset, batch_size=batch_size, pad_id=pad_id, shuffle_seed=None, group_by_length=True
    ):
        summary = teacher.top_k_rows(batch.to(device), k, chunk_tokens=chunk_tokens)
        _place(arrays, summary, offsets, kept[batch.example_ids.numpy()])
        on_rows(len(batch.example_ids))
    for array in arrays.values():
        array.flush()
    np.save(folder / "offsets.npy", offsets)
    np.save(folder / "covered.npy", covered)
    return {
        "rows": int(offsets[-1]),
        "examples": len(split),
        "covered_examples": int(covered.sum()),
        "teacher_tokens": teacher.tokens_processed - tokens_before,
        "vocab_size": teacher.vocab.size,
        "build_seconds": round(time.perf_counter() - started, 3),
    }


def _open_arrays(folder: Path, *, rows: int, k: int) -> dict[str, np.ndarray]:
    shapes = {
        "values": (np.float16, (rows, k)),
        "indices": (np.int32, (rows, k)),
        "lse": (np.float32, (rows,)),
        "nll": (np.float32, (rows,)),
    }
    return {
        name: np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=d, shape=s)
        for name, (d, s) in shapes.items()
    }


def _place(arrays: dict, summary, offsets: np.ndarray, examples: np.ndarray) -> None:
    """A batch's rows into their examples' places (the batch's rows follow its examples)."""
    columns = {
        "values": summary.values.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16),
        "indices": summary.indices.to(torch.int32),
        "lse": summary.lse,
        "nll": summary.nll,
    }
    columns = {name: tensor.cpu().numpy() for name, tensor in columns.items()}
    cursor = 0
    for e in examples.tolist():
        start, end = offsets[e], offsets[e + 1]
        for name, column in columns.items():
            arrays[name][start:end] = column[cursor : cursor + end - start]
        cursor += end - start


def find_cache(root: Path, key: CacheKey, *, k: int) -> CachedTeacher | None:
    """The complete cache for ``key`` with the smallest K >= ``k``, if one exists."""
    candidates = []
    for folder in root.glob(f"{key.digest()}-k*"):
        manifest = _read_manifest(folder)
        if (
            manifest
            and manifest.get("complete")
            and manifest.get("k", 0) >= min(k, manifest.get("vocab_size", k))
        ):
            candidates.append((manifest["k"], folder))
    return CachedTeacher(min(candidates)[1]) if candidates else None


def open_or_build(
    root: Path, key: CacheKey, *, k: int, write: Callable[[Path], dict]
) -> tuple[CachedTeacher, bool]:
    """The cache for ``key`` and ``k``, built by ``write(folder)`` if no complete one exists.

    Safe for many workers: builders of one key take turns on a lock file and look again once
    they hold it; a cache is written under a temporary name and renamed into place only when
    complete (its manifest says so), so a build that dies half-way is never read. Returns the
    cache and whether this call built it.
    """
    found = find_cache(root, key, k=k)
    if found is not None:
        return found, False
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{key.digest()}-k{k}"
    with FileLock(root / f"{key.digest()}.lock"):
        found = find_cache(root, key, k=k)
        if found is not None:
            return found, False
        remove_stale_staging(root, f"{key.digest()}-k")  # left by builders that were killed
        with atomic_folder(final) as staging:
            facts = write(staging)
            manifest = {
                "version": CACHE_VERSION,
                "key": dataclasses.asdict(key),
                "k": k,
                **facts,
                "complete": True,
            }
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return CachedTeacher(final), True


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
