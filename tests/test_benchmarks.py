"""The benchmarks' smoke runs on the CPU: the same code paths, on tiny configurations."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from conftest import ROOT

BENCHMARKS = ROOT / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_tiny_mode_runs_every_mode_on_the_cpu(tmp_path, capsys):
    gpu = load_script("gpu")
    output = tmp_path / "tiny.json"
    # The dtypes a GPU run uses: bf16 autocast and a bf16 teacher.
    gpu.main(
        ["--tiny", "--precision", "bf16", "--teacher-dtype", "bfloat16", "--output", str(output)]
    )

    report = json.loads(output.read_text())
    # no mode failed; flash-attn's is skipped (it needs a CUDA GPU)
    assert report["notes"] == {
        "cached-fa2": "skipped: flash_attention_2 needs flash-attn and a CUDA GPU"
    }
    assert set(report["results"]) == set(gpu.MODES) - {"cached-fa2"}
    kernels = report["optimizer"]
    assert list(kernels) == ["loop", "foreach", "fused"]
    assert kernels["fused"]["max_abs_diff"] < 1e-6
    for result in report["results"].values():
        # no peak on a CPU
        assert result["tokens_per_s"] > 0 and result["peak_gib"] > 0 and result["mfu"] is None
    build = report["cache_build"]
    # the teacher ran once over the rows
    assert build["teacher_tokens"] == build["split_tokens"] == 2 * 3 * 32
    table = capsys.readouterr().out
    assert (
        "cached distillation step / plain CE step" in table and "bfloat16 teacher online" in table
    )
    assert "onpolicy-1 / cached: step" in table and "cached-gc / cached: step" in table
    assert "AdamW step on the student's parameters: loop" in table
    assert "lora-16 / cached (full fine-tuning): peak memory" in table


def test_optimizer_benchmark_times_each_kernel_and_the_step(capsys):
    optimizer = load_script("optimizer")
    smoke = ["--layers", "1", "--vocab", "512", "--seq", "16", "--steps", "1", "--rounds", "1"]
    result = optimizer.main([*smoke, "--optimizer-steps", "2"])
    kernels = result["kernels"]
    assert list(kernels) == ["loop", "foreach", "fused"]
    assert kernels["loop"]["max_abs_diff"] == 0 and kernels["fused"]["max_abs_diff"] < 1e-6
    assert all(len(runs) == 1 for runs in result["steps"].values())
    out = capsys.readouterr().out
    assert "distillation step / plain fine-tuning step: " in out
    assert "the optimizer's share of the plain step: " in out


def test_precision_benchmark_compares_bf16_with_fp32_on_a_tiny_study(tiny_study, capsys):
    precision = load_script("precision")
    smoke = ["--demo", str(tiny_study), "--demo-steps", "2", "--rounds", "1"]
    runs = precision.main(
        [*smoke, "--vocab", "512", "--layers", "1", "--seq", "16", "--steps", "1"]
    )
    assert {p: len(r) for p, r in runs["40M"].items()} == {"fp32": 1, "bf16": 1}
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| demo") or "plain" in line]
    assert len(rows) == 2
    assert "precision auto takes " in out


def test_lora_benchmark_compares_each_rank_with_full_fine_tuning(capsys):
    lora = load_script("lora")
    lora.main(["--layers", "1", "--vocab", "512", "--seq", "16", "--steps", "2", "--ranks", "4"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| form |")
    full, adapter = rows[1].split("|"), rows[2].split("|")
    assert full[1].strip() == "full fine-tuning" and full[4].strip() == "1.00"
    assert adapter[1].strip() == "LoRA rank 4" and adapter[-2].strip().startswith(("met", "not"))
    assert int(adapter[2].replace(",", "")) < int(full[2].replace(",", ""))


def test_onpolicy_benchmark_times_every_share_on_a_tiny_study(tiny_study, capsys):
    onpolicy = load_script("onpolicy")
    onpolicy.main(
        [
            str(tiny_study),
            "--steps",
            "4",
            "--threads",
            "0",
            "--set",
            "search.learning_rate=[1.0e-3, 2.0e-3]",
        ]
    )
    rows = [
        line.split()
        for line in capsys.readouterr().out.splitlines()
        if line.strip()[:3] in {"0.0", "0.5", "1.0"}
    ]
    assert [row[0] for row in rows] == ["0.0", "0.5", "1.0"]
    # the cached step is the unit, and generates nothing
    assert rows[0][3] == "1.00" and rows[0][5] == "0"
    # lmbda 1: every step generates, and costs more
    assert int(rows[2][5]) == 4 and float(rows[2][3]) > 1


def test_the_real_configurations_are_qwen3_0_6b_and_4b():
    gpu = load_script("gpu")
    student, teacher = gpu.qwen3_0_6b(), gpu.qwen3_4b()
    # Parameter counts as published: 0.6B (0.44B without embeddings), 4.0B (3.6B without).
    embedding = 151936 * 1024
    assert gpu.matmul_weights(student) == pytest.approx(0.44e9 + embedding, rel=0.02)
    assert gpu.matmul_weights(teacher) - 151936 * 2560 == pytest.approx(3.6e9, rel=0.03)
    assert (
        teacher.num_hidden_layers,
        teacher.num_attention_heads,
        teacher.num_key_value_heads,
    ) == (36, 32, 8)
    assert student.tie_word_embeddings and teacher.tie_word_embeddings


def test_checkpoints_benchmark_times_a_trial_each_way_on_a_tiny_study(
    tiny_study, tmp_path, capsys
):
    checkpoints = load_script("checkpoints")
    checkpoints.main([str(tiny_study), "--repeats", "1", "--no-qwen3", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "(so 1 resume checkpoints)" in out  # 8 steps, an evaluation every 4: one before the end
    assert "trial without checkpoints" in out and "trial with checkpoints" in out
    assert "of the trial (goal <= 5%" in out and "best checkpoint" in out
    assert not list(tmp_path.glob("*.pt"))  # each written checkpoint was removed


def test_pruning_benchmark_compares_each_pruner_with_none_on_a_tiny_study(tiny_study, capsys):
    pruning = load_script("pruning")
    pruning.main(
        [str(tiny_study), "--seeds", "0", "--pruners", "none", "median", "--n-trials", "4"]
        + ["--max-steps", "8", "--eval-every", "2"]
    )
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    rows = {line.split("|")[1].strip(): line for line in table[1:]}
    assert set(rows) == {"none", "median"}
    assert "1.00x" in rows["none"]
    assert "met" in rows["median"]  # met or not met: the goal is judged, whatever the outcome


def test_samplers_benchmark_compares_each_sampler_with_random_on_a_tiny_study(tiny_study, capsys):
    samplers = load_script("samplers")
    samplers.main(
        [str(tiny_study), "--seeds", "0", "--n-trials", "3", "--max-steps", "4"]
        + ["--samplers", "random", "gp"]
    )
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    rows = {line.split("|")[1].strip(): line for line in table[1:]}
    assert set(rows) == {"random", "gp"} and "1.00x" in rows["random"]
