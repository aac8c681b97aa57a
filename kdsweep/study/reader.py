"""Reading a study file: its YAML and ``--set key.path=value`` overrides, checked by
:mod:`kdsweep.study.checks`.

A study file is loaded, overridden and validated before any model loads. Every problem is
collected and raised at once as a :class:`StudyError`, one line per problem naming the file and
the key path. This module imports neither torch nor transformers.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import yaml

from kdsweep.errors import StudyError
from kdsweep.study.checks import problems_of
from kdsweep.study.config import StudyConfig
from kdsweep.study.space import Param

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
    problems += problems_of(study)
    if problems:
        raise StudyError([f"{where}: {p}" for p in problems])
    return study


def study_as_stored(stored: dict, file: StudyConfig) -> StudyConfig:
    """The study a run recorded (``StudyConfig.to_dict``: passwords masked), read back. Where to
    find things comes from the study file as it reads now: its folder, its stores (the recorded
    URLs lost their passwords), its name."""
    raw = {
        **stored,
        "name": file.name,
        "storage": file.storage,
        "base_dir": file.base_dir,
        "source": file.source,
    }
    raw["tracking"] = {**stored.get("tracking", {}), "uri": file.tracking.uri}
    return _build(StudyConfig, raw, "", [])  # it was checked when it ran


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
