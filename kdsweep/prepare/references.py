"""What every trial is compared with, measured once per study: the teacher and the untrained
student (perplexity, and accuracy when the study decodes answers, with the teacher's reasoning
length and truncated share), the data's sizes and padding, what became of the train answers'
reasoning, and the share of the teacher's probability mass each top_k keeps.

The first worker to reach a new study measures them; the sweep keeps them with the Optuna study
(keyed by ``names.StudyAttr``) for every other worker, the parent MLflow run and the report.
"""

from __future__ import annotations

from kdsweep.data import AnswerCounts, make_batches, padding_share
from kdsweep.distill import models
from kdsweep.distill.evaluate import EvalSet, accuracy, score
from kdsweep.names import Metric, StudyAttr
from kdsweep.prepare.inputs import Inputs
from kdsweep.prepare.teacher import StudyTeacher
from kdsweep.progress import SweepProgress
from kdsweep.study.config import StudyConfig


def measure(
    *,
    study: StudyConfig,
    inputs: Inputs,
    teacher: StudyTeacher,
    eval_set: EvalSet,
    progress: SweepProgress,
) -> dict:
    """The study's references, as Optuna user attrs."""
    student = models.load_model("student", inputs.student, inputs.device)
    values = (
        _accuracies(student, teacher, eval_set, progress) if eval_set.answers is not None else {}
    )
    train_batches = make_batches(
        inputs.train_split,
        batch_size=study.train.batch_size,
        pad_id=inputs.tokenizer.pad_token_id,
        shuffle_seed=study.train.seed,
        group_by_length=study.data.group_by_length,
    )
    rows = sum(len(batch.example_ids) for batch in eval_set.batches)
    with progress.phase("scoring the untrained student", rows) as phase:
        untrained = score(student, eval_set.batches, inputs.vocab, on_rows=phase.advance)
    values |= {
        StudyAttr.TEACHER_PPL: eval_set.teacher_ppl,
        StudyAttr.UNTRAINED_PPL: untrained.perplexity,
        StudyAttr.TRAIN_ROWS: len(inputs.train_split),
        StudyAttr.EVAL_ROWS: sum(len(b.example_ids) for b in eval_set.batches),
        StudyAttr.TRAIN_SCORED_TOKENS: inputs.train_split.num_scored_tokens,
        StudyAttr.EVAL_SCORED_TOKENS: eval_set.num_tokens,
        StudyAttr.TRAIN_PADDING_SHARE: padding_share(train_batches),
        StudyAttr.VOCAB_SIZE: inputs.vocab.size,
        StudyAttr.VOCAB_PADDED: inputs.vocab.padded,
        **answer_counts(inputs.train_split.counts),
    }
    if masses := teacher.masses():
        values[StudyAttr.TOPK_MASS] = masses  # JSON keys are strings: {"20": 0.93, "50": 0.97}
    return values


def _accuracies(
    student, teacher: StudyTeacher, eval_set: EvalSet, progress: SweepProgress
) -> dict[str, float]:
    """The teacher's and the untrained student's accuracy on the eval answers. A worker that
    reads the teacher's cache loads its weights for this, once per study."""
    answers = eval_set.answers
    models_ = {"teacher": teacher.online("decode its answers").model, "untrained": student}
    scores = {}
    for who, model in models_.items():
        title = f"decoding the {who if who == 'teacher' else 'untrained student'}'s answers"
        with progress.phase(title, len(answers.prompts)) as phase:
            scores[who] = accuracy(model, answers, on_rows=phase.advance)
    teacher.release()
    return {
        StudyAttr.ACCURACY_ROWS: len(answers.prompts),
        StudyAttr.TEACHER_EXACT_MATCH: scores["teacher"][Metric.EXACT_MATCH],
        StudyAttr.TEACHER_ROUGE_L: scores["teacher"][Metric.ROUGE_L],
        StudyAttr.UNTRAINED_EXACT_MATCH: scores["untrained"][Metric.EXACT_MATCH],
        StudyAttr.UNTRAINED_ROUGE_L: scores["untrained"][Metric.ROUGE_L],
        StudyAttr.TEACHER_REASONING_TOKENS: scores["teacher"][Metric.REASONING_TOKENS],
        StudyAttr.TEACHER_TRUNCATED_SHARE: scores["teacher"][Metric.TRUNCATED_SHARE],
    }


def answer_counts(counts: AnswerCounts) -> dict[str, int]:
    """The train split's answers and what became of their reasoning, by their attrs' names."""
    return {
        StudyAttr.TRAIN_ANSWERS: counts.answers,
        StudyAttr.TRAIN_REASONED: counts.reasoned,
        StudyAttr.TRAIN_REASONING_TRAINED: counts.trained,
        StudyAttr.TRAIN_REASONING_LEFT_OUT: counts.left_out,
        StudyAttr.TRAIN_REASONING_STRIPPED: counts.stripped,
        StudyAttr.TRAIN_UNLIKE_GENERATION: counts.unlike_generation,
    }
