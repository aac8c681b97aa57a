"""One MLflow run, written so that a trial hardly waits for MLflow.

``TrialRun`` buffers a trial's metrics and sends them in batches, which a background thread
writes while training goes on; its end waits until everything sent is written. It also samples
the trial's system metrics and logs the student as an MLflow model.
"""

from __future__ import annotations

import functools
import importlib.metadata
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import mlflow.transformers
from mlflow.entities import Metric as LoggedMetric
from mlflow.entities import Param as LoggedParam
from mlflow.entities import RunTag
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient

from kdsweep.compat.mlflow import keep_gpus
from kdsweep.distill.lora import is_adapted, merged, save_adapter
from kdsweep.errors import first_line
from kdsweep.names import ADAPTER_ARTIFACT, MODEL_ARTIFACT, TRACEBACK_ARTIFACT, Metric, Tag
from kdsweep.redact import redact

BATCH_LIMIT = 1000  # MLflow accepts at most 1000 metrics per log_batch call


@dataclass
class TrialRun:
    """One trial's nested run, logged so that the trial hardly waits for MLflow: metrics are
    buffered and sent in batches, which ``writer`` (a background thread) writes while training
    goes on; the run's end waits until everything sent is written.

    Not MLflow's own async logging: ``set_terminated`` shuts its queue down, which takes up to a
    second per run, more than all of a short trial's synchronous writes.
    """

    client: MlflowClient
    run_id: str
    name: str = ""
    writer: ThreadPoolExecutor | None = None  # None: write at once
    monitor: SystemMetricsMonitor | None = None  # samples system metrics until the run ends
    pending: list[LoggedMetric] = field(default_factory=list)
    sending: list[Future] = field(default_factory=list)  # batches not known to be written yet

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        now = int(time.time() * 1000)
        self.pending += [
            LoggedMetric(key, float(value), now, step) for key, value in metrics.items()
        ]

    def log_step(self, log) -> None:
        """A training log line (``train.StepLog``): sent with the next batch, not now."""
        values = {
            Metric.TRAIN_LOSS: log.loss,
            Metric.TRAIN_KL: log.kl,
            Metric.TRAIN_CE: log.ce,
            Metric.LEARNING_RATE: log.learning_rate,
            Metric.GRAD_NORM: log.grad_norm,
            Metric.TOKENS_PER_SECOND: log.tokens_per_second,
        }
        if log.generated_tokens is not None:  # an on-policy trial
            values |= {
                Metric.GENERATED_TOKENS: log.generated_tokens,
                Metric.GENERATION_SHARE: log.generation_share,
            }
        self.log_metrics(values, step=log.step)
        if len(self.pending) >= BATCH_LIMIT:
            self.flush()

    def flush(self) -> None:
        """Send the buffered metrics in the background."""
        for start in range(0, len(self.pending), BATCH_LIMIT):
            self.send(metrics=self.pending[start : start + BATCH_LIMIT])
        self.pending = []

    def send(self, *, metrics=(), params=()) -> None:
        write = functools.partial(
            self.client.log_batch, self.run_id, metrics=list(metrics), params=list(params)
        )
        if self.writer is None:
            write()
        else:
            self.sending.append(self.writer.submit(write))

    def send_dict(self, data: dict, artifact: str) -> None:
        """An artifact written from ``data`` (YAML or JSON by its name), in the background."""
        write = functools.partial(self.client.log_dict, self.run_id, data, artifact)
        self.sending.append(self.writer.submit(write)) if self.writer else write()

    def wait_sent(self) -> None:
        """Block until every batch sent in the background is written (raises if one failed)."""
        sending, self.sending = self.sending, []
        for future in sending:
            future.result()

    def finish(self, result, *, objective: float, feasible: bool | None = None) -> None:
        """A completed trial (``train.DistillResult``): final metrics, whether it kept the
        study's constraints (None: it has none), then FINISHED."""
        final = {
            Metric.OBJECTIVE: objective,
            Metric.DURATION_S: result.seconds,
            Metric.PEAK_MEMORY_GB: result.peak_memory_bytes / 1e9,
        }
        self.log_metrics(final, step=result.steps)
        tags = {} if feasible is None else {Tag.FEASIBLE: feasible}
        self.end("FINISHED", state="COMPLETE", tags=tags)

    def log_model(self, model, tokenizer) -> None:
        """The student as an MLflow model of the ``transformers`` flavour (weights, tokenizer,
        a text-generation signature), in this run's ``model/``, tagged ``kdsweep.model=saved``.
        A LoRA student is also logged as its peft adapter, in ``adapter/``, and its ``model/``
        is the student with the adapter merged in (which merges it in place: log it last).

        Saved by MLflow from the objects, not from a checkpoint folder: MLflow's checkpoint path
        fails with transformers 5. The requirements are pinned to what trained it, so MLflow
        does not guess them (it would ask for torchvision).
        """
        requirements = [
            f"{package}=={version.split('+')[0]}"
            for package, version in library_versions().items()
        ]
        with tempfile.TemporaryDirectory(prefix="kdsweep-model-") as folder:
            if is_adapted(model):
                adapter = Path(folder) / ADAPTER_ARTIFACT
                save_adapter(model, adapter)
                self.client.log_artifacts(self.run_id, str(adapter), ADAPTER_ARTIFACT)
                model = merged(model)
            path = Path(folder) / MODEL_ARTIFACT
            mlflow.transformers.save_model(
                transformers_model={"model": model, "tokenizer": tokenizer},
                path=str(path),
                task="text-generation",
                pip_requirements=requirements,
            )
            self.client.log_artifacts(self.run_id, str(path), MODEL_ARTIFACT)
        self.client.set_tag(self.run_id, Tag.MODEL, "saved")

    def end(
        self,
        status: str,
        *,
        state: str,
        reason: str | None = None,
        traceback: str | None = None,
        tags: dict | None = None,
    ) -> None:
        """Write what is left, record the Optuna state (and why it ended) as tags, and set the
        MLflow status.

        A pruned run also says so in its name, since its status (KILLED) does not tell it from
        an interrupted one in the runs list.
        """
        if self.monitor is not None:
            self.monitor.finish()  # its last samples go before the run ends
        tags = {Tag.STATE: state, **(tags or {})}
        if reason:
            tags[Tag.REASON] = first_line(reason, limit=500)
        if len(self.pending) > BATCH_LIMIT:
            self.flush()
        self.wait_sent()
        self.client.log_batch(
            self.run_id,
            metrics=self.pending,
            tags=[RunTag(k, v) for k, v in strings(tags).items()],
        )
        self.pending = []
        if traceback:
            self.client.log_text(self.run_id, traceback, TRACEBACK_ARTIFACT)
        if state == "PRUNED":
            self.client.update_run(self.run_id, name=f"{self.name} (pruned)")
        self.client.set_terminated(self.run_id, status=status)


def system_monitor(
    client: MlflowClient, run_id: str, *, interval: float, gpu_uuid: str | None
) -> SystemMetricsMonitor:
    """MLflow's system metrics (CPU, memory, disk, network, and the utilisation and memory of
    the GPU with ``gpu_uuid``) on a run, sampled every ``interval`` seconds in a thread.

    NVML lists every GPU of the machine whatever CUDA_VISIBLE_DEVICES says, so the trial's own
    GPU is picked by its UUID; a trial on the CPU logs none.
    """
    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=interval, tracking_uri=client.tracking_uri
    )
    keep_gpus(monitor, lambda handle: bool(gpu_uuid) and gpu_uuid in _nvml_uuid(handle))
    monitor.start()
    return monitor


def _nvml_uuid(handle) -> str:
    import pynvml  # there: MLflow made a GPU monitor with it

    uuid = pynvml.nvmlDeviceGetUUID(handle)
    return uuid.decode() if isinstance(uuid, bytes) else str(uuid)


def library_versions(packages: tuple[str, ...] = ("torch", "transformers")) -> dict[str, str]:
    """The versions that decide what a trial computes (recorded on every run to rerun it, and
    pinned in a saved model's requirements)."""
    return {package: importlib.metadata.version(package) for package in packages}


def log_batch(
    client: MlflowClient, run_id: str, *, params=None, metrics=None, tags=None, step: int = 0
) -> None:
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[LoggedMetric(k, float(v), now, step) for k, v in (metrics or {}).items()],
        params=[LoggedParam(k, param_text(v)) for k, v in (params or {}).items()],
        tags=[RunTag(k, v) for k, v in strings(tags or {}).items()],
    )


def param_text(value) -> str:
    # MLflow params are immutable strings; keep them short and stable, and without passwords.
    return "None" if value is None else redact(str(value))[:6000]


def strings(values: dict) -> dict[str, str]:
    """Tag values as MLflow stores them: strings, without passwords."""
    return {k: redact(str(v)) for k, v in values.items()}
