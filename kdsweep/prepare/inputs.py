"""Everything a study reads, checked before anything is written.

Reading locates the models (the demo's are built on first use), loads both tokenizers and checks
that they agree, reads and renders each split's rows (``data``), and tokenizes them, loading no
model weights. Every problem (a missing model or dataset, a malformed row, a vocabulary or
rendering mismatch, a top_k above the vocabulary) is one :class:`UsageError`, raised before the
sweep opens its Optuna storage or an MLflow run: nothing is half-written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from kdsweep.data import (
    ChatTemplate,
    RowError,
    Rows,
    TokenizedSplit,
    first_difference,
    load_split,
    read_rows,
    render,
    tokenize,
)
from kdsweep.distill import lora, models
from kdsweep.errors import UsageError
from kdsweep.prepare import demo, model_folders
from kdsweep.progress import SweepProgress
from kdsweep.study import space
from kdsweep.study.config import ModelConfig, StudentConfig, StudyConfig


def locate(
    role: str, spec: ModelConfig, study: StudyConfig, *, teacher: ModelConfig | None = None
) -> ModelConfig:
    """``spec`` named by where it loads from: the demo's models, a GGUF file's and a student
    built from the (located) ``teacher`` are made on first use (``model_folders``), a relative
    folder is read from the study file's folder. A local folder is named by its absolute path,
    which no library mistakes for a hub id (MLflow looks hub ids up for their model card when it
    saves a model)."""
    if isinstance(spec, StudentConfig) and spec.built_from_teacher:
        folder = model_folders.student_from_teacher(teacher, spec.from_teacher.layers)
        return dataclasses.replace(spec, name=str(folder))
    if spec.name.startswith(demo.PREFIX):
        return dataclasses.replace(spec, name=demo.location(spec.name))
    located = dataclasses.replace(spec, name=study.resolve_path(spec.name))
    if spec.gguf_file is None:
        return located
    folder = model_folders.from_gguf(role, located)
    return dataclasses.replace(located, name=str(folder), revision=None, gguf_file=None)


@dataclass(frozen=True, kw_only=True)
class Inputs:
    """What a study's trials read, checked: its models (named by where they load from), device,
    tokenizer, vocabulary and tokenized splits. No model weights are loaded to make it."""

    teacher: ModelConfig  # located
    student: ModelConfig
    device: torch.device
    tokenizer: PreTrainedTokenizerBase  # the student's: it renders and tokenizes the data
    vocab: models.Vocabulary
    train_split: TokenizedSplit
    eval_split: TokenizedSplit  # the validation split
    test_split: TokenizedSplit | None = None  # data.test_split, for the finalists


AGREEMENT_ROWS = 64  # rows of each split that teacher and student must render and tokenize alike


def read_inputs(
    study: StudyConfig, progress: SweepProgress, *, first_rows: int | None = None
) -> Inputs:
    """What the trials read, checked (``first_rows``: only each split's first rows, as
    ``kdsweep check`` reads them)."""
    device = models.resolve_device(study.train.device)
    models.check_attention(study.train.attn_implementation, device)
    teacher = locate("teacher", study.teacher, study)
    student = locate("student", study.student, study, teacher=teacher)
    progress.message(f"loading tokenizer and data for {study.name!r} on {device}")
    tokenizer = models.load_tokenizer("student", student)
    teacher_tokenizer = models.load_tokenizer("teacher", teacher)
    models.check_same_vocabulary(tokenizer, teacher_tokenizer)
    vocab = models.check_vocabularies(teacher, student, tokenizer)
    _check_top_k(study, vocab)
    if space.may_be_positive(study.search, study.baselines, "lora_rank"):
        lora.check_targets(student, study.student.lora)
    data = study.data
    splits = (data.train_split, data.eval_split) + ((data.test_split,) if data.test_split else ())
    rows = {
        split: _read_rows(study, split, progress, first_rows) for split in dict.fromkeys(splits)
    }
    chat = _chat_template(study, rows, tokenizer)
    _check_teacher_tokens(study, rows, tokenizer, teacher_tokenizer, chat)
    # The train rows' prompts are read by on-policy steps only; the eval rows' by accuracy.
    train_split = _tokenized(
        study,
        rows[data.train_split],
        tokenizer,
        chat,
        progress,
        with_prompts=study.on_policy_possible,
    )
    eval_split, test_split = (
        _tokenized(study, rows[split], tokenizer, chat, progress, with_prompts=study.eval.accuracy)
        if split
        else None
        for split in (data.eval_split, data.test_split)
    )
    return Inputs(
        teacher=teacher,
        student=student,
        device=device,
        tokenizer=tokenizer,
        vocab=vocab,
        train_split=train_split,
        eval_split=eval_split,
        test_split=test_split,
    )


def _read_rows(
    study: StudyConfig, split: str, progress: SweepProgress, first_rows: int | None
) -> Rows:
    dataset = load_split(study.data, split, base_dir=study.base_dir)
    if first_rows is not None:
        dataset = dataset.select(range(min(first_rows, len(dataset))))
    rows = read_rows(dataset, study.data, split=split)
    if rows.skipped:
        progress.message(
            f"data: left out {rows.skipped} conversations of {split!r} that have no assistant turn"
        )
    return rows


def _chat_template(study: StudyConfig, rows: dict[str, Rows], tokenizer) -> ChatTemplate | None:
    """The template conversations are rendered with (None for text rows). The splits must share a
    format. A study's own template goes with the student's tokenizer, so a saved student has it."""
    formats = {split: r.format for split, r in rows.items()}
    if len(set(formats.values())) > 1:
        shown = ", ".join(f"{split!r} as {fmt}" for split, fmt in formats.items())
        raise UsageError(
            f"data.format: the splits read as different formats ({shown}); give them the same "
            "columns, or set data.format"
        )
    if not next(iter(rows.values())).conversational:
        return None
    chat = ChatTemplate.of(tokenizer, study.data, base_dir=study.base_dir)
    if study.data.chat_template:
        tokenizer.chat_template = chat.template
    return chat


def _check_teacher_tokens(
    study: StudyConfig,
    rows: dict[str, Rows],
    tokenizer,
    teacher_tokenizer,
    chat: ChatTemplate | None,
) -> None:
    """Teacher and student must see the same tokens: render and tokenize the first rows of each
    split with both (each with its own chat template, unless the study gives one) and compare."""
    teacher_chat = None
    if chat is not None:
        own = None if study.data.chat_template else teacher_tokenizer.chat_template
        teacher_chat = ChatTemplate(
            teacher_tokenizer,
            own or chat.template,
            study.data.chat_template_kwargs,
            reasoning=study.data.reasoning,
        )
    special = chat is None  # a chat template writes its own special tokens
    for split_rows in rows.values():
        sample = split_rows.rows[:AGREEMENT_ROWS]
        try:
            texts = [
                [r.text for r in render(sample, t, chat=c)]
                for t, c in ((tokenizer, chat), (teacher_tokenizer, teacher_chat))
            ]
        except RowError as exc:
            raise split_rows.error(exc) from None
        ours, theirs = (
            t(x, add_special_tokens=special)["input_ids"]
            for t, x in zip((tokenizer, teacher_tokenizer), texts)
        )
        for row, (a, b) in enumerate(zip(ours, theirs)):
            if (position := first_difference(a, b)) is not None:
                student_has, teacher_has = (
                    _token_at(tokenizer, a, position),
                    _token_at(teacher_tokenizer, b, position),
                )
                raise split_rows.error(
                    RowError(
                        row,
                        "tokens",
                        f"teacher and student tokenize it differently from token {position} on "
                        f"(the student has {student_has}, "
                        f"the teacher {teacher_has}); distill between models that share one "
                        "tokenizer and chat template, "
                        "or set data.chat_template to render for both",
                    )
                )


def _token_at(tokenizer, ids: list[int], position: int) -> str:
    if position >= len(ids):
        return "nothing: its tokens end there"
    return f"{tokenizer.decode([ids[position]])!r} (id {ids[position]})"


def _check_top_k(study: StudyConfig, vocab: models.Vocabulary) -> None:
    """A top_k above the vocabulary keeps nothing more than the whole of it: a typo, or the
    wrong models. Known only once the vocabulary is read, so not a study-file check."""
    where = [("search.top_k", k) for k in study.search.top_k.values]
    where += [
        (f"baselines[{i}].top_k", b["top_k"])
        for i, b in enumerate(study.baselines)
        if "top_k" in b
    ]
    for key, k in where:
        if k != space.WHOLE_VOCAB and k > vocab.size:
            raise UsageError(
                f"{key}: {k} is above the vocabulary size ({vocab.size:,} tokens); use values up "
                f"to {vocab.size:,}, "
                f"or {space.WHOLE_VOCAB!r} for the whole vocabulary"
            )


def _tokenized(
    study: StudyConfig,
    rows: Rows,
    tokenizer,
    chat: ChatTemplate | None,
    progress: SweepProgress,
    *,
    with_prompts: bool,
) -> TokenizedSplit:
    data = study.data
    try:
        tokens = tokenize(
            rows.rows,
            tokenizer,
            max_length=data.max_length,
            assistant_only=data.assistant_only,
            chat=chat,
            with_prompts=with_prompts,
        )
    except RowError as exc:
        raise rows.error(exc) from None
    split = rows.place.split
    if len(tokens) == 0:
        raise UsageError(
            f"{rows.place.key}: no row of {split!r} of {data.dataset} has a scored token within "
            "data.max_length "
            f"({data.max_length}); check data.format, data.assistant_only and data.max_length"
        )
    if tokens.dropped:
        progress.message(
            f"data: {tokens.dropped} rows of {split!r} have no scored token within "
            "data.max_length and are left out"
        )
    if tokens.counts.left_out:
        progress.message(
            f"data: the chat template leaves out the reasoning of {tokens.counts.left_out} of "
            f"the {tokens.counts.reasoned} answers of {split!r} that have some (earlier turns); "
            "they are trained without it (data.each_turn_as_last: true trains each with its own)"
        )
    return tokens


def check_inputs(study: StudyConfig) -> None:
    """Read and check what a trial needs, loading no weights: the models' tokenizer and
    vocabularies, the data splits (the demo's models are built on first use)."""
    progress = SweepProgress()
    try:
        read_inputs(study, progress)
    finally:
        progress.close()
