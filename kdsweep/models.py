"""Loading the teacher and the student, choosing device and dtype, checking their vocabularies."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kdsweep.config import ModelConfig, StudyConfig
from kdsweep.errors import UsageError

DEMO_PREFIX = "demo:"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"train.device is {name!r} but no CUDA GPU is visible; set train.device: auto or cpu")
    return device


def bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_dtype(name: str, device: torch.device, *, frozen: bool) -> torch.dtype:
    """Weights dtype. "auto": a frozen teacher in bf16 on a bf16 GPU; a trained student in fp32
    (autocast provides the bf16 math while the optimizer keeps fp32 master weights)."""
    if name == "auto":
        return torch.bfloat16 if frozen and bf16_supported(device) else torch.float32
    return _DTYPES[name]


def model_location(spec: ModelConfig, study: StudyConfig) -> str:
    """A hub id or local folder; demo models are built (and the teacher trained) on first use."""
    if spec.name.startswith(DEMO_PREFIX):
        from kdsweep import demo  # heavy: only demo studies pay for it

        return str(demo.ensure_models()[spec.name.removeprefix(DEMO_PREFIX)])
    return study.resolve_path(spec.name)


def load_tokenizer(study: StudyConfig) -> PreTrainedTokenizerBase:
    """The teacher's tokenizer tokenizes everything: its ids are what the teacher's logits index."""
    location = model_location(study.teacher, study)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, revision=study.teacher.revision)
    except (OSError, ValueError) as exc:
        raise _missing("teacher", location, exc) from exc
    if tokenizer.pad_token_id is None:
        # Padding is masked by the attention mask, never by id, so any id does as the pad.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(role: str, study: StudyConfig, device: torch.device) -> PreTrainedModel:
    """Load the teacher (frozen, eval mode) or a fresh student, on ``device``."""
    spec: ModelConfig = getattr(study, role)
    location = model_location(spec, study)
    dtype = resolve_dtype(spec.dtype, device, frozen=role == "teacher")
    try:
        model = AutoModelForCausalLM.from_pretrained(location, revision=spec.revision, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise _missing(role, location, exc) from exc
    model.to(device)
    if role == "teacher":
        model.eval().requires_grad_(False)
    return model


@dataclass(frozen=True)
class Vocabulary:
    """The ids both models score: the tokenizer's, when the embeddings only add padding rows."""

    size: int
    teacher_rows: int
    student_rows: int

    @property
    def padded(self) -> bool:
        return self.teacher_rows != self.size or self.student_rows != self.size


def shared_vocabulary(tokenizer: PreTrainedTokenizerBase, teacher_rows: int, student_rows: int) -> Vocabulary:
    """Check that teacher and student can be compared token by token.

    Qwen3-4B and Qwen3-0.6B both pad their 151,669 tokens to 151,936 embedding rows; the padding
    rows are never targets, so scoring on the tokenizer's ids loses nothing.
    """
    size = len(tokenizer)
    for role, rows in (("teacher", teacher_rows), ("student", student_rows)):
        if rows < size:
            raise UsageError(
                f"the {role} has {rows} embedding rows but the teacher's tokenizer has {size} tokens: "
                "teacher and student must share one tokenizer; pick models of the same family"
            )
    return Vocabulary(size=size, teacher_rows=teacher_rows, student_rows=student_rows)


def embedding_rows(location: str, revision: str | None) -> int:
    """The vocabulary size from the config alone, so a mismatch shows before any weights load."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(location, revision=revision)
    return getattr(config, "vocab_size", None) or config.get_text_config().vocab_size


def check_vocabularies(study: StudyConfig, tokenizer: PreTrainedTokenizerBase) -> Vocabulary:
    rows = {}
    for role in ("teacher", "student"):
        spec: ModelConfig = getattr(study, role)
        location = model_location(spec, study)
        try:
            rows[role] = embedding_rows(location, spec.revision)
        except (OSError, ValueError) as exc:
            raise _missing(role, location, exc) from exc
    return shared_vocabulary(tokenizer, rows["teacher"], rows["student"])


def _missing(role: str, location: str, exc: Exception) -> UsageError:
    fix = f"set {role}.name to a model folder or a reachable hub id"
    if location.startswith(("/", ".", "~")) and not Path(location).expanduser().exists():
        return UsageError(f"cannot load the {role}: no folder {location}; {fix}")
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UsageError(f"cannot load the {role} from {location!r}: {reason}; {fix}")


def hidden_states(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The last hidden states ``[B, S, H]``: the losses apply the output layer chunk by chunk,
    so the ``[B, S, V]`` logits are never built."""
    return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def output_weight(model: PreTrainedModel, vocab: Vocabulary) -> torch.Tensor:
    """The output embedding ``[V, H]`` restricted to the shared ids."""
    return model.get_output_embeddings().weight[: vocab.size]
