"""Every use of a private part of Optuna, MLflow or transformers, each with why and the versions
it was tested on (Optuna 5.1, MLflow 3.17, transformers 5.24).

Nothing else in kdsweep touches a name that starts with an underscore in those libraries, so an
upgrade that moves one breaks here, in one place, and ``pyproject.toml`` caps each library below
its next major version. Where a transformers part is missing, kdsweep falls back to its public API.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Container

import optuna
from mlflow.data.dataset import Dataset
from mlflow.entities import Dataset as DatasetEntity
from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from optuna.storages._rdb.models import StudyUserAttributeModel
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import IntegrityError
from transformers.utils import chat_template_utils

# ---------------------------------------------------------------------------------------------
# Optuna


def study_id(study: optuna.Study) -> int:
    """The study's id in its storage: a key for what kdsweep keeps per study (``Study._study_id``;
    the public ``study_name`` is not unique across storages)."""
    return study._study_id


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a study was opened with (``Study._storage``; Optuna has no public accessor)."""
    return study._storage


def insert_user_attr_once(study: optuna.Study, key: str, value) -> bool:
    """Insert the study user attr ``key`` in one transaction, unless one is there; True if this
    call's value was stored. The RDB storage's unique (study, key) constraint rejects every
    insert but the first, across processes and machines: a compare-and-set that Optuna's public
    ``set_user_attr`` (an upsert) cannot give. Needs the RDB storage's SQLAlchemy model
    (``optuna.storages._rdb.models``) and its session; False where the storage is not an RDB
    one (in memory: one process, set it plainly)."""
    storage = storage_of(study)
    backend = getattr(storage, "_backend", storage)  # under Optuna's caching wrapper
    if not isinstance(backend, optuna.storages.RDBStorage):
        study.set_user_attr(key, value)
        return True
    session = backend.scoped_session()
    try:
        session.add(
            StudyUserAttributeModel(
                study_id=study_id(study), key=key, value_json=json.dumps(value)
            )
        )
        session.commit()
        return True
    except IntegrityError:
        session.rollback()  # another worker's value came first
        return False
    finally:
        session.close()


def fail_trial(study: optuna.Study, trial: FrozenTrial, reason_attr: str, reason: str) -> None:
    """Mark another process's RUNNING trial FAIL, with its reason (``FrozenTrial._trial_id``: the
    storage API addresses trials by their id, which a FrozenTrial keeps private)."""
    storage = storage_of(study)
    storage.set_trial_user_attr(trial._trial_id, reason_attr, reason)
    storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)


def fail_stale_trials(study: optuna.Study) -> None:
    """Optuna's heartbeat check, run now (public, but experimental: its warning is silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)


def reseed_sampler(sampler: optuna.samplers.BaseSampler, seed: int) -> None:
    """Seed a sampler's random state, and TPE's second one for its first trials (``_rng``,
    ``_random_sampler``): Optuna's public ``reseed_rng()`` draws a seed from the OS, and kdsweep
    seeds each trial by the study seed and its number, so that workers never repeat each other."""
    for part in (sampler, getattr(sampler, "_random_sampler", None)):
        rng = getattr(part, "_rng", None)
        if rng is not None:
            rng.rng.seed(seed % 2**32)


class FilteredStudy(optuna.study.Study):
    """The study with only the trials ``keep`` accepts: what a group's sampler, the pruner or a
    plot is shown. Optuna's samplers, pruners and plots read trials through the private
    ``Study._get_trials``, which this overrides; the rest is the study itself."""

    def __init__(self, study: optuna.Study, keep: Callable[[FrozenTrial], bool]):
        super().__init__(
            study_name=study.study_name,
            storage=storage_of(study),
            sampler=study.sampler,
            pruner=study.pruner,
        )
        self._study = study
        self._keep = keep

    def _get_trials(
        self,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
        use_cache: bool = False,
    ) -> list[FrozenTrial]:
        trials = self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)
        return [t for t in trials if self._keep(t)]

    def stop(self) -> None:
        self._study.stop()  # a grid sampler that is done stops the real optimization loop


# ---------------------------------------------------------------------------------------------
# MLflow


def keep_gpus(monitor: SystemMetricsMonitor, keep: Callable[[object], bool]) -> None:
    """Make MLflow's system-metrics monitor sample only the GPUs ``keep`` accepts (its
    ``GPUMonitor.gpu_handles`` and ``num_gpus``): NVML lists every GPU of the machine, whatever
    CUDA_VISIBLE_DEVICES says, and MLflow has no setting for which to sample."""
    for gpus in (m for m in monitor.monitors if isinstance(m, GPUMonitor)):
        gpus.gpu_handles = [handle for handle in gpus.gpu_handles if keep(handle)]
        gpus.num_gpus = len(gpus.gpu_handles)


def dataset_entity(dataset: Dataset) -> DatasetEntity:
    """A dataset as the entity ``MlflowClient.log_inputs`` takes (``Dataset._to_mlflow_entity``:
    the public route, ``mlflow.log_input``, needs the fluent active run, which kdsweep does not
    use)."""
    return dataset._to_mlflow_entity()


# ---------------------------------------------------------------------------------------------
# transformers


def compiled_chat_template(template: str):
    """The chat template as transformers compiles it for ``apply_chat_template`` (its Jinja
    environment and extensions: ``chat_template_utils._compile_jinja_template``), or None where
    it is missing or cannot compile it. Rendering with it skips ``apply_chat_template``'s
    per-message copying, two thirds of its time on short turns (``data.chat`` checks that it
    renders the same)."""
    compile_template = getattr(chat_template_utils, "_compile_jinja_template", None)
    if compile_template is None:
        return None
    try:
        return compile_template(template)
    except Exception:  # a template it cannot compile: apply_chat_template reports it, row by row
        return None
