"""The student's form: full fine-tuning, or a LoRA adapter of rank r built with peft.

``search.lora_rank`` picks the form per trial (0: every weight trains); ``student.lora`` fixes the
adapter's other settings for the study. An adapted student is peft's wrapper around the loaded
student: its linear layers carry the adapter, the rest stays frozen, and only the adapter's
parameters train (and get optimizer states). What a trial keeps of its student (resume and best
checkpoints, a finalist's weights) is what trains: the adapter alone, a few megabytes where the
whole model would be gigabytes.

peft is imported only when a trial asks for an adapter (it is an extra: ``kdsweep[lora]``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch.nn import Linear
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from kdsweep.errors import UsageError
from kdsweep.study.config import ALL_LINEAR, LoraConfig, ModelConfig


def is_adapted(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a student with a LoRA adapter (peft's wrapper)."""
    return hasattr(model, "peft_config")


def adapt(student: PreTrainedModel, rank: int, settings: LoraConfig) -> PreTrainedModel:
    """``student`` with a LoRA adapter of ``rank`` on ``settings.target_modules``, every other
    weight frozen; ``student`` itself when ``rank`` is 0 (full fine-tuning). Seed torch first: the
    adapter's A matrices start random (its B matrices at zero, so it starts as the student)."""
    if rank == 0:
        return student
    import peft  # the lora extra; the study file's check already said how to install it

    config = peft.LoraConfig(
        r=rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=_targets(settings),
        task_type=peft.TaskType.CAUSAL_LM,
    )
    with warnings.catch_warnings():
        # An adapter on a tied output layer adapts the output alone, as intended; ``merged``
        # unties the two before merging, so peft's warning about it does not apply.
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*", category=UserWarning)
        return peft.get_peft_model(student, config)


def effective_output_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The output layer's weight as the forward pass uses it: with an adapter on it (a study that
    targets ``lm_head``), the frozen weight plus the adapter's update, which trains through it."""
    if not _has_adapter(layer):
        return layer.weight
    return layer.weight + sum(layer.get_delta_weight(name) for name in layer.active_adapters)


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights training changes, by their state-dict names: an adapted student's adapter,
    otherwise the whole state dict (live tensors, not copies)."""
    state = model.state_dict()
    if not is_adapted(model):
        return state
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: tensor for name, tensor in state.items() if name in trained}


def load_trained_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put ``trained_state``'s weights back into a student of the same form."""
    model.load_state_dict(state, strict=not is_adapted(model))


def save_adapter(model: PreTrainedModel, folder: Path) -> None:
    """The adapter as peft saves it (``adapter_config.json``, ``adapter_model.safetensors``):
    ``PeftModel.from_pretrained(student, folder)`` or transformers' own ``from_pretrained`` with
    peft installed loads it onto the student it names."""
    model.save_pretrained(folder)


def merged(model: PreTrainedModel) -> PreTrainedModel:
    """The student with its adapter merged into its weights: a plain transformers model that
    computes what the adapted one does. The adapted model is merged in place: use it no more.

    A student that ties its output layer to its input embeddings (Qwen3-0.6B, the demo's) and
    carries an adapter on either computes with two different matrices; merged into the one
    tensor they share, the update would reach both. So they are untied first: the output layer
    gets a copy of its own, and the config says so (``tie_word_embeddings: false``)."""
    if not is_adapted(model):
        return model
    student = model.get_base_model()
    layers = (student.get_input_embeddings(), student.get_output_embeddings())
    config = student.config.get_text_config()
    if getattr(config, "tie_word_embeddings", False) and any(map(_has_adapter, layers)):
        output = getattr(layers[1], "base_layer", layers[1])
        output.weight = torch.nn.Parameter(output.weight.detach().clone())
        config.tie_word_embeddings = student.config.tie_word_embeddings = False
    return model.merge_and_unload()


def _has_adapter(layer: torch.nn.Module) -> bool:
    return hasattr(layer, "base_layer")  # peft wraps an adapted layer around the original


def check_targets(student: ModelConfig, settings: LoraConfig) -> None:
    """Raise UsageError unless every target module names modules the student has. Reads the
    student's config and builds its layers on the meta device: no weights load."""
    targets = _targets(settings)
    if targets == ALL_LINEAR:
        return
    config = AutoConfig.from_pretrained(student.name, revision=student.revision)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names = [name for name, _ in skeleton.named_modules()]
    for target in targets:
        if not any(name == target or name.endswith(f".{target}") for name in names):
            modules = skeleton.named_modules()
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules if isinstance(m, Linear)})
            raise UsageError(
                f"student.lora.target_modules: the student ({type(skeleton).__name__}) has no "
                f"module named {target!r}; its linear layers are {', '.join(linear)} (or "
                f"{ALL_LINEAR!r}: all but the output layer)"
            )


def _targets(settings: LoraConfig) -> str | list[str]:
    targets = settings.target_modules
    return targets if isinstance(targets, str) else list(targets)
