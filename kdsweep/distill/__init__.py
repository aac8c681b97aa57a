"""One distillation run and what it is made of: the training loop (``train``), evaluation and
generation, the models and their LoRA form, the teacher's targets, checkpoints, the clock that
times a trial and preemption.

Imports torch and transformers, never Optuna or MLflow (an import-linter contract keeps it so):
a trial's surroundings reach it through one object, ``train.TrialHooks``.
"""
