"""The MLflow UI as a user sees it: a three-trial sweep, ``kdsweep ui`` serving its store, and
headless Chromium (Debian's package, driven by Playwright) on the runs table and compare view.

Without Chromium these tests skip, except where ``KDSWEEP_REQUIRE_BROWSER=1`` (set by
``.ci/run``), where a missing browser is a failure.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kdsweep.cli import main
from kdsweep.mlflow.links import compare_url
from kdsweep.names import Tag
from kdsweep.study.reader import load_study

from conftest import Child, isolate, wait_until, write_tiny_study

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = os.environ.get("KDSWEEP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TRIALS = 3


def browser_or_skip():
    """Playwright's sync API, or a skip (a failure where CI requires the browser)."""
    problem = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        problem = "the playwright package is not installed (pip install -e '.[test]')"
    if problem is None and not Path(CHROMIUM).exists():
        problem = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if problem is None:
        return sync_playwright
    if os.environ.get("KDSWEEP_REQUIRE_BROWSER") == "1":
        pytest.fail(f"the browser test must run here: {problem}")
    pytest.skip(problem)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_models, tiny_data) -> Path:
    """A three-trial sweep of the tiny models, its stores in a folder of its own."""
    root = tmp_path_factory.mktemp("browser")
    study = write_tiny_study(
        root,
        tiny_models,
        tiny_data,
        name="tiny-browser",
        n_trials=TRIALS,
        max_steps=4,
        eval_every=2,
    )
    # the per-test isolation of conftest, for the module
    with pytest.MonkeyPatch.context() as patch:
        isolate(patch, root)
        assert main(["run", str(study), "--no-report"]) == 0
    return study


@pytest.fixture(scope="module")
def ui(swept):
    """``kdsweep ui`` on the sweep's store: (the process, the URL it printed, its port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    child = Child("ui", str(swept), "--port", str(port), cwd=swept.parent)
    try:
        url = child.wait_for(r"^http://\S+", timeout=240).group(0)
        yield child.process, url, port
    finally:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
            child.finish(timeout=60)


def trial_runs(study_path: Path, base: str) -> list:
    study = load_study(study_path)
    client = MlflowClient(tracking_uri=base)
    experiment = client.get_experiment_by_name(study.name)
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return [r for r in runs if Tag.PARENT in r.data.tags]


def test_ui_prints_the_study_runs_table_url(swept, ui):
    _, url, port = ui
    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
    experiment = client.get_experiment_by_name("tiny-browser")
    assert (
        url
        == f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    )
    assert len(client.search_runs([experiment.experiment_id])) == TRIALS + 1


def test_runs_table_and_compare_view_in_chromium(swept, ui, tmp_path_factory):
    sync_playwright = browser_or_skip()
    _, url, port = ui
    base = f"http://127.0.0.1:{port}"
    trials = trial_runs(swept, base)
    assert len(trials) == TRIALS
    shots = Path(os.environ.get("KDSWEEP_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    shots.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(90_000)

            # The runs table: the parent run, then its nested trial runs once it is expanded.
            page.goto(url)
            parent = page.locator(
                "[role=gridcell][col-id='attributes.`Run Name`']", has_text="tiny-browser"
            )
            parent.wait_for()
            page.get_by_text(f"{TRIALS + 1} matching runs").wait_for()
            parent.locator("button").first.click()  # the expander of the parent's nested runs
            for run in trials:
                page.get_by_text(run.info.run_name, exact=True).wait_for()
            _close_assistant(page)
            page.screenshot(path=shots / "runs.png")

            # The compare view of the trial runs, its plot set to the searched parameters against
            # the eval perplexity, its parameter table to what differs: what a user looks at.
            page.set_viewport_size({"width": 1600, "height": 1400})
            page.goto(
                compare_url(base, trials[0].info.experiment_id, [r.info.run_id for r in trials])
            )
            page.get_by_text(f"Comparing {TRIALS} Runs").wait_for()
            plot = page.locator(".js-plotly-plot").first
            plot.wait_for()
            _plot_axes(
                page,
                params=["alpha", "temperature", "top_k", "learning_rate"],
                metrics=["student_ppl"],
            )
            axes, text = plot.text_content(), page.inner_text("body")
            page.get_by_role("switch").first.click()  # Parameters: show diff only
            _close_assistant(page)
            page.wait_for_timeout(1000)  # the plot redraws
            path = shots / "compare.png"
            page.screenshot(path=path)
            print(f"compare view screenshot: {path}")
        finally:
            browser.close()

    for name in ("alpha", "temperature", "top_k", "learning_rate", "student_ppl"):
        assert name in axes, f"the plot has no {name} axis"
    rows = _table_rows(text)
    for name in ("alpha", "temperature", "top_k", "learning_rate"):
        assert sorted(rows[name]) == sorted(r.data.params[name] for r in trials), name
    assert "student_ppl" in text and "kl_to_teacher" in text
    assert path.stat().st_size > 10_000


def test_ui_stops_the_server_and_its_helpers(ui):
    """``mlflow server`` starts web workers and a job runner; stopping ``kdsweep ui`` stops them
    all."""
    process, _, port = ui
    (server,) = [
        pid
        for pid, command in _processes()
        if "mlflow server" in command and f"--port {port}" in command
    ]
    group = os.getpgid(server)
    assert group != os.getpgid(process.pid)  # the server has a process group of its own
    assert len(_group_members(group)) > 1  # the server and its helpers
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    wait_until(lambda: _group_members(group) == [], timeout=30)


def _plot_axes(page, *, params: list[str], metrics: list[str]) -> None:
    """Choose the parallel-coordinates plot's axes in its two pickers, as a user would."""
    page.get_by_role("button", name="Clear All").click()
    pickers = page.get_by_role("combobox")
    for picker, names in ((pickers.nth(0), params), (pickers.nth(1), metrics)):
        for name in names:
            picker.click()
            page.keyboard.type(name)
            page.get_by_role("option", name=name, exact=True).wait_for(state="attached")
            page.keyboard.press("Enter")  # picks the one option the typed name leaves
        page.keyboard.press("Escape")


def _close_assistant(page) -> None:
    """MLflow 3's assistant panel covers a third of the page; close it for the screenshots."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


def _table_rows(text: str) -> dict[str, list[str]]:
    """Tab-separated rows of the compare view, keyed by their first cell."""
    rows = {}
    for line in text.splitlines():
        cells = line.split("\t")
        if len(cells) > 1:
            rows.setdefault(cells[0].strip(), [c.strip() for c in cells[1:]])
    return rows


def _processes() -> list[tuple[int, str]]:
    """(pid, command line) of every live process."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found.append(
                    (
                        int(entry.name),
                        (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(),
                    )
                )
            except OSError:
                continue
    return found


def _group_members(group: int) -> list[int]:
    """Processes of a process group, zombies left out (they are gone, only not yet reaped)."""
    members = []
    for pid, _ in _processes():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(pid)
    return members
