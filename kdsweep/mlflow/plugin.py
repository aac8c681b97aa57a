"""kdsweep's MLflow plugin: any run started inside a kdsweep trial carries its study and trial.

MLflow loads :class:`TrialRunContext` through the ``mlflow.run_context_provider`` entry point
(see ``pyproject.toml``) and asks it for tags whenever a run starts with ``mlflow.start_run``.
So a run that user code starts while a trial trains (a ``transformers`` MLflow callback, an
evaluation script) is tagged ``kdsweep.study``, ``kdsweep.trial`` and ``kdsweep.trial_run_id``
and can be found from the trial it belongs to.

The current trial lives in environment variables, not in a Python global, so that processes the
trial starts (data-loader workers, subprocesses) see it too.

This module imports nothing from MLflow: MLflow loads its entry points while it is itself being
imported, and a plugin that imported MLflow first would find it half-built and go unregistered.
(``kdsweep.names`` imports nothing.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from kdsweep.names import Tag

STUDY_VAR = "KDSWEEP_STUDY"
TRIAL_VAR = "KDSWEEP_TRIAL"
RUN_ID_VAR = "KDSWEEP_TRIAL_RUN_ID"
_TAGS = {STUDY_VAR: Tag.STUDY, TRIAL_VAR: Tag.TRIAL, RUN_ID_VAR: Tag.TRIAL_RUN_ID}


@contextmanager
def active_trial(study: str, trial: int, run_id: str) -> Iterator[None]:
    """Mark ``trial`` of ``study`` (logged to MLflow run ``run_id``) as running in this process
    and its children; the previous values come back afterwards."""
    values = {STUDY_VAR: study, TRIAL_VAR: str(trial), RUN_ID_VAR: run_id}
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class TrialRunContext:
    """Tags a run started inside a kdsweep trial with the study, the trial and the trial's run.

    MLflow's ``RunContextProvider`` interface (``in_context``, ``tags``), implemented without
    subclassing it so that this module stays free of MLflow imports.
    """

    def in_context(self) -> bool:
        return bool(os.environ.get(TRIAL_VAR))

    def tags(self) -> dict[str, str]:
        return {tag: os.environ[name] for name, tag in _TAGS.items() if os.environ.get(name)}
