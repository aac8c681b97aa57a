"""Text rows: guanaco's ``### Human:`` / ``### Assistant:`` turns, plain text, and plain
prompt-completion pairs, each followed by the tokenizer's EOS token."""

from __future__ import annotations

import re

from kdsweep.data.formats import Completion
from kdsweep.data.rendered import Rendered

HUMAN, ASSISTANT = "human", "assistant"

_MARKERS = {HUMAN: "### Human:", ASSISTANT: "### Assistant:"}
_MARKER_PATTERN = re.compile(r"###\s*(Human|Assistant):")


def parse_guanaco(text: str) -> list[tuple[str, str]]:
    """Split ``### Human: ... ### Assistant: ...`` text into ``(speaker, content)`` turns.

    Speakers are ``"human"`` and ``"assistant"``; contents are stripped and empty turns left
    out. Text without any marker is one assistant turn, so plain-text rows are scored whole. Text
    before the first marker is context: a human turn, not scored.

    Example:
        >>> parse_guanaco("### Human: Hi?### Assistant: Hello. ### Human: Bye")
        [('human', 'Hi?'), ('assistant', 'Hello.'), ('human', 'Bye')]
        >>> parse_guanaco("  just text ")
        [('assistant', 'just text')]
    """
    before, *rest = _MARKER_PATTERN.split(text)
    if not rest:
        return [(ASSISTANT, before.strip())] if before.strip() else []
    turns = [(HUMAN, before.strip())] if before.strip() else []
    for speaker, content in zip(rest[::2], rest[1::2]):
        if content.strip():
            turns.append((speaker.lower(), content.strip()))
    return turns


def render_text(text: str, eos: str) -> Rendered:
    """A guanaco row with its markers, as in the data (a row without markers as it is, all of it
    an answer), then EOS, which is scored when the assistant speaks last: the model must learn
    to stop."""
    if not _MARKER_PATTERN.search(text):
        plain = text.strip()
        # no prompt: nothing to answer
        return Rendered(plain + eos, ((0, len(plain) + len(eos)),) if plain else ())
    rendered, spans, final = "", [], None
    for speaker, content in parse_guanaco(text):
        rendered += _MARKERS[speaker] + " "
        final = None
        if speaker == ASSISTANT:
            final = (len(rendered), content)
            spans.append((len(rendered), len(rendered) + len(content)))
        rendered += content
    if final is None:  # the human speaks last: nothing to stop after
        return Rendered(rendered + eos, tuple(spans))
    spans[-1] = (spans[-1][0], len(rendered) + len(eos))
    return Rendered(rendered + eos, tuple(spans), answer=final[1], answer_start=final[0])


def render_completion(row: Completion, eos: str) -> Rendered:
    """``prompt + completion`` then EOS, as TRL joins a plain prompt-completion row; the
    completion and the EOS are scored."""
    start = len(row.prompt)
    text = row.prompt + row.completion + eos
    return Rendered(text, ((start, len(text)),), answer=row.completion, answer_start=start)


def answer_text(generated: str) -> str:
    """The answer in generated text: up to the next turn's marker, stripped."""
    return _MARKER_PATTERN.split(generated, maxsplit=1)[0].strip()
