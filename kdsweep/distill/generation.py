"""Generating continuations of prompts: batched, left-padded, with the KV cache.

One function serves the accuracy evaluation (greedy decoding of answers) and on-policy
distillation (the student sampling its own completions). It runs ``transformers``' ``generate``
with an explicit generation config, so a model's own ``generation_config.json`` (Qwen3's samples
at temperature 0.6, top-k 20) never changes what kdsweep measures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import GenerationConfig, PreTrainedModel

from kdsweep.distill import clock


@torch.no_grad()
@clock.part(clock.GENERATION)  # on the trial's clock: on-policy steps and accuracy decode
def generate(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    batch_size: int,
    temperature: float | None = None,
    vocab_size: int | None = None,
    on_rows: Callable[[int], None] = lambda done: None,
) -> list[list[int]]:
    """The tokens ``model`` generates after each prompt, up to and including its EOS, or the cap.

    Args:
        prompts: Token ids, one sequence per prompt (at least one token each).
        max_new_tokens: The most tokens generated per prompt.
        batch_size: Prompts generated together. They are grouped by length, so little of each
            batch is padding; the result keeps the prompts' order.
        temperature: None decodes greedily; a number samples from the whole distribution at that
            temperature (no top-k or top-p), from torch's global generator.
        vocab_size: The ids the tokenizer knows: the embedding's padding rows above them are never
            generated (a teacher could not score them, a tokenizer could not decode them).
        on_rows: Hears how many prompts each batch completed (a progress bar).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = model.get_output_embeddings().weight.shape[0]
    padding_rows = (
        list(range(vocab_size, rows)) if vocab_size is not None and vocab_size < rows else None
    )
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        suppress_tokens=padding_rows,
        do_sample=temperature is not None,
        temperature=temperature,
        top_k=None,
        top_p=None,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: dict[int, list[int]] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_ids, attention_mask = _left_padded(
            [prompts[i] for i in rows], pad_id=pad_id, device=device
        )
        generated = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config
        )
        for row, tokens in zip(rows, generated[:, input_ids.shape[1] :].tolist()):
            outputs[row] = _until(tokens, eos_id)
        on_rows(len(rows))
    model.train(was_training)
    return [outputs[i] for i in range(len(prompts))]


def _left_padded(
    prompts: list[Sequence[int]], *, pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, L]`` ids and attention mask, padding on the left so every row ends where generation
    starts."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _until(tokens: list[int], eos_id: int) -> list[int]:
    """The tokens up to the first EOS, which generate pads finished rows with (pad may be EOS)."""
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens
