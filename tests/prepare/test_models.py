"""Models from local folders, as a study names them: their attention implementation, a Llama
teacher and student, a student built from the teacher's layers, a teacher from a GGUF file."""

from __future__ import annotations

from kdsweep.prepare.trial_runner import TrialRunner
from kdsweep.progress import SweepProgress
from kdsweep.study.reader import load_study


def test_the_attention_implementation_reaches_teacher_and_student(tiny_study):
    study = load_study(tiny_study, ["train.attn_implementation=eager"])
    runner = TrialRunner.prepare(study, progress=SweepProgress())
    student = runner.new_student({"lora_rank": 0}, seed=0)
    teacher = runner.teacher.online().model
    assert student.config._attn_implementation == teacher.config._attn_implementation == "eager"
    default = TrialRunner.prepare(load_study(tiny_study), progress=SweepProgress())
    assert default.new_student({}, seed=0).config._attn_implementation == "sdpa"
