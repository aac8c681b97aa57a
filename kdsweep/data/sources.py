"""Where rows come from: a hub id, or a local file or folder, read with ``datasets``.

Every way of getting this wrong (a mistyped path, an unknown split, an empty file, a dataset the
hub does not have) is one :class:`UsageError` naming the study key and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from kdsweep.errors import UsageError, first_line
from kdsweep.study.config import DataConfig

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_NOT_FOUND = "was found neither as a local file or folder nor on the Hugging Face hub"
_LOCAL_KINDS = "a .jsonl, .json, .parquet or .csv file, or a folder of them"


def load_split(data: DataConfig, split: str, *, base_dir: str = ".") -> datasets.Dataset:
    """One split of ``data.dataset``, in the dataset's order, with at least one row.

    ``data.dataset`` is a hub id, or a local ``.jsonl``/``.json``/``.parquet``/``.csv`` file (its
    rows are the split ``train``), or a folder of such files (``train.jsonl`` and ``test.jsonl``
    become the splits ``train`` and ``test``). A relative path is looked up in ``base_dir`` (the
    study file's folder) first, then in the current folder. ``split`` may slice: ``train[:500]``.

    Raises:
        UsageError: one line naming the dataset or split and the fix.
    """
    key = split_key(data, split)
    rows = _Source.find(data.dataset, data.subset, base_dir=base_dir).load(split, key=key)
    if len(rows) == 0:
        raise UsageError(
            f"{key}: {split!r} of dataset {data.dataset!r} has no rows; choose a split or slice "
            "with rows"
        )
    return rows


def split_key(data: DataConfig, split: str) -> str:
    """The study key that chose ``split``, for messages."""
    if split == data.train_split:
        return "data.train_split"
    return "data.eval_split" if split == data.eval_split else "split"


@dataclass(frozen=True)
class _Source:
    """How ``datasets.load_dataset`` reaches a dataset, and how messages name it."""

    name: str  # as the study file gives it
    args: tuple[str, ...]
    kwargs: dict[str, str]
    kind: str  # "file", "folder" or "hub"

    @classmethod
    def find(cls, name: str, subset: str | None = None, *, base_dir: str) -> _Source:
        path = _local_path(name, base_dir=base_dir)
        if path is None:
            return cls(name, (name, subset) if subset else (name,), {}, "hub")
        if path.is_dir():
            return cls(name, (str(path),), {}, "folder")
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise UsageError(f"data.dataset: cannot read {name!r}: use {_LOCAL_KINDS}")
        if path.stat().st_size == 0:  # datasets fails on an empty file with a bare StopIteration
            raise UsageError(f"data.dataset: {name!r} is empty; point it at a file with rows")
        return cls(name, (builder,), {"data_files": str(path)}, "file")

    def load(self, split: str, *, key: str) -> Any:
        try:
            return datasets.load_dataset(*self.args, split=split, **self.kwargs)
        except ValueError as exc:  # an unknown split, a malformed slice, a slice without rows
            raise self._split_problem(split, key=key, error=exc) from None
        except (
            ConnectionError,
            FileNotFoundError,
        ) as exc:  # FileNotFoundError: DatasetNotFoundError too
            raise self._not_found(exc) from None
        except datasets.exceptions.DatasetGenerationError as exc:
            cause = first_line(exc.__cause__ or exc)
            raise UsageError(
                f"data.dataset: {self.name!r} could not be read ({cause}); check its format"
            ) from None

    def split_names(self) -> list[str]:
        try:
            return list(datasets.load_dataset(*self.args, **self.kwargs))
        # only words an error message; the error being reported is the original one
        except Exception:
            return []

    def _split_problem(self, split: str, *, key: str, error: ValueError) -> UsageError:
        available = self.split_names()
        base = split.split("[")[0].strip()
        if available and base not in available:
            fix = "use one of them" if key == "split" else f"set {key} to one of them"
            if self.kind == "file":
                fix += (
                    " (a single file holds one split, 'train': slice it, e.g. train[:90%] and "
                    "train[90%:])"
                )
            return UsageError(
                f"{key}: dataset {self.name!r} has no split {base!r} (available: "
                f"{', '.join(available)}); {fix}"
            )
        return UsageError(
            f"{key}: cannot take {split!r} from dataset {self.name!r} ({first_line(error)}); "
            "give a split name with an optional slice that selects rows, e.g. train[:500] or "
            "train[10%:]"
        )

    def _not_found(self, error: Exception) -> UsageError:
        if self.kind != "hub":
            return UsageError(
                f"data.dataset: {self.name!r} holds no data ({first_line(error)}); use "
                f"{_LOCAL_KINDS}"
            )
        if isinstance(error, ConnectionError) and datasets.config.HF_HUB_OFFLINE:
            fix = (
                "offline mode is on (HF_HUB_OFFLINE) and no copy is cached: run once with "
                "network access"
            )
        elif isinstance(error, ConnectionError):
            fix = (
                "check the name and the network, or set HF_HUB_OFFLINE=1 to use a copy cached "
                "earlier"
            )
        else:
            fix = "check the name (owner/name), or log in (hf auth login) for a gated dataset"
        return UsageError(
            f"data.dataset: {self.name!r} {_NOT_FOUND} ({first_line(error)}); {fix}, or use "
            f"{_LOCAL_KINDS}"
        )


def _local_path(name: str, *, base_dir: str) -> Path | None:
    """The local file or folder ``name`` names, None for a hub id; a missing local path is an
    error."""
    path = Path(name).expanduser()
    beside_study = Path(base_dir) / path
    if not path.is_absolute() and beside_study.exists():
        return beside_study
    if path.exists():
        return path
    # A hub id is "name" or "owner/name"; anything else that does not exist is a mistyped path.
    mistyped = (
        path.is_absolute()
        or name.startswith((".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or path.suffix.lower() in _BUILDERS
    )
    if mistyped:
        raise UsageError(
            f"data.dataset: no such file or folder {name!r} (looked in {base_dir!r} and the "
            "current folder); "
            "fix the path (a relative path starts from the study file's folder)"
        )
    return None
