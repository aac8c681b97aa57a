"""Everything kdsweep writes to or reads from MLflow, one module per concept.

- ``study_runs``: one experiment per study, its parent run, a nested run per trial, how they
  end, the best model and the registry;
- ``trial_run``: one trial's run, its metrics written in the background, system metrics, the model;
- ``dataset_inputs``: the training and evaluation data as MLflow dataset inputs;
- ``links``: where the tracking store is, and the addresses of its UI pages;
- ``plugin``: the run-context provider that tags runs user code starts inside a trial.

This package's ``__init__`` imports nothing: MLflow loads ``plugin`` while MLflow itself is being
imported, and a package that imported MLflow on the way would find it half-built.
"""
