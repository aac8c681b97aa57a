"""Private parts of Optuna that kdsweep uses, each with why (see ``kdsweep.compat``)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Container

import optuna
from optuna.storages._rdb.models import StudyUserAttributeModel
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import IntegrityError


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


class PeersHyperband(optuna.pruners.HyperbandPruner):
    """Optuna's Hyperband, whose brackets show each trial only its peers: the trials that
    ``peers(trial)`` accepts; a trial without peers (``peers`` gives None) is never pruned.

    A view of the study (``FilteredStudy``) cannot reach the brackets: Hyperband builds each
    bracket's study from the storage (``HyperbandPruner._create_bracket_study``, whose private
    class reads ``Study._get_trials``), so the bracket's class is narrowed here instead.
    It stays a ``HyperbandPruner``: Optuna's samplers find it by its type to show the sampler one
    bracket's trials."""

    def __init__(self, peers: Callable[[FrozenTrial], Callable[[FrozenTrial], bool] | None], **kw):
        super().__init__(**kw)
        self._peers = peers
        self._keep: Callable[[FrozenTrial], bool] = lambda t: True

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        keep = self._peers(trial)
        if keep is None:
            return False
        self._keep = keep
        return super().prune(study, trial)

    def _create_bracket_study(self, study: optuna.Study, bracket_id: int):
        bracket = super()._create_bracket_study(study, bracket_id)
        keep = self._keep

        class PeerBracket(type(bracket)):
            def get_trials(self, deepcopy=True, states=None):
                return [t for t in super().get_trials(deepcopy=deepcopy, states=states) if keep(t)]

        return PeerBracket(study, self, bracket_id)
