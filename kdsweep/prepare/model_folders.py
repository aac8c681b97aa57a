"""Models a study names by how they are made, made once into plain folders in the cache: a GGUF
file dequantized, and a student built from its teacher's layers.

Every worker and trial then loads a plain folder, as it would a model the user saved. A folder is
named by a digest of what it is made from (``built_from.json`` beside the weights says what), so
a changed source makes a new one; builders racing to make it wait on a lock, and the folder
appears whole, by an atomic rename (as the demo's models do).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from filelock import FileLock
from huggingface_hub.utils import HFValidationError, validate_repo_id
from rich.console import Console
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import cached_file

from kdsweep.distill.models import missing_model
from kdsweep.errors import UsageError, first_line
from kdsweep.paths import atomic_folder, cache_dir, remove_stale_staging
from kdsweep.prepare.teacher_cache import model_digest
from kdsweep.study.config import ModelConfig

BUILD_VERSION = 1  # bump when what a folder holds changes: it is part of every folder's key
_EDGE_BYTES = 4 * 2**20  # a file is known by its size and this much of each end


def models_dir() -> Path:
    return cache_dir() / "models"


# ---------------------------------------------------------------------------------------------
# A GGUF file


def from_gguf(role: str, spec: ModelConfig) -> Path:
    """The plain folder that ``spec``'s GGUF file makes (``spec.name`` located: a folder, or a
    hub repo), built on first use."""
    key = {"gguf": _file_digest(_gguf_path(role, spec)), "version": BUILD_VERSION}
    what = f"the {role} from {spec.gguf_file} (dequantized)"
    return _built_once("gguf", key, partial(_write_dequantized, role, spec), what=what)


def _gguf_path(role: str, spec: ModelConfig) -> Path:
    try:
        if Path(spec.name).is_dir():
            path = Path(spec.name) / spec.gguf_file
            if not path.is_file():
                raise FileNotFoundError(f"no file {path}")
            return path
        validate_repo_id(spec.name)
        return Path(cached_file(spec.name, spec.gguf_file, revision=spec.revision))
    except HFValidationError as exc:
        raise missing_model(role, spec.name, exc) from exc
    except OSError as exc:
        raise UsageError(
            f"cannot read the {role}'s GGUF file {spec.gguf_file!r} from {spec.name}: "
            f"{first_line(exc)}; set {role}.gguf_file to a file in {role}.name"
        ) from exc


def _write_dequantized(role: str, spec: ModelConfig, folder: Path) -> None:
    """transformers reads the GGUF file into plain fp32 tensors (its legacy GGUF loader
    dequantizes every weight); it then keeps a quantizer on the model whose ``is_serializable``
    is False, so ``save_pretrained`` refuses it (transformers 5.25). Removing the quantizer
    leaves a plain model, which saves and reloads with no difference in its logits."""
    location = {"revision": spec.revision, "gguf_file": spec.gguf_file}
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.name, **location)
        model = AutoModelForCausalLM.from_pretrained(spec.name, dtype=torch.float32, **location)
    except (OSError, ValueError) as exc:  # a file that is not GGUF, an unknown architecture
        raise UsageError(
            f"cannot load the {role} from its GGUF file {spec.gguf_file!r}: {first_line(exc)}; "
            f"set {role}.gguf_file to a GGUF file of a causal LM transformers reads"
        ) from exc
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _file_digest(path: Path) -> str:
    """A file by its size and both its ends: what changes when a model file does, read in
    milliseconds whatever its size."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(_EDGE_BYTES))
        handle.seek(max(0, size - _EDGE_BYTES), os.SEEK_SET)
        digest.update(handle.read())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# A student from its teacher's layers


def student_from_teacher(teacher: ModelConfig, layers: tuple[int, ...]) -> Path:
    """The folder of a student built from the (located) ``teacher``: its embeddings, final norm
    and output layer, and the decoder ``layers``, in order; built on first use, rebuilt when the
    teacher changes. The layers are checked against the teacher's config, before any weights
    load."""
    config = AutoConfig.from_pretrained(teacher.name, revision=teacher.revision)
    count = config.get_text_config().num_hidden_layers
    if max(layers) >= count:
        raise UsageError(
            f"student.from_teacher.layers: the teacher has {count} layers (0 to {count - 1}), "
            f"not {max(layers)}; list layers it has"
        )
    key = {
        "teacher": model_digest(teacher.name, teacher.revision),
        "layers": list(layers),
        "version": BUILD_VERSION,
    }
    what = f"the student from the teacher's layers {', '.join(map(str, layers))}"
    return _built_once("student", key, partial(_write_student, teacher, layers), what=what)


def _write_student(teacher: ModelConfig, layers: tuple[int, ...], folder: Path) -> None:
    """The teacher, in its own dtype, with the decoder layers ``layers`` alone, renumbered
    from 0; its tokenizer beside it."""
    model = AutoModelForCausalLM.from_pretrained(teacher.name, revision=teacher.revision)
    student = AutoModelForCausalLM.from_config(_config_with(model, layers), dtype=model.dtype)
    student.load_state_dict(_kept_layers(model, layers))
    student.generation_config = model.generation_config
    student.save_pretrained(folder)
    AutoTokenizer.from_pretrained(teacher.name, revision=teacher.revision).save_pretrained(folder)


def _config_with(model: PreTrainedModel, layers: tuple[int, ...]):
    """The model's config with ``layers`` alone: their count, and each one's attention type
    (``layer_types``, where the config lists it: sliding-window layers stay sliding)."""
    config = copy.deepcopy(model.config)
    text = config.get_text_config()
    if getattr(text, "layer_types", None):
        text.layer_types = [text.layer_types[i] for i in layers]
    text.num_hidden_layers = len(layers)
    return config


def _kept_layers(model: PreTrainedModel, layers: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The model's state dict with the decoder layers ``layers`` alone, renumbered from 0; every
    weight outside the decoder's layers (embeddings, norm, output layer) as it is."""
    decoder_layers = model.get_decoder().layers
    prefix = next(n for n, m in model.named_modules() if m is decoder_layers) + "."
    renumbered = {old: str(new) for new, old in enumerate(layers)}
    kept = {}
    for name, tensor in model.state_dict().items():
        if not name.startswith(prefix):
            kept[name] = tensor
            continue
        index, rest = name.removeprefix(prefix).split(".", 1)
        if int(index) in renumbered:
            kept[f"{prefix}{renumbered[int(index)]}.{rest}"] = tensor
    return kept


# ---------------------------------------------------------------------------------------------
# Building once


def _built_once(kind: str, key: dict, write: Callable[[Path], None], *, what: str) -> Path:
    """The folder ``write`` fills, for ``key``: found, or built once by whichever process gets
    there first while the others wait."""
    text = json.dumps(key, sort_keys=True)
    folder = models_dir() / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(folder.parent / f".{folder.name}.lock"):
        if not (folder / "config.json").exists():
            remove_stale_staging(folder.parent, folder.name)
            Console(stderr=True, soft_wrap=True, highlight=False).print(
                f"building {what} in {folder}: once, then cached"
            )
            with atomic_folder(folder) as staging:
                write(staging)
                (staging / "built_from.json").write_text(text + "\n")
    return folder
