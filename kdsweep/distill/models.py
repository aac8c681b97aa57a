"""Loading the teacher and the student, choosing device and dtype, checking their vocabularies.

Models are named by where they load from: a hub id or a local folder (``ModelConfig.name``
already located by ``prepare.inputs``, which also builds the demo's models).
"""

from __future__ import annotations

import gc
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import is_flash_attn_2_available

from kdsweep.compat.torch import cpu_has_amx
from kdsweep.distill.lora import effective_output_weight
from kdsweep.errors import UsageError, first_line
from kdsweep.study.config import ModelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = "tokenizer*"  # tokenizer.json, tokenizer_config.json, tokenizer.model


def release_memory(device: torch.device) -> None:
    """Give freed tensors' memory back: models just dropped would otherwise stay in the CUDA
    allocator's cache, out of reach of the next trial."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"train.device is {name!r} but no CUDA GPU is visible; set train.device: auto or cpu"
        )
    return device


def device_uuid(device: torch.device) -> str | None:
    """A GPU's UUID, which names it the same way for CUDA and NVML; None on the CPU."""
    if device.type != "cuda":
        return None
    return str(torch.cuda.get_device_properties(device).uuid)


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 computes faster than fp32 on ``device``, what ``auto`` precision and dtypes
    ask: a GPU that supports it (Ampere and later), or a CPU with AMX units. A CPU without them
    converts bf16 and multiplies in fp32 (AVX2: 8 times slower; AVX-512's bf16 dot products
    alone, as on AMD Zen 4: unmeasured, so fp32 there too)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_amx()


def resolve_dtype(name: str, device: torch.device, *, frozen: bool) -> torch.dtype:
    """Weights dtype. "auto": a frozen teacher in bf16 where bf16 is fast; a trained student in
    fp32 (autocast provides the bf16 math while the optimizer keeps fp32 master weights)."""
    if name == "auto":
        return torch.bfloat16 if frozen and fast_bf16(device) else torch.float32
    return _DTYPES[name]


def load_tokenizer(role: str, spec: ModelConfig) -> PreTrainedTokenizerBase:
    """A model's tokenizer. The student's renders and tokenizes the data; the teacher's must agree
    with it (``check_same_vocabulary``, and the rows themselves: ``prepare.inputs``)."""
    folder = Path(spec.name)
    if folder.is_dir() and not any(folder.glob(_TOKENIZER_FILES)):
        # transformers would make an empty tokenizer of the model's type instead.
        raise UsageError(
            f"cannot load the {role}'s tokenizer: {folder} has no tokenizer files "
            "(tokenizer.json, tokenizer_config.json); "
            "save the tokenizer beside the model (tokenizer.save_pretrained)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.name, revision=spec.revision)
    except (OSError, ValueError) as exc:
        raise missing_model(role, spec.name, exc) from exc
    if tokenizer.pad_token_id is None:
        # Padding is masked by the attention mask, never by id, so any id does as the pad.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_same_vocabulary(
    student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase
) -> None:
    """Every id the student's tokenizer knows must mean the same token to the teacher's: the
    teacher's logits are read by the student's ids. (The rows are compared too, once rendered:
    the same vocabulary can still split text differently.)"""
    theirs = teacher.get_vocab()
    for token, index in sorted(student.get_vocab().items(), key=lambda item: item[1]):
        if theirs.get(token) != index:
            other = teacher.convert_ids_to_tokens(index) if index < len(teacher) else None
            raise UsageError(
                f"teacher and student tokenizers differ: id {index} is {token!r} for the student "
                "but "
                f"{'missing' if other is None else repr(other)} for the teacher "
                f"({len(student):,} and {len(teacher):,} tokens); "
                "distill between models that share one tokenizer (the same family)"
            )


def load_model(
    role: str, spec: ModelConfig, device: torch.device, *, attention: str | None = None
) -> PreTrainedModel:
    """Load the teacher (frozen, eval mode) or a fresh student, on ``device``, with the attention
    implementation ``attention`` (None: transformers' default, sdpa where the model has it)."""
    dtype = resolve_dtype(spec.dtype, device, frozen=role == "teacher")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            spec.name, revision=spec.revision, dtype=dtype, attn_implementation=attention
        )
    except (OSError, ValueError) as exc:
        raise missing_model(role, spec.name, exc) from exc
    model.to(device)
    if role == "teacher":
        model.eval().requires_grad_(False)
    return model


def check_attention(attention: str, device: torch.device) -> None:
    """Raise UsageError unless ``attention`` runs here: flash_attention_2 needs the flash-attn
    package and a CUDA GPU (which transformers checks only as the weights load)."""
    if attention != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        reason = "flash-attn is not installed (pip install flash-attn --no-build-isolation)"
    elif device.type != "cuda" or not is_flash_attn_2_available():
        reason = f"it runs with flash-attn 2.3.3 or later on a CUDA GPU, not on {device}"
    else:
        return
    raise UsageError(
        f"train.attn_implementation: {reason}; set train.attn_implementation: sdpa (torch's own)"
    )


def checkpoint_activations(model: PreTrainedModel) -> None:
    """Have ``model``'s decoder layers recompute their activations in the backward pass instead
    of keeping them (transformers' gradient checkpointing, non-reentrant, which needs no input
    that requires a gradient). Only in train mode: evaluation and generation run as before."""
    # transformers 5.25 renamed it; the old name warns there, and is all 5.0 has.
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)({"use_reentrant": False})


@dataclass(frozen=True)
class Vocabulary:
    """The ids both models score: the tokenizer's, when the embeddings only add padding rows."""

    size: int
    teacher_rows: int
    student_rows: int

    @property
    def padded(self) -> bool:
        return self.teacher_rows != self.size or self.student_rows != self.size


def shared_vocabulary(
    tokenizer: PreTrainedTokenizerBase, teacher_rows: int, student_rows: int
) -> Vocabulary:
    """Check that teacher and student can be compared token by token.

    Qwen3-4B and Qwen3-0.6B both pad their 151,669 tokens to 151,936 embedding rows (Qwen2.5-0.5B
    and 7B pad theirs to 151,936 and 152,064); the padding rows are never targets, so scoring on
    the tokenizer's ids loses nothing.
    """
    size = len(tokenizer)
    for role, rows in (("teacher", teacher_rows), ("student", student_rows)):
        if rows < size:
            raise UsageError(
                f"the {role} has {rows} embedding rows but the student's tokenizer has {size} "
                "tokens: "
                "teacher and student must share one tokenizer; pick models of the same family"
            )
    return Vocabulary(size=size, teacher_rows=teacher_rows, student_rows=student_rows)


def embedding_rows(location: str, revision: str | None) -> int:
    """The vocabulary size from the config alone, so a mismatch shows before any weights load."""
    config = AutoConfig.from_pretrained(location, revision=revision)
    return getattr(config, "vocab_size", None) or config.get_text_config().vocab_size


def check_vocabularies(
    teacher: ModelConfig, student: ModelConfig, tokenizer: PreTrainedTokenizerBase
) -> Vocabulary:
    rows = {}
    for role, spec in (("teacher", teacher), ("student", student)):
        try:
            rows[role] = embedding_rows(spec.name, spec.revision)
        except (OSError, ValueError) as exc:
            raise missing_model(role, spec.name, exc) from exc
    return shared_vocabulary(tokenizer, rows["teacher"], rows["student"])


def missing_model(role: str, location: str, exc: Exception) -> UsageError:
    """The one line for a model that cannot be read from ``location``, naming the fix."""
    fix = f"set {role}.name to a model folder or a reachable hub id"
    if not Path(location).expanduser().exists():
        if location.startswith(("/", ".", "~")):
            return UsageError(f"cannot load the {role}: no folder {location}; {fix}")
        if not _is_repo_id(location):
            return UsageError(
                f"cannot load the {role}: no folder {location}, and not a hub repo id "
                f"(namespace/name); {fix}"
            )
    reason = first_line(exc)
    return UsageError(f"cannot load the {role} from {location!r}: {reason}; {fix}")


def _is_repo_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hidden_states(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The last hidden states ``[B, S, H]``: the losses apply the output layer chunk by chunk,
    so the ``[B, S, V]`` logits are never built."""
    # No KV cache: nothing generates here (and gradient checkpointing would refuse one).
    return model.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state


def output_weight(model: PreTrainedModel, vocab: Vocabulary) -> torch.Tensor:
    """The output embedding ``[V, H]`` restricted to the shared ids (with a LoRA adapter's update
    when one is on it)."""
    return effective_output_weight(model.get_output_embeddings())[: vocab.size]
