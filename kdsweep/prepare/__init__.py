"""What a study's trials share, made once: every input read and checked (``inputs``), the demo's
models and data (``demo``), the study's teacher and its top-K cache (``teacher``,
``teacher_cache``), the references every trial is compared with (``references``), and the trial
runner that trains one trial from them (``trial_runner``).

Imports neither Optuna nor MLflow (an import-linter contract keeps it so).
"""
