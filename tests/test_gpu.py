"""On a CUDA GPU: sweeps in bf16 and in fp16 with the gradient scaler, two workers sharing one
device, the out-of-memory retry with a batch that cannot fit, and no memory left behind across
trials. Skipped without CUDA (marker ``gpu``)."""

from __future__ import annotations

import pytest
import torch

from kdsweep.cli import main
from kdsweep.names import TrialAttr
from kdsweep.store.storage import load_existing_study
from kdsweep.study.measures import OUT_OF_MEMORY
from kdsweep.study.reader import load_study
from kdsweep.sweep import objective

from conftest import Child

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def finished(study_path, overrides=()):
    return load_existing_study(load_study(study_path, list(overrides))).trials


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_three_trial_sweep_on_cuda(tiny_study, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    overrides = [
        "--set",
        "train.device=cuda",
        "--set",
        f"train.precision={precision}",
        "--set",
        "train.max_steps=12",
    ]
    assert main(["run", str(tiny_study), "--n-trials", "3", "--no-report", *overrides]) == 0
    trials = finished(tiny_study)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert all(t.user_attrs[TrialAttr.DEVICE].startswith("cuda") for t in trials)
    assert all(1 < t.value < float("inf") for t in trials)


def test_two_workers_share_one_device(tiny_study):
    child = Child(
        "run",
        str(tiny_study),
        "--n-trials",
        "4",
        "--no-report",
        "--workers",
        "2",
        "--devices",
        "0,0",
        "--set",
        "train.max_steps=12",
    )
    assert child.finish(timeout=900) == 0, child.output
    trials = finished(tiny_study)
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)
    assert len({t.user_attrs[TrialAttr.WORKER]["pid"] for t in trials}) == 2


def test_out_of_memory_is_retried_with_half_the_micro_batch(tiny_study, monkeypatch):
    """The process may use a sliver of the GPU, so a batch of 64 long rows cannot fit: the trial
    fails with reason out_of_memory and its retry halves the micro-batch and doubles the
    accumulation."""
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(64 * 2**20 / total)  # 64 MiB
    try:
        overrides = [
            "--set",
            "train.device=cuda",
            "--set",
            "train.batch_size=64",
            "--set",
            "train.oom_retry=true",
            "--set",
            "train.max_steps=2",
            "--set",
            "train.eval_every=2",
            "--set",
            "max_consecutive_failures=10",
            "--set",
            "data.max_length=48",
        ]
        main(["run", str(tiny_study), "--n-trials", "1", "--no-report", *overrides])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    trials = finished(tiny_study)
    assert trials[0].state.name == "FAIL"
    assert trials[0].user_attrs[TrialAttr.FAIL_REASON] == OUT_OF_MEMORY
    assert (
        trials[1].user_attrs[TrialAttr.MICRO_BATCH],
        trials[1].user_attrs[TrialAttr.GRAD_ACCUM],
    ) == (32, 2)


def test_no_memory_growth_across_five_trials(tiny_study, monkeypatch):
    allocated = []
    original = objective.Objective.after_trial

    def measure(self, optuna_study, trial):
        original(self, optuna_study, trial)
        allocated.append(torch.cuda.memory_allocated())

    monkeypatch.setattr(objective.Objective, "after_trial", measure)
    overrides = ["--set", "train.device=cuda", "--set", "train.max_steps=8"]
    assert main(["run", str(tiny_study), "--n-trials", "5", "--no-report", *overrides]) == 0
    assert len(allocated) == 5
    # what the worker keeps, nothing per trial
    assert max(allocated[1:]) <= allocated[0] + 2**20, allocated


def test_a_sweep_over_the_students_form_on_cuda(tiny_study):
    """Full fine-tuning and LoRA rank 4 in bf16 on the GPU: both complete, the adapter trains a
    small share of the student, and the out-of-memory constraint stays unbroken."""
    overrides = [
        *("--set", "train.device=cuda", "--set", "train.max_steps=12"),
        *("--set", "search.lora_rank=[0, 4]", "--set", "objective=[student_ppl, peak_memory_gb]"),
        *("--set", "pruner.name=none"),
    ]
    assert main(["run", str(tiny_study), "--n-trials", "4", "--no-report", *overrides]) == 0
    trials = finished(tiny_study, [o for o in overrides if o != "--set"])
    assert all(t.state.name == "COMPLETE" for t in trials)
    counts = {t.params["lora_rank"]: t.user_attrs[TrialAttr.TRAINABLE_PARAMETERS] for t in trials}
    if len(counts) == 2:
        assert counts[4] < counts[0] / 2
    assert all(0 < t.values[1] < 80 for t in trials)  # peak GB on the device
