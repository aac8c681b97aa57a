"""The training and evaluation data as MLflow dataset inputs of every trial run: where they come
from, a digest of the exact tokens used, and a profile (rows, scored tokens). The data itself is
not uploaded."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from kdsweep.compat.mlflow import dataset_entity
from kdsweep.study.config import StudyConfig


def dataset_inputs(study: StudyConfig, train_split, eval_set) -> list[DatasetInput]:
    """The inputs of a trial run: the training split and the evaluation set."""
    data = study.data
    return [
        _dataset_input(data, data.train_split, study, *_training_data(train_split), "training"),
        _dataset_input(data, data.eval_split, study, *_evaluation_data(eval_set), "evaluation"),
    ]


class _TokenizedDataset(MetaDataset):
    """A dataset logged by reference: where it comes from, a digest of the exact tokens the
    trials use, and a profile (rows, scored tokens) that the MLflow UI shows."""

    def __init__(self, source, *, name: str, digest: str, profile: dict):
        self._profile = profile
        super().__init__(source, name=name, digest=digest)

    @property
    def profile(self) -> dict:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def _dataset_input(
    data, split: str, study: StudyConfig, digest: str, profile: dict, context: str
) -> DatasetInput:
    source = _dataset_source(study.resolve_path(data.dataset), split)
    dataset = _TokenizedDataset(
        source, name=f"{Path(data.dataset).name}-{split}", digest=digest, profile=profile
    )
    return DatasetInput(dataset_entity(dataset), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])


def _dataset_source(location: str, split: str):
    """A local file or folder (``location`` is then absolute), or else a Hugging Face hub
    dataset."""
    if not Path(location).is_absolute():
        return HuggingFaceDatasetSource(path=location, split=split)
    with warnings.catch_warnings():  # MLflow registers the local-file source twice and says so
        warnings.simplefilter("ignore")
        return resolve_dataset_source(location)


def _training_data(split) -> tuple[str, dict]:
    """Digest and profile (rows, scored tokens) of a ``data.TokenizedSplit``."""
    digest = _digest([split.input_ids, split.labels])
    return digest, {"rows": len(split), "scored_tokens": split.num_scored_tokens}


def _evaluation_data(eval_set) -> tuple[str, dict]:
    """Digest and profile of an ``evaluate.EvalSet`` (its padded batches)."""
    batches = eval_set.batches
    digest = _digest([[b.input_ids.tolist(), b.labels.tolist()] for b in batches])
    rows = sum(len(b.input_ids) for b in batches)
    return digest, {"rows": rows, "scored_tokens": eval_set.num_tokens}


def _digest(values) -> str:
    return hashlib.sha256(json.dumps(values, separators=(",", ":")).encode()).hexdigest()[:12]
