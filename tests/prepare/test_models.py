"""Models from local folders, as a study names them: a Llama teacher and a student built from its
layers, a teacher from a GGUF file, and both models' attention implementation."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from kdsweep.cli import main
from kdsweep.errors import StudyError
from kdsweep.names import Tag
from kdsweep.prepare import demo, demo_models, model_folders
from kdsweep.prepare.inputs import read_inputs
from kdsweep.prepare.trial_runner import TrialRunner
from kdsweep.progress import SweepProgress
from kdsweep.study.reader import load_study

from conftest import mlflow_runs, write_tiny_study, written

LAYERS = [0, 3]  # of the teacher's 4


@pytest.fixture(scope="module")
def llama_teacher(tmp_path_factory) -> Path:
    """A folder holding a 4-layer Llama (hidden size 32, random weights) and the demo tokenizer."""
    folder = tmp_path_factory.mktemp("llama") / "teacher"
    tokenizer = demo_models.build_tokenizer(demo.generate_conversations(300, seed=0))
    torch.manual_seed(0)
    llama(len(tokenizer), layers=4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def llama(vocab_size: int, *, layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def built_again(*args):
    raise AssertionError("a folder in the cache was built again")


def study_from_teacher(root: Path, teacher: Path, data: Path, tracking: Path, **kwargs) -> Path:
    """The tiny study with ``teacher``, and a student built from its layers ``LAYERS``."""
    shutil.copyfile(tracking, root / "mlflow.db")
    path = write_tiny_study(root, {"teacher": teacher, "student": "-"}, data, **kwargs)
    text = path.read_text().replace(
        "student: {name: -}", f"student: {{from_teacher: {{layers: {LAYERS}}}}}"
    )
    path.write_text(text)
    return path


def test_a_llama_teacher_distills_into_a_student_built_from_its_layers(
    tmp_path, llama_teacher, tiny_data, empty_tracking_store, capsys
):
    study_path = study_from_teacher(tmp_path, llama_teacher, tiny_data, empty_tracking_store)
    assert main(["run", str(study_path), "--n-trials", "2"]) == 0
    assert "building the student from the teacher's layers 0, 3" in capsys.readouterr().err
    report = (tmp_path / "reports" / "tiny.md").read_text()
    assert "**student**: `the teacher's layers 0, 3`" in report
    _, (parent,), trials = mlflow_runs(study_path)
    assert parent.data.params["student"] == "the teacher's layers 0, 3" and len(trials) == 2
    assert all(run.data.tags[Tag.STATE] == "COMPLETE" for run in trials.values())


def test_the_student_built_from_the_teacher_is_those_layers(
    tmp_path, llama_teacher, tiny_data, empty_tracking_store
):
    study = load_study(
        study_from_teacher(tmp_path, llama_teacher, tiny_data, empty_tracking_store)
    )
    folder = Path(read_inputs(study, SweepProgress()).student.name)
    assert folder.parent == model_folders.models_dir()
    built_from = json.loads((folder / "built_from.json").read_text())
    assert built_from["layers"] == LAYERS
    student = AutoModelForCausalLM.from_pretrained(folder).eval()
    teacher = AutoModelForCausalLM.from_pretrained(llama_teacher).eval()
    assert isinstance(student, LlamaForCausalLM) and student.config.num_hidden_layers == 2
    # The teacher with its other layers taken out computes what the student does.
    teacher.model.layers = torch.nn.ModuleList([teacher.model.layers[i] for i in LAYERS])
    ids = AutoTokenizer.from_pretrained(folder)("Name a fruit.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(student(ids).logits, teacher(ids).logits)
    assert AutoTokenizer.from_pretrained(folder).chat_template == demo_models.CHAT_TEMPLATE


def test_the_built_student_is_kept_and_rebuilt_when_the_teacher_changes(
    tmp_path, llama_teacher, tiny_data, empty_tracking_store, monkeypatch
):
    teacher = tmp_path / "teacher"
    shutil.copytree(llama_teacher, teacher)
    study = load_study(study_from_teacher(tmp_path, teacher, tiny_data, empty_tracking_store))
    first = read_inputs(study, SweepProgress()).student.name

    with monkeypatch.context() as patch:
        patch.setattr(model_folders, "_write_student", built_again)
        assert read_inputs(study, SweepProgress()).student.name == first  # kept
    changed = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():
        changed.model.norm.weight.mul_(2)  # the teacher trained on
    changed.save_pretrained(teacher)
    second = read_inputs(study, SweepProgress()).student.name
    assert second != first
    rebuilt = AutoModelForCausalLM.from_pretrained(second)
    assert torch.equal(rebuilt.model.norm.weight, changed.model.norm.weight)


def test_a_layer_the_teacher_lacks_exits_2_before_anything_is_written(
    tmp_path, llama_teacher, tiny_data, empty_tracking_store, capsys
):
    study_path = study_from_teacher(tmp_path, llama_teacher, tiny_data, empty_tracking_store)
    before = written(tmp_path)
    assert main(["run", str(study_path), "--set", "student.from_teacher.layers=[0, 4]"]) == 2
    err = capsys.readouterr().err
    assert "student.from_teacher.layers: the teacher has 4 layers (0 to 3), not 4" in err
    assert written(tmp_path) == before


@pytest.mark.parametrize(
    "student, message",
    [
        (
            "{from_teacher: {layers: [3, 0, 0]}}",
            "student.from_teacher.layers: must list the teacher's layers to keep, counted from "
            "0, in increasing order, each once, e.g. [0, 6, 12, 18, 24, 29]; got [3, 0, 0]",
        ),
        (
            "{name: some/student, from_teacher: {layers: [0, 1]}}",
            "student.name: leave it out with student.from_teacher: the student is built from "
            "the teacher's layers",
        ),
        (
            "{lora: {alpha: 8}}",
            "student.name: must be set (a hub id, a local folder or demo:student, or "
            "student.from_teacher.layers)",
        ),
    ],
)
def test_the_students_settings_are_checked_before_anything_loads(tmp_path, student, message):
    path = tmp_path / "study.yaml"
    path.write_text(f"name: t\nteacher: {{name: t}}\nstudent: {student}\ndata: {{dataset: d}}\n")
    with pytest.raises(StudyError) as info:
        load_study(path)
    assert f"{path}: {message}" in info.value.problems


# ---------------------------------------------------------------------------------------------
# A teacher from a GGUF file


def write_gguf(model: LlamaForCausalLM, tokenizer, path: Path) -> None:
    """A Llama and its byte-level BPE tokenizer as llama.cpp writes them: metadata, the
    tokenizer's tokens and merges, the chat template, the linear layers quantized to Q8_0."""
    gguf = pytest.importorskip("gguf")
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [
            gguf.TokenType.CONTROL if t in demo_models.SPECIAL_TOKENS else gguf.TokenType.NORMAL
            for t in tokens
        ]
    )
    writer.add_token_merges([" ".join(pair) for pair in bpe["merges"]])
    writer.add_eos_token_id(demo_models.EOS_TOKEN_ID)
    writer.add_pad_token_id(demo_models.EOS_TOKEN_ID)
    writer.add_chat_template(demo_models.CHAT_TEMPLATE)
    layer_names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: no output.weight
        if name not in names:
            _, _, layer, *module, _ = name.split(".")
            names[name] = f"blk.{layer}.{layer_names['.'.join(module)]}.weight"
        data = tensor.numpy()
        if data.ndim == 2:
            quantized = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(names[name], quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(names[name], data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def gguf_folder(tmp_path, llama_teacher) -> Path:
    folder = tmp_path / "gguf"
    folder.mkdir()
    model = AutoModelForCausalLM.from_pretrained(llama_teacher)
    write_gguf(model, AutoTokenizer.from_pretrained(llama_teacher), folder / "tiny-Q8_0.gguf")
    return folder


def test_a_gguf_teacher_is_dequantized_once_into_a_plain_folder(
    tmp_path, gguf_folder, tiny_data, empty_tracking_store, monkeypatch
):
    study_path = study_from_teacher(tmp_path, gguf_folder, tiny_data, empty_tracking_store)
    study = load_study(study_path, ["teacher.gguf_file=tiny-Q8_0.gguf"])
    inputs = read_inputs(study, SweepProgress())
    folder = Path(inputs.teacher.name)
    assert folder.parent == model_folders.models_dir() and inputs.teacher.gguf_file is None
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    direct = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file="tiny-Q8_0.gguf").eval()
    assert not getattr(plain, "is_quantized", False)  # a plain model, which saves
    ids = torch.tensor([[5, 17, 300, 2]])
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, direct(ids).logits)
    assert AutoTokenizer.from_pretrained(folder).chat_template == demo_models.CHAT_TEMPLATE
    # The student is built from the dequantized teacher's layers.
    assert json.loads((Path(inputs.student.name) / "built_from.json").read_text())["layers"]
    monkeypatch.setattr(model_folders, "_write_dequantized", built_again)
    assert read_inputs(study, SweepProgress()).teacher.name == str(folder)  # kept


def test_a_missing_gguf_file_exits_2(
    tmp_path, gguf_folder, tiny_data, empty_tracking_store, capsys
):
    study_path = study_from_teacher(tmp_path, gguf_folder, tiny_data, empty_tracking_store)
    assert main(["run", str(study_path), "--set", "teacher.gguf_file=other.gguf"]) == 2
    assert "cannot read the teacher's GGUF file 'other.gguf'" in capsys.readouterr().err


def test_a_gguf_file_without_the_gguf_package_names_it(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a)
    )
    path = tmp_path / "study.yaml"
    path.write_text(
        "name: t\nteacher: {name: t, gguf_file: m.gguf}\nstudent: {name: s}\ndata: {dataset: d}\n"
    )
    with pytest.raises(StudyError) as info:
        load_study(path)
    assert info.value.problems == [
        f"{path}: teacher.gguf_file: transformers reads a GGUF file with the gguf package (not "
        "installed): pip install gguf"
    ]


# ---------------------------------------------------------------------------------------------
# Attention


def test_the_attention_implementation_reaches_teacher_and_student(tiny_study):
    study = load_study(tiny_study, ["train.attn_implementation=eager"])
    runner = TrialRunner.prepare(study, progress=SweepProgress())
    student = runner.new_student({"lora_rank": 0}, seed=0)
    teacher = runner.teacher.online().model
    assert student.config._attn_implementation == teacher.config._attn_implementation == "eager"
    default = TrialRunner.prepare(load_study(tiny_study), progress=SweepProgress())
    assert default.new_student({}, seed=0).config._attn_implementation == "sdpa"
