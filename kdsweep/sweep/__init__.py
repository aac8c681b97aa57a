"""The sweep: the Optuna study and its run (``study``), one trial (``objective``), the samplers
and the pruner (``samplers``), the finalists scored on the test split (``finalists``) and the
seed check (``seed_check``)."""

from kdsweep.sweep.study import StudySummary, open_study, run

__all__ = ["StudySummary", "open_study", "run"]
