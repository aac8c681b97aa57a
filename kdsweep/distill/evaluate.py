"""Evaluation on held-out rows: token-weighted perplexity, KL to the teacher, task accuracy.

Perplexity is exp(total NLL / total scored tokens) over the whole eval set, so a long answer
weighs as many times as it has tokens; teacher and student are scored on the very same tokens.

Accuracy asks the model for each held-out row's final answer: it greedy-decodes from the row's
prompt (``generation.generate``: the conversation before it with the chat template's generation
prompt, exactly as the configured thinking mode gives it at inference) until the answer's end (a
chat template's end-of-turn, or EOS). The answer after its reasoning is scored against the
reference by exact match and ROUGE-L (``answers``). Each decoding also measures its reasoning:
the mean think block's length in tokens, and the share of generations truncated (cut at
``eval.max_new_tokens`` before their end-of-turn, or never closing their think block: a thinking
model that reasons past the budget has no answer).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdsweep.data import Batch, TokenizedSplit
from kdsweep.data.reasoning import THINK_CLOSE, THINK_OPEN
from kdsweep.distill.answers import generated_answer, matches, rouge_l
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
    """Mean exact match and ROUGE-L of the model's greedy answers (fractions in [0, 1]), the mean
    length of their reasoning in tokens, and the share of them truncated; ``on_rows`` hears each
    batch of answers decoded."""
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
    texts = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in generated]
    predictions = [generated_answer(text) for text in texts]
    pairs = list(zip(predictions, answers.references))
    truncated = [
        prediction is None or not tokens or tokens[-1] != answers.stop_id
        for prediction, tokens in zip(predictions, generated)
    ]
    reasoning = [_reasoning_tokens(t, text, tokenizer) for t, text in zip(generated, texts)]
    return {
        Metric.EXACT_MATCH: sum(matches(p, r, settings.answer) for p, r in pairs) / len(pairs),
        Metric.ROUGE_L: sum(rouge_l(p or "", r) for p, r in pairs) / len(pairs),
        Metric.REASONING_TOKENS: sum(reasoning) / len(reasoning),
        Metric.TRUNCATED_SHARE: sum(truncated) / len(truncated),
    }


def _reasoning_tokens(tokens: list[int], text: str, tokenizer: PreTrainedTokenizerBase) -> int:
    """The generated tokens up to the one that closes its (last) think block; all of them when
    it never closes one; 0 without one. Found by decoding prefixes, whatever the tokenizer makes
    of ``</think>`` (one added token in Qwen3's)."""
    closes = text.count(THINK_CLOSE)
    if not closes:
        return len(tokens) if THINK_OPEN in text else 0
    low, high = 1, len(tokens)  # the shortest prefix that holds every close
    while low < high:
        middle = (low + high) // 2
        prefix = tokenizer.decode(tokens[:middle], skip_special_tokens=True)
        low, high = (low, middle) if prefix.count(THINK_CLOSE) == closes else (middle + 1, high)
    return low
