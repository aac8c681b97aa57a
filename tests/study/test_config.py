"""Study files: loading, overrides, validation and fingerprints (no torch needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdsweep.errors import StudyError
from kdsweep.study.reader import load_study
from kdsweep.study.space import WHOLE_VOCAB, finite_top_ks

from conftest import ROOT

STUDIES = sorted(ROOT.joinpath("studies").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_every_shipped_study_validates(path):
    study = load_study(path)
    assert study.name
    assert study.teacher.name and study.student.label


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


MINIMAL = """
name: t
teacher: {name: some/teacher}
student: {name: some/student}
data: {dataset: some/data}
"""


def problems(path, overrides=()) -> list[str]:
    with pytest.raises(StudyError) as info:
        load_study(path, list(overrides))
    return info.value.problems


def test_minimal_study_takes_defaults(tmp_path):
    study = load_study(write(tmp_path, MINIMAL))
    assert study.objective == "student_ppl"
    assert study.storage_url == "sqlite:///kdsweep.db"
    assert study.experiment_name == "t"
    assert study.search.top_k.choices == (WHOLE_VOCAB,)


def test_every_problem_is_reported_at_once_with_file_and_key(tmp_path):
    path = write(
        tmp_path,
        MINIMAL + "search: {alpha: {low: 0.2, high: 1.5}}\ntrain: {batch_size: 0, colour: red}\n",
    )
    found = problems(path)
    assert f"{path}: search.alpha.high: must be <= 1, got 1.5" in found
    assert f"{path}: train.batch_size: must be >= 1, got 0" in found
    assert any(p.startswith(f"{path}: train.colour: unknown key") for p in found)


def test_wrong_types_are_named(tmp_path):
    path = write(tmp_path, MINIMAL + "train: {seed: abc}\nsave_best: maybe\n")
    found = problems(path)
    assert f"{path}: train.seed: must be an integer, got 'abc'" in found
    assert f"{path}: save_best: must be true or false, got 'maybe'" in found


def test_missing_required_fields(tmp_path):
    found = problems(write(tmp_path, "n_trials: 0\n"))
    joined = "\n".join(found)
    for key in ("name", "teacher.name", "student.name", "data.dataset", "n_trials"):
        assert f": {key}: " in joined


def test_malformed_yaml_is_one_line(tmp_path):
    found = problems(write(tmp_path, "name: [unclosed\n"))
    assert len(found) == 1 and "not valid YAML" in found[0]


def test_missing_file(tmp_path):
    assert problems(tmp_path / "nope.yaml") == [f"{tmp_path / 'nope.yaml'}: no such study file"]


def test_set_overrides_any_field(tmp_path):
    path = write(tmp_path, MINIMAL)
    study = load_study(
        path,
        [
            "train.max_steps=7",
            "train.eval_every=7",
            "search.alpha=0.5",
            "search.top_k=[4, all]",
            "tracking.uri=sqlite:///m.db",
        ],
    )
    assert study.train.max_steps == 7
    assert study.search.alpha.is_fixed and study.search.alpha.value == 0.5
    assert study.search.top_k.choices == (4, WHOLE_VOCAB)
    assert study.tracking.uri == "sqlite:///m.db"
    assert problems(path, ["train.max_steps"]) == [
        f"{path}: --set train.max_steps: expected key.path=value"
    ]


@pytest.mark.parametrize(
    "setting, message",
    [
        (
            "train.attn_implementation=flash",
            "train.attn_implementation: must be one of sdpa, eager, flash_attention_2, got "
            "'flash'",
        ),
    ],
)
def test_impossible_settings(tmp_path, setting, message):
    path = write(tmp_path, MINIMAL)
    assert f"{path}: {message}" in problems(path, [setting])


@pytest.mark.parametrize(
    "search, message",
    [
        ("{temperature: {low: 0, high: 2}}", "search.temperature.low: must be > 0, got 0.0"),
        (
            "{learning_rate: {low: 1e-3, high: 1e-4, log: true}}",
            "search.learning_rate: low must be <= high",
        ),
        (
            "{alpha: {low: 0.0, high: 0.5, log: true}}",
            "search.alpha.low: must be > 0 for a log range",
        ),
        ("{top_k: {low: 1, high: 5}}", "search.top_k: must be a list of choices"),
        ("{top_k: [0, all]}", "search.top_k.choices[0]: must be an integer >= 1 or 'all', got 0"),
        ("{alpha: []}", "search.alpha.choices: must list at least one value"),
    ],
)
def test_impossible_search_spaces(tmp_path, search, message):
    found = problems(write(tmp_path, MINIMAL + f"search: {search}\n"))
    assert any(message in p for p in found), found


def test_grid_sampler_needs_discrete_values(tmp_path):
    path = write(
        tmp_path,
        MINIMAL
        + "sampler: {name: grid}\nsearch: {alpha: [0.1, 0.5], temperature: 2, learning_rate: "
        "1e-4, top_k: [4]}\n",
    )
    assert load_study(path).sampler.name == "grid"
    found = problems(path, ["search.temperature={low: 1, high: 4}"])
    assert any("search.temperature: the grid sampler needs" in p for p in found)


def test_baselines_are_checked(tmp_path):
    path = write(tmp_path, MINIMAL + "baselines: [{alpha: 0}, {alpah: 0}, {alpha: 2}]\n")
    found = problems(path)
    assert any("baselines[1].alpah: unknown parameter" in p for p in found)
    assert any("baselines[2].alpha: must be <= 1, got 2" in p for p in found)


def test_fingerprint_is_stable_and_sensitive(tmp_path):
    path = write(tmp_path, MINIMAL)
    assert load_study(path).fingerprint() == load_study(path).fingerprint()
    assert load_study(path, ["train.seed=1"]).fingerprint() != load_study(path).fingerprint()


def test_finite_top_ks(tmp_path):
    path = write(tmp_path, MINIMAL)
    assert finite_top_ks(load_study(path, ["search.top_k=[8, 32]"]).search) == [8, 32]
    assert finite_top_ks(load_study(path, ["search.top_k=[8, all]"]).search) == []
    assert finite_top_ks(load_study(path, ["search.top_k=16"]).search) == [16]
    assert finite_top_ks(load_study(path, ["search.top_k=16"]).search, ({"top_k": "all"},)) == []


def test_relative_paths_resolve_from_the_study_folder(tmp_path):
    (tmp_path / "rows.jsonl").write_text("{}\n")
    study = load_study(write(tmp_path, MINIMAL))
    assert study.resolve_path("rows.jsonl") == str(tmp_path / "rows.jsonl")
    assert study.resolve_path("org/name") == "org/name"


def test_a_study_loaded_by_a_relative_path_names_its_files_absolutely(tmp_path, monkeypatch):
    """What a trial records (its rerun file, its dataset input) reads the same from anywhere."""
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "rows.jsonl").write_text("{}\n")
    write(tmp_path / "studies", MINIMAL)
    monkeypatch.chdir(tmp_path)
    study = load_study(Path("studies") / "study.yaml")
    assert study.resolve_path("rows.jsonl") == str(tmp_path / "studies" / "rows.jsonl")


def test_reasoning_and_answer_settings_are_checked(tmp_path):
    path = write(tmp_path, MINIMAL)
    found = problems(
        path,
        ["data.reasoning=drop", "eval.answer=(unclosed", "data.each_turn_as_last=maybe"],
    )
    assert (
        f"{path}: data.reasoning: must be train or strip (train on an assistant turn's "
        "reasoning, or strip it), got 'drop'" in found
    )
    assert any(
        p.startswith(
            f"{path}: eval.answer: '(unclosed' is neither whole, gsm8k, boxed nor a valid "
            "regular expression"
        )
        for p in found
    )
    assert f"{path}: data.each_turn_as_last: must be true or false, got 'maybe'" in found
    two = problems(path, [r"eval.answer=(\d+) and (\d+)"])
    assert two == [
        f"{path}: eval.answer: the regular expression '(\\\\d+) and (\\\\d+)' has 2 groups; keep "
        "one around the answer (make the others non-capturing: (?:...))"
    ]
    for fine in ("whole", "gsm8k", "boxed", r"The answer is (\d+)", r"\d+"):
        assert load_study(path, [f"eval.answer={fine}"]).eval.answer == fine
