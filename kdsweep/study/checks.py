"""Every check of an assembled study, before any model loads: each problem a line naming its
key path and, where there is one, the fix. This module imports neither torch nor transformers.
"""

from __future__ import annotations

import importlib.util
import re

import jinja2

from kdsweep.study.config import (
    ALL_LINEAR,
    ATTENTIONS,
    BOXED_ANSWER,
    DATA_FORMATS,
    DTYPES,
    GSM8K_ANSWER,
    PRECISIONS,
    PRUNERS,
    REASONING,
    SAMPLERS,
    SELECTIONS,
    WHOLE_ANSWER,
    ModelConfig,
    StudyConfig,
    TrainConfig,
    read_chat_template,
)
from kdsweep.study.measures import (
    ACCURACY_MEASURES,
    CONSTRAINABLE,
    OBJECTIVES,
    QUALITY_MEASURES,
)
from kdsweep.study.space import may_be_positive, search_problems


def problems_of(study: StudyConfig) -> list[str]:
    """Every problem with an assembled study, as 'key.path: what is wrong' lines."""
    problems: list[str] = []

    def need(ok: bool, where: str, message: str) -> None:
        if not ok:
            problems.append(f"{where}: {message}")

    need(bool(study.name), "name", "must be set (it names the Optuna study and MLflow experiment)")
    problems += _validate_objectives(study)
    need(study.n_trials >= 1, "n_trials", f"must be >= 1, got {study.n_trials}")
    need(
        study.sampler.name in SAMPLERS,
        "sampler.name",
        f"must be one of {', '.join(SAMPLERS)}, got {study.sampler.name!r}",
    )
    need(
        study.pruner.name in PRUNERS,
        "pruner.name",
        f"must be one of {', '.join(PRUNERS)}, got {study.pruner.name!r}",
    )
    need(study.report_top_n >= 1, "report_top_n", f"must be >= 1, got {study.report_top_n}")
    problems += _validate_models(study)
    need(
        bool(study.data.dataset),
        "data.dataset",
        "must be set (a hub id, or a local file or folder)",
    )
    need(
        study.data.max_length >= 2, "data.max_length", f"must be >= 2, got {study.data.max_length}"
    )
    problems += _validate_data(study)
    problems += _validate_lora(study)
    problems += _validate_train(study.train)
    problems += _validate_eval(study)
    problems += search_problems(study.search, study.baselines, sampler=study.sampler.name)
    need(study.seed_check.top >= 0, "seed_check.top", f"must be >= 0, got {study.seed_check.top}")
    need(
        study.seed_check.seeds >= 1,
        "seed_check.seeds",
        f"must be >= 1, got {study.seed_check.seeds}",
    )
    need(
        study.register_as is None or study.save_best,
        "register_as",
        "needs save_best: true (the model it registers)",
    )
    need(study.register_as != "", "register_as", "must be a model name, or left out")
    need(
        study.max_consecutive_failures >= 1,
        "max_consecutive_failures",
        f"must be >= 1, got {study.max_consecutive_failures}",
    )
    need(
        study.tracking.system_metrics_interval > 0,
        "tracking.system_metrics_interval",
        f"must be > 0 seconds, got {study.tracking.system_metrics_interval}",
    )
    return problems


def _validate_models(study: StudyConfig) -> list[str]:
    """Each model named once (the student by a name, or built from the teacher's layers), its
    dtype, and gguf when a GGUF file is to be read (a layer above the teacher's count is found
    once its config is read: ``prepare.inputs``)."""
    problems = []
    for role in ("teacher", "student"):
        model: ModelConfig = getattr(study, role)
        built = role == "student" and study.student.built_from_teacher
        if not model.name and not built:
            also = ", or student.from_teacher.layers" if role == "student" else ""
            problems.append(
                f"{role}.name: must be set (a hub id, a local folder or demo:{role}{also})"
            )
        if model.dtype not in DTYPES:
            dtypes = ", ".join(DTYPES)
            problems.append(f"{role}.dtype: must be one of {dtypes}, got {model.dtype!r}")
        if model.gguf_file is not None and importlib.util.find_spec("gguf") is None:
            problems.append(
                f"{role}.gguf_file: transformers reads a GGUF file with the gguf package (not "
                "installed): pip install gguf"
            )
    student = study.student
    if not student.built_from_teacher:
        return problems
    for key in ("name", "revision", "gguf_file"):
        if getattr(student, key):
            problems.append(
                f"student.{key}: leave it out with student.from_teacher: the student is built "
                "from the teacher's layers"
            )
    layers = student.from_teacher.layers
    in_order = all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
    if not (in_order and list(layers) == sorted(set(layers))):
        problems.append(
            "student.from_teacher.layers: must list the teacher's layers to keep, counted from "
            f"0, in increasing order, each once, e.g. [0, 6, 12, 18, 24, 29]; got {list(layers)}"
        )
    return problems


def _validate_data(study: StudyConfig) -> list[str]:
    data = study.data
    for other in ("train_split", "eval_split"):
        if data.test_split is not None and data.test_split == getattr(data, other):
            return [
                f"data.test_split: {data.test_split!r} is also data.{other}: the verdict would be "
                "measured on rows the sweep trained or selected on; give it rows of its own"
            ]
    if data.format not in DATA_FORMATS:
        return [f"data.format: must be one of {', '.join(DATA_FORMATS)}, got {data.format!r}"]
    if data.reasoning not in REASONING:
        return [
            f"data.reasoning: must be {' or '.join(REASONING)} (train on an assistant turn's "
            f"reasoning, or strip it), got {data.reasoning!r}"
        ]
    if data.chat_template is None:
        return []
    try:
        template = read_chat_template(data.chat_template, study.base_dir)
    except OSError as exc:
        return [
            f"data.chat_template: no such file {data.chat_template!r} ({exc.strerror or exc}); "
            "give a Jinja template "
            "inline (it holds {{ or {%) or the path of a file holding one (relative to the study "
            "file)"
        ]
    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as exc:
        return [
            f"data.chat_template: not a valid Jinja template (line {exc.lineno}: {exc.message}); "
            "fix it"
        ]
    return []


def _validate_objectives(study: StudyConfig) -> list[str]:
    """The objectives: known measures, each once, the first a quality one; a multi-objective
    study unpruned; accuracy decoded when it is asked for; constraints on known measures."""
    names = study.objectives
    if not names:
        return ["objective: must name at least one measure, e.g. student_ppl"]
    problems = [
        f"objective: unknown measure {name!r}; use one of {', '.join(OBJECTIVES)}"
        for name in names
        if not (isinstance(name, str) and name in OBJECTIVES)
    ]
    if problems:
        return problems + _validate_constraints(study)
    if len(set(names)) < len(names):
        problems.append(f"objective: lists a measure twice ({', '.join(names)}); name each once")
    if names[0] not in QUALITY_MEASURES:
        problems.append(
            "objective: the first objective chooses each trial's checkpoint and decides the "
            f"verdict, so it must be a quality measure ({', '.join(QUALITY_MEASURES)}), not "
            f"{names[0]}; list the cost measures after it"
        )
    if len(names) > 1 and study.pruner.name != "none":
        problems.append(
            f"pruner.name: Optuna prunes on one value, and this study has {len(names)} "
            f"objectives; set pruner.name: none (or keep one objective)"
        )
    for name in names:
        if name in ACCURACY_MEASURES and not study.eval.accuracy:
            problems.append(
                f"objective: {name} needs the answers decoded: set eval.accuracy: true"
            )
    return problems + _validate_constraints(study)


def _validate_constraints(study: StudyConfig) -> list[str]:
    problems = []
    for name, ceiling in study.constraints.items():
        where = f"constraints.{name}"
        if name not in CONSTRAINABLE:
            problems.append(
                f"{where}: not a measure a ceiling applies to; use one of "
                f"{', '.join(CONSTRAINABLE)} (each better lower)"
            )
        elif isinstance(ceiling, bool) or not isinstance(ceiling, (int, float)):
            problems.append(f"{where}: the ceiling must be a number, got {ceiling!r}")
        elif ceiling < 0:
            problems.append(
                f"{where}: the ceiling must be >= 0 (no trial measures below 0), got {ceiling}"
            )
    return problems


def _validate_lora(study: StudyConfig) -> list[str]:
    """The adapter's settings, and peft when some trial may train one (the student's target
    modules are checked against its layers once its config is read: ``prepare.inputs``)."""
    lora = study.student.lora
    problems = []
    if lora.alpha <= 0:
        problems.append(f"student.lora.alpha: must be > 0, got {lora.alpha}")
    if not 0 <= lora.dropout < 1:
        problems.append(f"student.lora.dropout: must be in [0, 1), got {lora.dropout}")
    if lora.learning_rate_scale <= 0:
        problems.append(
            f"student.lora.learning_rate_scale: must be > 0, got {lora.learning_rate_scale}"
        )
    targets = lora.target_modules
    if isinstance(targets, str) and targets != ALL_LINEAR:
        problems.append(
            f"student.lora.target_modules: must be {ALL_LINEAR!r} or a list of module names, "
            f"e.g. [q_proj, v_proj], got {targets!r}"
        )
    elif not isinstance(targets, str) and not (
        targets and all(isinstance(t, str) and t for t in targets)
    ):
        problems.append(
            f"student.lora.target_modules: must list module names, e.g. [q_proj, v_proj], got "
            f"{list(targets)!r}"
        )
    lora_asked = may_be_positive(study.search, study.baselines, "lora_rank")
    if lora_asked and importlib.util.find_spec("peft") is None:
        problems.append(
            "search.lora_rank: a rank above 0 trains a LoRA adapter, which needs peft (not "
            'installed): pip install "kdsweep[lora]"'
        )
    return problems


def _validate_eval(study: StudyConfig) -> list[str]:
    problems = []
    for name in ("max_rows", "max_new_tokens", "batch_size"):
        if (value := getattr(study.eval, name)) < 1:
            problems.append(f"eval.{name}: must be >= 1, got {value}")
    return problems + _validate_answer(study.eval.answer)


def _validate_answer(answer: str) -> list[str]:
    """``eval.answer``: a named pattern, or a regular expression with at most one group."""
    if answer in (WHOLE_ANSWER, GSM8K_ANSWER, BOXED_ANSWER):
        return []
    named = f"{WHOLE_ANSWER}, {GSM8K_ANSWER}, {BOXED_ANSWER}"
    try:
        groups = re.compile(answer).groups
    except re.error as exc:
        return [
            f"eval.answer: {answer!r} is neither {named} nor a valid regular expression "
            f"({exc}); fix it"
        ]
    if groups > 1:
        return [
            f"eval.answer: the regular expression {answer!r} has {groups} groups; keep one "
            "around the answer (make the others non-capturing: (?:...))"
        ]
    return []


def _validate_train(train: TrainConfig) -> list[str]:
    problems = []
    for name in (
        "max_steps",
        "batch_size",
        "grad_accum_steps",
        "eval_every",
        "eval_batch_size",
        "log_every",
        "loss_chunk_tokens",
    ):
        value = getattr(train, name)
        if value is not None and value < 1:
            problems.append(f"train.{name}: must be >= 1, got {value}")
    if not 0 <= train.warmup_ratio < 1:
        problems.append(f"train.warmup_ratio: must be in [0, 1), got {train.warmup_ratio}")
    if train.weight_decay < 0:
        problems.append(f"train.weight_decay: must be >= 0, got {train.weight_decay}")
    if train.max_grad_norm <= 0:
        problems.append(f"train.max_grad_norm: must be > 0, got {train.max_grad_norm}")
    if train.checkpoint_every is not None and train.checkpoint_every < 0:
        every = train.checkpoint_every
        problems.append(f"train.checkpoint_every: must be >= 0 (0: no checkpoints), got {every}")
    if train.select not in SELECTIONS:
        problems.append(
            f"train.select: must be one of {', '.join(SELECTIONS)}, got {train.select!r}"
        )
    if train.precision not in PRECISIONS:
        problems.append(
            f"train.precision: must be one of {', '.join(PRECISIONS)}, got {train.precision!r}"
        )
    if train.attn_implementation not in ATTENTIONS:
        problems.append(
            f"train.attn_implementation: must be one of {', '.join(ATTENTIONS)}, got "
            f"{train.attn_implementation!r}"
        )
    if not (train.device in ("auto", "cpu", "cuda") or train.device.startswith("cuda:")):
        problems.append(f"train.device: must be auto, cpu, cuda or cuda:N, got {train.device!r}")
    if train.threads is not None and train.threads < 1:
        problems.append(
            f"train.threads: must be >= 1 (or left out for torch's default), got {train.threads}"
        )
    if train.generation_temperature <= 0:
        problems.append(
            f"train.generation_temperature: must be > 0, got {train.generation_temperature}"
        )
    if train.generation_max_new_tokens < 1:
        problems.append(
            f"train.generation_max_new_tokens: must be >= 1, got {train.generation_max_new_tokens}"
        )
    if 1 <= train.max_steps < train.eval_every:
        problems.append(
            f"train.eval_every: {train.eval_every} is more than train.max_steps "
            f"({train.max_steps}), so a trial would "
            "be evaluated only at its end and could never be pruned; set it to at most max_steps"
        )
    return problems
