"""An assistant turn's reasoning: where rows keep it, where generations end it, what became of it.

Rows keep a turn's reasoning under a key of its own, named differently across the ecosystem
(``reasoning_content`` as Qwen3's chat template and DeepSeek read it, ``reasoning`` as vLLM and
OpenAI-style servers write it, ``thinking`` as transformers' docs and GPT-OSS's template do), or
inline in the content as ``<think>...</think>answer`` (open-r1's and most public traces). Read
rows hold it apart from the answer, split out of the content exactly as Qwen3's template splits
it, so rendering it under ``reasoning_content`` gives the very text the template would have made
of the inline form. A generation's answer is what follows its think block's close.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# The keys a row's reasoning is read from, and passed to the template under (each template reads
# the one it knows: Qwen3 reasoning_content, GPT-OSS thinking).
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"  # Qwen3's, DeepSeek-R1's, open-r1's


def split_reasoning(content: str) -> tuple[str, str]:
    """``(reasoning, answer)`` of an assistant content, as Qwen3's template splits it: when it
    holds ``</think>``, the reasoning is the text before the first one (after a ``<think>``),
    the answer the text after the last one; otherwise there is no reasoning.

    Example:
        >>> split_reasoning("<think>\\n2 + 2 = 4\\n</think>\\n\\n4")
        ('2 + 2 = 4', '4')
        >>> split_reasoning("4")
        ('', '4')
    """
    if THINK_CLOSE not in content:
        return "", content
    before, *_, after = content.split(THINK_CLOSE)
    return before.rstrip("\n").split(THINK_OPEN)[-1].lstrip("\n"), after.lstrip("\n")


def answer_after_reasoning(generated: str) -> str | None:
    """The answer in generated text: after its think block's close; the whole text when it has
    no think block; None when it opened one and never closed it (cut off while reasoning)."""
    if THINK_CLOSE in generated:
        return generated.rsplit(THINK_CLOSE, 1)[1]
    return None if THINK_OPEN in generated else generated


@dataclass(frozen=True)
class AnswerCounts:
    """A split's answers (the scored assistant turns of its conversations) and what became of
    their reasoning. Counted as the rows are rendered, before truncation to ``data.max_length``."""

    answers: int = 0
    reasoned: int = 0  # answers whose row gives them reasoning
    trained: int = 0  # ... rendered and scored with the answer
    left_out: int = 0  # ... that the chat template leaves out (Qwen3's: before the last query)
    stripped: int = 0  # ... taken off by data.reasoning: strip
    # answers scored in another context than the one they are generated in: the template renders
    # them unlike a last turn (Qwen3's: earlier turns without their think block), or its
    # generation prompt is not the text before them
    unlike_generation: int = 0

    def __add__(self, other: AnswerCounts) -> AnswerCounts:
        return AnswerCounts(
            *(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self))
        )

    @property
    def not_trained(self) -> int:
        """Answers whose reasoning is not trained on."""
        return self.left_out + self.stripped
