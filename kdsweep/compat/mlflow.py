"""Private parts of MLflow that kdsweep uses, each with why (see ``kdsweep.compat``)."""

from __future__ import annotations

from collections.abc import Callable

from mlflow.data.dataset import Dataset
from mlflow.entities import Dataset as DatasetEntity
from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor


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
