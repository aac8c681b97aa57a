"""Every use of a private part of Optuna, MLflow, transformers or torch, each with why and the
versions it was tested on (Optuna 5.1, MLflow 3.17, transformers 5.25, torch 2.13), one module
per library.

Nothing else in kdsweep touches a name that starts with an underscore in those libraries, so an
upgrade that moves one breaks here, in one place, and ``pyproject.toml`` caps each library below
its next major version. Each module imports its own library and nothing else: ``data`` reads the
transformers part without loading Optuna or MLflow. This ``__init__`` imports nothing.
"""
