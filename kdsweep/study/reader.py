"""Reading a study file: its YAML, ``--set key.path=value`` overrides, and every check.

A study file is loaded, overridden and validated before any model loads. Every problem is
collected and raised at once as a :class:`StudyError`, one line per problem naming the file and
the key path. This module imports neither torch nor transformers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import jinja2
import yaml

from kdsweep.errors import StudyError
from kdsweep.study.config import (
    ALL_LINEAR,
    ATTENTIONS,
    DATA_FORMATS,
    DTYPES,
    PRECISIONS,
    PRUNERS,
    SAMPLERS,
    SELECTIONS,
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
from kdsweep.study.space import Param, may_be_positive, search_problems

_INVALID = object()  # what a value of the wrong type becomes while the file is read


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` as a string; learning rates are written that way, so read it as a
    float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def load_study(path: str | Path, overrides: list[str] = ()) -> StudyConfig:
    """Read, override and validate a study file; raise StudyError listing every problem."""
    path = Path(path)
    where = str(path)
    try:
        raw = _parse(path.read_text())
    except FileNotFoundError:
        raise StudyError([f"{where}: no such study file"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark else ""
        raise StudyError(
            [f"{where}{line}: not valid YAML: {getattr(exc, 'problem', exc)}"]
        ) from None
    if raw is None:
        raise StudyError([f"{where}: is empty; write a study in it (see studies/demo.yaml)"])
    if not isinstance(raw, dict):
        raise StudyError([f"{where}: must be a mapping of keys, got {type(raw).__name__}"])
    problems: list[str] = []
    for item in overrides:
        _apply_override(raw, item, problems)
    raw["base_dir"] = str(path.parent)
    raw["source"] = str(path)
    study = _build(StudyConfig, raw, "", problems)
    problems += validate(study)
    if problems:
        raise StudyError([f"{where}: {p}" for p in problems])
    return study


def _apply_override(raw: dict, item: str, problems: list[str]) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        problems.append(f"--set {item}: expected key.path=value")
        return
    problem = set_key_path(raw, key, _parse(text) if text else None)
    if problem:
        problems.append(problem)


def set_key_path(raw: dict, key: str, value: Any) -> str | None:
    """Set the entry of nested mappings at a dotted key path; the problem if a step is no
    mapping."""
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return f"--set {key}: {part} is not a mapping"
    node[leaf] = value
    return None


def _build(cls: type, raw: Any, where: str, problems: list[str]) -> Any:
    """Turn a YAML mapping into the dataclass ``cls``, noting every mismatch in ``problems``."""
    if cls is Param:
        return _build_param(raw, where, problems)
    if not isinstance(raw, dict):
        problems.append(f"{where or 'study'}: must be a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            internal = {f.name for f in dataclasses.fields(cls) if f.metadata.get("internal")}
            allowed = ", ".join(sorted(known - internal))
            problems.append(f"{_join(where, key)}: unknown key (allowed: {allowed})")
    values = {}
    for name in known & raw.keys():
        value = _coerce(hints[name], raw[name], _join(where, name), problems)
        if value is not _INVALID:  # an invalid value keeps the default, so validation can go on
            values[name] = value
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str, problems: list[str]) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where, problems)
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        problems.append(f"{where}: must be set")
        return _INVALID
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if typing.get_origin(option) is tuple and isinstance(value, list):
            return tuple(value)
        if option is dict and isinstance(value, dict):
            return value
    names = " or ".join(_type_name(o) for o in options if o is not type(None))
    problems.append(f"{where}: must be {names}, got {value!r}")
    return _INVALID


def _build_param(raw: Any, where: str, problems: list[str]) -> Param:
    if isinstance(raw, (int, float, str)) and not isinstance(raw, bool):
        return Param(value=raw)
    if isinstance(raw, list):
        return Param(choices=tuple(raw))
    if not isinstance(raw, dict):
        problems.append(
            f"{where}: must be a number, a list of choices or {{low, high}}, got {raw!r}"
        )
        return Param()
    param = _build(_ParamFields, raw, where, problems)
    values = {f.name: getattr(param, f.name) for f in dataclasses.fields(_ParamFields)}
    return Param(**values)


@dataclass(frozen=True)
class _ParamFields:
    value: float | str | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None


def validate(study: StudyConfig) -> list[str]:
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
    return problems


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


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return "a list"
    return {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        dict: "a mapping",
    }.get(hint, str(hint))
