"""The argument checks of every entry point, in one place: all problems, reported at once."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kdsweep.losses._teacher import TeacherInputs


@dataclass(frozen=True)
class Options:
    """The settings every entry point takes (see `kdsweep.losses.distill_loss`)."""

    alpha: float
    temperature: float
    beta: float = 0.0
    top_k: int | None = None
    chunk_tokens: int | None = None


def check_arguments(
    student: Tensor,
    weight: Tensor | None,
    labels: Tensor,
    teacher: TeacherInputs,
    options: Options,
) -> None:
    """Raises one ValueError naming every problem with a call's arguments.

    Args:
        student: ``[..., V]`` logits, or ``[..., H]`` hidden states with ``weight`` ``[V, H]``.
        weight: The lm_head weight of the hidden-state form; None in the logits forms.
        labels: ``[...]`` target ids.
        teacher: The teacher's tensors as given.
        options: The settings.
    """
    name = "student_logits" if weight is None else "hidden"
    problems = _options_problems(options) + _student_problems(name, student, labels)
    if weight is not None and (weight.dim() != 2 or weight.shape[-1:] != student.shape[-1:]):
        # Without V the teacher's shapes cannot be checked.
        _raise_if(
            [
                *problems,
                f"weight must be [V, H] with H = hidden.shape[-1], got "
                f"{tuple(weight.shape)} for hidden {tuple(student.shape)}",
            ]
        )
    vocab = student.shape[-1] if weight is None else weight.shape[0]
    problems += _teacher_problems(options, (*student.shape[:-1], vocab), teacher)
    others = {
        "weight": weight,
        "labels": labels,
        **{f"teacher_{key}": value for key, value in vars(teacher).items()},
    }
    problems += [
        f"{key} is on {other.device} but {name} on {student.device}: move it there"
        for key, other in others.items()
        if other is not None and other.device != student.device
    ]
    _raise_if(problems)


def _options_problems(options: Options) -> list[str]:
    problems = []
    if not 0.0 <= options.alpha <= 1.0:
        problems.append(f"alpha must be in [0, 1], got {options.alpha}")
    if not (options.temperature > 0.0 and math.isfinite(options.temperature)):
        problems.append(f"temperature must be a finite number > 0, got {options.temperature}")
    if not 0.0 <= options.beta <= 1.0:
        problems.append(
            f"beta must be in [0, 1] (0: forward KL, 1: reverse KL), got {options.beta}"
        )
    if options.top_k is not None and options.top_k < 1:
        problems.append(f"top_k must be >= 1 or None (whole vocabulary), got {options.top_k}")
    if options.chunk_tokens is not None and options.chunk_tokens < 1:
        problems.append(
            f"chunk_tokens must be >= 1 or None (from a memory budget), got {options.chunk_tokens}"
        )
    return problems


def _student_problems(name: str, student: Tensor, labels: Tensor) -> list[str]:
    problems = []
    if not student.is_floating_point() or student.dim() < 2:
        problems.append(
            f"{name} must be a float tensor [..., D] with at least one position dim, "
            f"got {student.dtype} {tuple(student.shape)}"
        )
    elif student.shape[:-1] != labels.shape:
        problems.append(
            f"labels shape {tuple(labels.shape)} must equal {name}.shape[:-1] = "
            f"{tuple(student.shape[:-1])}"
        )
    if labels.is_floating_point() or labels.is_complex():
        problems.append(f"labels must be integer ids, got {labels.dtype}")
    return problems


def _teacher_problems(
    options: Options, logits_shape: tuple[int, ...], teacher: TeacherInputs
) -> list[str]:
    """Problems with the teacher, given the student's logits shape ``[..., V]``."""
    sparse = teacher.values is not None or teacher.indices is not None
    if teacher.logits is not None and sparse:
        return ["give teacher_logits or teacher_values + teacher_indices, not both"]
    if teacher.logits is None and not sparse:
        return (
            []
            if options.alpha == 0
            else [
                f"alpha = {options.alpha} > 0 needs a teacher: pass its logits or top-K values + "
                "indices, or set alpha = 0 for plain cross-entropy"
            ]
        )
    if teacher.logits is not None:
        if tuple(teacher.logits.shape) != tuple(logits_shape):
            return [
                f"teacher_logits shape {tuple(teacher.logits.shape)} must equal the "
                f"student's logits shape {tuple(logits_shape)}"
            ]
        return []
    return _sparse_teacher_problems(options, logits_shape, teacher)


def _sparse_teacher_problems(
    options: Options, logits_shape: tuple[int, ...], teacher: TeacherInputs
) -> list[str]:
    values, indices = teacher.values, teacher.indices
    if values is None or indices is None:
        return ["teacher_values and teacher_indices go together: give both"]
    problems = []
    if options.top_k is not None:
        problems.append("top_k applies to teacher_logits; a sparse teacher is already its top-K")
    if values.shape != indices.shape or tuple(values.shape[:-1]) != tuple(logits_shape[:-1]):
        problems.append(
            f"teacher_values {tuple(values.shape)} and teacher_indices "
            f"{tuple(indices.shape)} must both be [..., K] with [...] = "
            f"{tuple(logits_shape[:-1])}"
        )
    elif values.shape[-1] < 1:
        problems.append("teacher_values must hold at least one entry per position (K >= 1)")
    if not values.is_floating_point():
        problems.append(f"teacher_values must be floats, got {values.dtype}")
    if indices.dtype not in (torch.int64, torch.int32):
        problems.append(f"teacher_indices must be int64 or int32, got {indices.dtype}")
    return problems


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise ValueError("\n".join(problems))
