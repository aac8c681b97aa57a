"""The sweep: the Optuna study and its run (``study``), one trial (``objective``), the samplers
and the pruner (``samplers``), the finalists scored on the test split (``finalists``) and the
seed check (``seed_check``)."""

from kdsweep.sweep.study import RunSummary, open_study, run

__all__ = ["RunSummary", "open_study", "run"]
