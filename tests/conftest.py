"""Shared fixtures: tiny Qwen3 models and a study file that sweeps them offline in seconds."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import datasets
import huggingface_hub
import pytest

from kdsweep.prepare import demo, demo_models

ROOT = Path(__file__).resolve().parents[1]  # the repository


def isolate(patch: pytest.MonkeyPatch, root: Path) -> None:
    """No test reads or writes the user's caches, MLflow store or Optuna database."""
    patch.setenv("KDSWEEP_CACHE", str(root / "cache"))
    patch.delenv("MLFLOW_TRACKING_URI", raising=False)
    patch.setenv("HF_HUB_OFFLINE", "1")
    patch.setenv("HF_DATASETS_OFFLINE", "1")
    patch.setenv("HF_DATASETS_CACHE", str(root / "hf-datasets"))
    # The libraries read HF_HUB_OFFLINE once, when imported: in this process, set it where they
    # keep it, so a hub name costs no attempt to reach the hub (the environment serves children).
    patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    patch.chdir(root)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    isolate(monkeypatch, tmp_path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A two-layer teacher and a one-layer student (hidden size 16 and 8), untrained, sharing the
    demo tokenizer; the student's embedding is padded by 6 rows, as Qwen3's are."""
    tokenizer = demo_models.build_tokenizer(demo.generate_conversations(300, seed=0))
    return save_tiny_models(tmp_path_factory.mktemp("models"), tokenizer)


@pytest.fixture(scope="session")
def qwen3_models(tmp_path_factory, qwen3_tokenizer) -> dict[str, Path]:
    """The tiny models of ``tiny_models`` with Qwen3's tokens and chat template."""
    return save_tiny_models(tmp_path_factory.mktemp("qwen3-models"), qwen3_tokenizer)


def save_tiny_models(root: Path, tokenizer) -> dict[str, Path]:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    shapes = {
        "teacher": dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            vocab_size=len(tokenizer),
        ),
        "student": dict(
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=4,
            vocab_size=len(tokenizer) + 6,
        ),
    }
    folders = {}
    for role, shape in shapes.items():
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(
            Qwen3Config(
                max_position_embeddings=128,
                tie_word_embeddings=True,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **shape,
            )
        )
        folders[role] = root / role
        model.save_pretrained(folders[role])
        tokenizer.save_pretrained(folders[role])
    return folders


def conversations(n: int, *, seed: int):
    """``n`` demo conversations as kdsweep's rows (``data.Conversation``)."""
    from kdsweep.data import Conversation

    return [
        Conversation(tuple((m["role"], m["content"]) for m in c))
        for c in demo.generate_conversations(n, seed=seed)
    ]


def chat_split(tokenizer, n: int, *, seed: int, max_length: int = 64, assistant_only: bool = True):
    """``n`` demo conversations through the tokenizer's chat template, tokenized."""
    from kdsweep.data import ChatTemplate, tokenize

    chat = ChatTemplate(tokenizer, tokenizer.chat_template)
    return tokenize(
        conversations(n, seed=seed),
        tokenizer,
        max_length=max_length,
        assistant_only=assistant_only,
        chat=chat,
    )


@pytest.fixture(scope="module")
def tiny_setup(tiny_models):
    """(tokenizer, the frozen teacher, the shared vocabulary, a tokenized split of 48
    conversations)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdsweep.distill.models import shared_vocabulary

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    teacher = (
        AutoModelForCausalLM.from_pretrained(tiny_models["teacher"]).eval().requires_grad_(False)
    )
    vocab = shared_vocabulary(tokenizer, teacher.config.vocab_size, teacher.config.vocab_size + 6)
    return tokenizer, teacher, vocab, chat_split(tokenizer, 48, seed=3, max_length=48)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A folder of ``messages`` rows: train.jsonl (64) and test.jsonl (16)."""
    folder = tmp_path_factory.mktemp("data")
    for split, (rows, seed) in {"train": (64, 0), "test": (16, 1)}.items():
        lines = [
            json.dumps({"messages": messages})
            for messages in demo.generate_conversations(rows, seed=seed)
        ]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def written(folder: Path) -> set[Path]:
    """Files under ``folder``, less the `datasets` library's own cache of the rows it read."""
    return {p for p in folder.rglob("*") if "hf-datasets" not in p.parts}


def mlflow_runs(study_path: Path, *, uri: str | None = None, overrides: list[str] = ()):
    """(client, parent runs, trial runs by trial number) of a study's MLflow experiment."""
    from mlflow.tracking import MlflowClient

    from kdsweep.names import Tag
    from kdsweep.study.reader import load_study

    study = load_study(study_path, list(overrides))
    client = MlflowClient(tracking_uri=uri or study.tracking.uri)
    experiment = client.get_experiment_by_name(study.name)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if Tag.PARENT not in r.data.tags]
    trials = {int(r.data.tags[Tag.TRIAL]): r for r in runs if Tag.PARENT in r.data.tags}
    return client, parents, trials


@pytest.fixture(scope="session")
def demo_tokenizer():
    """The demo's tokenizer (ChatML template included), built from 300 generated conversations."""
    return demo_models.build_tokenizer(demo.generate_conversations(300, seed=0))


QWEN3_TEMPLATE = ROOT / "tests" / "fixtures" / "qwen3_chat_template.jinja"  # as published


@pytest.fixture(scope="session")
def qwen3_tokenizer():
    """A tokenizer with Qwen3's added tokens and special flags, EOS and padding, and Qwen3's
    published chat template (its merges learnt from 300 demo conversations)."""
    return demo_models.build_tokenizer(demo.generate_conversations(300, seed=0), qwen3=True)


def guanaco_rows(n: int, *, seed: int) -> list[str]:
    """``n`` demo conversations as guanaco text rows (``### Human: ...### Assistant: ...``)."""
    markers = {"user": "### Human: ", "assistant": "### Assistant: "}
    return [
        "".join(markers[m["role"]] + m["content"] for m in messages)
        for messages in demo.generate_conversations(n, seed=seed)
    ]


class Recorded:
    """A trial's hooks (``distill.train.TrialHooks``) that keep what the loop tells them: its
    logs, evaluations and resume checkpoints (``checkpointing``), and may stop it (``on_eval``
    raising)."""

    def __init__(self, *, resume=None, checkpointing: bool = False, on_eval=None):
        self.resume, self.checkpointing, self.scores_test = resume, checkpointing, False
        self.logs, self.evals, self.states, self.built_with = [], [], [], None
        self._on_eval = on_eval or (lambda step, metrics: None)

    def built(self, trainable_parameters: int) -> None:
        self.built_with = trainable_parameters

    def logged(self, log) -> None:
        self.logs.append(log)

    def evaluated(self, step: int, metrics: dict) -> None:
        self.evals.append((step, metrics))
        self._on_eval(step, metrics)

    def checkpoint(self, state) -> None:
        self.states.append(state)

    def trained(self, student) -> None:
        pass


@pytest.fixture
def datasets_cache(tmp_path_factory, monkeypatch):
    """Keep the Arrow caches of tiny data files out of the user's cache (and out of tmp_path,
    where a folder dataset would read them as data)."""
    import datasets

    cache = tmp_path_factory.mktemp("hf-cache")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))


def write_tiny_study(
    root: Path,
    models: dict[str, Path],
    data: Path,
    *,
    name: str = "tiny",
    n_trials: int = 2,
    max_steps: int = 8,
    eval_every: int = 4,
) -> Path:
    """A study of short trials on the tiny models, with its stores under ``root``."""
    path = root / f"{name}.yaml"
    path.write_text(
        f"""
name: {name}
n_trials: {n_trials}
storage: sqlite:///{root / "optuna.db"}
tracking: {{uri: "sqlite:///{root / "mlflow.db"}"}}
sampler: {{name: random, seed: 0}}
pruner: {{name: none}}
control: false
teacher: {{name: {models["teacher"]}}}
student: {{name: {models["student"]}}}
data: {{dataset: {data}, max_length: 48}}
train: {{max_steps: {max_steps}, batch_size: 8, eval_every: {eval_every}, log_every: 2,
eval_batch_size: 8, device: cpu}}
search:
  alpha: {{low: 0.2, high: 0.9}}
  temperature: {{low: 1.0, high: 4.0, log: true}}
  top_k: [4, all]
  learning_rate: {{low: 1.0e-3, high: 1.0e-2, log: true}}
"""
    )
    return path


@pytest.fixture(scope="session")
def empty_tracking_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made and nothing in them. MLflow takes seconds to
    create and migrate a new store's tables; a test that is not about that starts from a copy."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("tracking") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tiny_study(tmp_path, tiny_models, tiny_data, empty_tracking_store) -> Path:
    """A study of 8-step trials on the tiny models, with its stores under tmp_path (its MLflow
    store a copy of an empty one)."""
    shutil.copyfile(empty_tracking_store, tmp_path / "mlflow.db")
    return write_tiny_study(tmp_path, tiny_models, tiny_data)


class ReplacedTraining:
    """A study's real trial runner whose training is ``train(runner, params, **kwargs)``:
    ``runner`` is the real one (call it to train for real), everything else is the runner's."""

    def __init__(self, runner, train):
        self._runner, self._train = runner, train

    def __getattr__(self, name: str):
        return getattr(self._runner, name)

    def __call__(self, params: dict, hooks=None, **kwargs):
        return self._train(self._runner, params, hooks=hooks, **kwargs)


def run_replaced(
    study_path: Path, train, *, n_trials: int | None = None, overrides: list[str] = ()
):
    """``kdsweep run STUDY --no-report --set ...`` in this process, each trial's training given to
    ``train`` (see ReplacedTraining): the objective's seam for its trial runner. Raises what the
    run raises (a KeyboardInterrupt, the sweep's RepeatedFailure)."""
    from kdsweep import sweep
    from kdsweep.api import quiet_libraries
    from kdsweep.prepare.trial_runner import TrialRunner
    from kdsweep.progress import SweepProgress
    from kdsweep.study.reader import load_study

    study = load_study(study_path, list(overrides))
    quiet_libraries()
    progress = SweepProgress()
    try:
        runner = ReplacedTraining(TrialRunner.prepare(study, progress=progress), train)
        return sweep.run(study, n_trials=n_trials, progress=progress, runner=runner)
    finally:
        progress.close()


def child_env() -> dict[str, str]:
    """The environment a ``python -m kdsweep`` child needs to import this checkout."""
    root = str(ROOT)
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, *, timeout: float) -> None:
    """Poll ``condition`` until it holds; fail the test if it does not within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{condition.__name__} did not hold within {timeout} s")
        time.sleep(0.1)


class Child:
    """A ``python -m kdsweep`` process whose output is read by a thread as it comes, so a test
    can wait for a line, or for the end, with a deadline: a child that hangs fails the test
    instead of hanging it."""

    def __init__(self, *args: str, cwd: Path | None = None):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kdsweep", *args],
            env=child_env(),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, *, timeout: float = 300) -> re.Match:
        """The first output line matching ``pattern``, once it is there."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            if self.process.poll() is not None and not self._reader.is_alive():
                raise AssertionError(
                    f"exited ({self.process.returncode}) without printing "
                    f"{pattern!r}:\n{self.output}"
                )
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n{self.output}")

    def finish(self, *, timeout: float = 300) -> int:
        """The exit status, once the process has ended and its output is read."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"still running after {timeout} s:\n{self.output}") from None
        self._reader.join(timeout=30)
        return code
