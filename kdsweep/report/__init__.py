"""`kdsweep report`: study + runs -> pandas -> Markdown + plots.

The report is read from the Optuna storage (trials, their user attrs, the study's reference
perplexities) and from the study's MLflow runs (eval curves, run status and reasons), in three
steps, each testable on its own:

1. ``collect`` (``report.collect``) gathers everything into one :class:`ReportData`;
2. ``draw_figures`` (``report.figures``) writes the PNGs next to the Markdown file;
3. ``render`` (``report.render``, with the warnings of ``report.checks``) turns the data into
   Markdown, one short function per section.

Generating it twice from the same storage gives identical bytes. Imports optuna, mlflow, pandas
and matplotlib, never torch.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.exceptions import MlflowException

from kdsweep.names import REPORT_ARTIFACTS
from kdsweep.redact import redact
from kdsweep.report.collect import ReportData, collect, mlflow_client
from kdsweep.report.figures import Figure, draw_figures
from kdsweep.report.render import SECTIONS, render
from kdsweep.store.storage import load_existing_study
from kdsweep.study.config import StudyConfig

__all__ = ["SECTIONS", "Figure", "ReportData", "collect", "draw_figures", "render", "write_report"]


def write_report(study: StudyConfig, output: str | None = None) -> Path:
    """Write ``reports/<study>.md`` (or ``output``) and its figures; log both on the parent run.

    Raises UsageError (exit 2) when the study was never run; creates nothing in that case.
    """
    optuna_study = load_existing_study(study)
    path = Path(output) if output else Path("reports") / f"{study.name}.md"
    figure_dir = path.parent / path.stem
    data = collect(study, optuna_study)
    figures = draw_figures(optuna_study, data, figure_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(redact(render(data, figures)))  # links and messages quote URLs
    _log_artifacts(data, path, figure_dir)
    return path


def _log_artifacts(data: ReportData, path: Path, figure_dir: Path) -> None:
    """Log the report and its figures on the study's parent run, keeping their relative links."""
    tracking = data.tracking
    if tracking.problem:
        return
    client = mlflow_client(tracking)
    try:
        client.get_run(tracking.parent_run_id)
    except MlflowException:
        return
    client.log_artifact(tracking.parent_run_id, str(path), artifact_path=REPORT_ARTIFACTS)
    if figure_dir.is_dir() and any(figure_dir.iterdir()):
        client.log_artifacts(
            tracking.parent_run_id,
            str(figure_dir),
            artifact_path=f"{REPORT_ARTIFACTS}/{figure_dir.name}",
        )
