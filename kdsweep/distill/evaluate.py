"""Evaluation on held-out rows: token-weighted perplexity, KL to the teacher, task accuracy.

Perplexity is exp(total NLL / total scored tokens) over the whole eval set, so a long answer
weighs as many times as it has tokens; teacher and student are scored on the very same tokens.

Accuracy asks the model for each held-out row's final answer: it greedy-decodes from the row's
prompt (``generation.generate``) until the answer's end (a chat template's end-of-turn, or EOS),
and the text, cut at a guanaco row's next marker, is scored against
the reference by exact match (whitespace normalised) and ROUGE-L (the LCS F-measure over
lower-cased words, as MiniLLM and DistiLLM report it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdsweep.data import Batch, TokenizedSplit, answer_text
from kdsweep.distill.generation import generate
from kdsweep.distill.models import Vocabulary, hidden_states, output_weight
from kdsweep.distill.targets import OnlineTeacher, TeacherTargets, scored_positions
from kdsweep.losses import distill_loss_from_hidden
from kdsweep.names import Metric
from kdsweep.study.config import EvalConfig

# The eval KL at T=1 compares with the teacher's 256 most likely tokens (renormalised): for a
# trained LM they hold nearly all the mass, and they fit in memory for the whole eval set.
EVAL_TOP_K = 256


@dataclass(frozen=True)
class Answers:
    """Held-out rows that end with an answer: what the model is asked, and what it should say."""

    prompts: list[tuple[int, ...]]
    references: list[str]
    tokenizer: PreTrainedTokenizerBase
    settings: EvalConfig  # how many new tokens, how many prompts at a time
    stop_id: int  # generation stops at it: the chat template's end-of-turn, or EOS

    @staticmethod
    def of(
        split: TokenizedSplit, tokenizer: PreTrainedTokenizerBase, settings: EvalConfig
    ) -> Answers:
        """The first ``settings.max_rows`` rows of ``split`` that end with an answer."""
        rows = split.answered()[: settings.max_rows]
        stop_id = tokenizer.eos_token_id if split.stop_id is None else split.stop_id
        return Answers(
            [split.prompt(e) for e in rows],
            [split.answers[e] for e in rows],
            tokenizer,
            settings,
            stop_id,
        )


@dataclass(frozen=True)
class EvalSet:
    """The held-out batches, with the teacher's targets for them computed once per study."""

    batches: list[Batch]
    teacher_targets: list[TeacherTargets]
    teacher_ppl: float
    num_tokens: int
    answers: Answers | None = None  # eval.accuracy: the rows whose answers are decoded


@dataclass(frozen=True)
class Scores:
    nll_sum: float
    kl_sum: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.tokens) if self.tokens else float("nan")

    @property
    def kl(self) -> float:
        return self.kl_sum / self.tokens if self.tokens else float("nan")


@torch.no_grad()
def score(
    model: PreTrainedModel,
    batches: list[Batch],
    vocab: Vocabulary,
    *,
    teacher_targets: list[TeacherTargets] | None = None,
    chunk_tokens: int | None = None,
    on_rows: Callable[[int], None] = lambda done: None,
) -> Scores:
    """Summed NLL (and KL at T=1 to the teacher's targets, when given) over all scored tokens;
    ``on_rows`` hears each batch's rows."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    weight = output_weight(model, vocab)
    nll = kl = 0.0
    tokens = 0
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        kept = scored_positions(batch.labels)
        hidden = hidden_states(model, batch.input_ids, batch.attention_mask)[:, :-1][kept]
        targets = teacher_targets[i].as_loss_kwargs() if teacher_targets else {}
        result = distill_loss_from_hidden(
            hidden,
            weight,
            batch.labels[:, 1:][kept],
            **targets,
            alpha=1.0 if targets else 0.0,
            temperature=1.0,
            chunk_tokens=chunk_tokens,
        )
        count = int(kept.sum())
        nll += float(result.ce) * count
        kl += float(result.kl) * count
        tokens += count
        on_rows(len(batch.example_ids))
    model.train(was_training)
    return Scores(nll_sum=nll, kl_sum=kl, tokens=tokens)


def prepare_eval_set(
    teacher: OnlineTeacher,
    batches: list[Batch],
    *,
    chunk_tokens: int | None,
    on_rows: Callable[[int], None] = lambda done: None,
) -> EvalSet:
    """Score the teacher once per study and keep its top tokens for the students' KL."""
    device = next(teacher.model.parameters()).device
    targets = [teacher.targets(batch.to(device), top_k=EVAL_TOP_K) for batch in batches]
    teacher_scores = score(
        teacher.model, batches, teacher.vocab, chunk_tokens=chunk_tokens, on_rows=on_rows
    )
    return EvalSet(
        batches=batches,
        teacher_targets=targets,
        teacher_ppl=teacher_scores.perplexity,
        num_tokens=teacher_scores.tokens,
    )


def evaluate_student(
    student: PreTrainedModel,
    eval_set: EvalSet,
    vocab: Vocabulary,
    *,
    chunk_tokens: int | None,
    with_accuracy: bool,
) -> dict[str, float]:
    """The eval metrics every trial logs: perplexities, their ratio and KL to the teacher, and
    (``with_accuracy``, when the eval set has answers) exact match and ROUGE-L."""
    scores = score(
        student,
        eval_set.batches,
        vocab,
        teacher_targets=eval_set.teacher_targets,
        chunk_tokens=chunk_tokens,
    )
    metrics = {
        Metric.STUDENT_PPL: scores.perplexity,
        Metric.TEACHER_PPL: eval_set.teacher_ppl,
        Metric.PPL_RATIO: scores.perplexity / eval_set.teacher_ppl,
        Metric.KL_TO_TEACHER: scores.kl,
    }
    if with_accuracy and eval_set.answers is not None:
        metrics |= accuracy(student, eval_set.answers)
    return metrics


@dataclass(frozen=True)
class TestSet:
    """The test split: scored once per finalist, never selected on."""

    batches: list[Batch]
    answers: Answers | None = None  # eval.accuracy: the rows whose answers are decoded

    @property
    def rows(self) -> int:
        return sum(len(batch.example_ids) for batch in self.batches)

    @property
    def work(self) -> int:
        """Rows a model's scoring goes through: each row's perplexity, each answer's decoding."""
        return self.rows + (len(self.answers.prompts) if self.answers is not None else 0)


def score_test(
    model: PreTrainedModel,
    test_set: TestSet,
    vocab: Vocabulary,
    *,
    on_rows: Callable[[int], None] = lambda done: None,
) -> dict[str, float]:
    """A model's perplexity (and accuracy, when decoded) on the test split, by the test names;
    ``on_rows`` hears the rows scored and decoded (``TestSet.work`` in all)."""
    ppl = score(model, test_set.batches, vocab, on_rows=on_rows).perplexity
    metrics = {Metric.TEST_STUDENT_PPL: ppl}
    if test_set.answers is not None:
        found = accuracy(model, test_set.answers, on_rows=on_rows)
        metrics[Metric.TEST_EXACT_MATCH] = found[Metric.EXACT_MATCH]
        metrics[Metric.TEST_ROUGE_L] = found[Metric.ROUGE_L]
    return metrics


# ---------------------------------------------------------------------------------------------
# Task accuracy


def accuracy(
    model: PreTrainedModel, answers: Answers, *, on_rows: Callable[[int], None] = lambda done: None
) -> dict[str, float]:
    """Mean exact match and ROUGE-L of the model's greedy answers, fractions in [0, 1];
    ``on_rows`` hears each batch of answers decoded."""
    if not answers.prompts:
        return {}
    tokenizer, settings = answers.tokenizer, answers.settings
    generated = generate(
        model,
        answers.prompts,
        pad_id=tokenizer.pad_token_id,
        eos_id=answers.stop_id,
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.batch_size,
        vocab_size=len(tokenizer),
        on_rows=on_rows,
    )
    predictions = [
        answer_text(tokenizer.decode(tokens, skip_special_tokens=True)) for tokens in generated
    ]
    pairs = list(zip(predictions, answers.references))
    return {
        Metric.EXACT_MATCH: sum(exact_match(p, r) for p, r in pairs) / len(pairs),
        Metric.ROUGE_L: sum(rouge_l(p, r) for p, r in pairs) / len(pairs),
    }


def exact_match(prediction: str, reference: str) -> bool:
    """Equal once runs of whitespace are one space and the ends are stripped."""
    return " ".join(prediction.split()) == " ".join(reference.split())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure: the longest common subsequence of lower-cased alphanumeric words,
    over both lengths (``rouge_score``'s default tokenization; 0 when either is empty)."""
    ours, theirs = _words(prediction), _words(reference)
    common = _lcs(ours, theirs)
    if not common:
        return 0.0
    precision, recall = common / len(ours), common / len(theirs)
    return 2 * precision * recall / (precision + recall)


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, by dynamic programming over one row."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]
