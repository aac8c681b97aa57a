"""What a chat template writes around a conversation's contents, found once per shape.

A conversation's *shape* is each turn's role and whether it has reasoning: everything the
template's own text may depend on, short of the contents themselves. The template renders a
conversation of that shape whose contents (and reasonings) are placeholders, private-use
characters no template or tokenizer gives meaning to; what lies between the placeholders is the
template's own text, its *segments*. Each placeholder's *slot* is the turn and the part (content
or reasoning) it stands for; a part the template leaves out (Qwen3's reasoning of an earlier
turn) has no slot.

A real rendering must be the segments with each slot's text between them (``regions``); the
placeholder rendering itself, ``Structure.text``, is what prefix checks compare (is a generation
prompt the text before a turn?), since the placeholders of equal turns are equal.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdsweep.data.formats import Conversation
from kdsweep.data.rendered import RowError

_OPEN, _CLOSE = "\ue000", "\ue001"  # a placeholder is _OPEN + turn number (+ "r") + _CLOSE
Slot = tuple[int, bool]  # a turn, and whether the slot holds its reasoning (else its content)


def placeholder(slot: Slot) -> str:
    turn, reasoning = slot
    return f"{_OPEN}{turn}{'r' if reasoning else ''}{_CLOSE}"


def placeholder_messages(shape: tuple[tuple[str, bool], ...]) -> list[dict]:
    """A conversation of ``shape`` whose contents and reasonings are placeholders."""
    return Conversation(
        tuple((role, placeholder((i, False))) for i, (role, _) in enumerate(shape)),
        reasoning=tuple(placeholder((i, True)) if r else "" for i, (_, r) in enumerate(shape)),
    ).messages()


@dataclass(frozen=True)
class Structure:
    """The template's text around the slots of a conversation of one shape."""

    text: str  # the template's rendering of the placeholders
    # the text before the first slot, between slots, after the last
    segments: tuple[str, ...]
    slots: tuple[Slot, ...]  # in rendered order
    spans: tuple[tuple[int, int], ...]  # each slot's placeholder in ``text``
    closes: tuple[int, ...]  # per slot: the length of its footer's end-of-turn part (0: none)
    # the text after the last added token (<|im_start|>) of the last segment, if it has one
    tail: str | None

    def regions(self, text: str, conversation: Conversation) -> dict[Slot, tuple[int, int]] | None:
        """Each slot's text as a character range of ``text``; None when ``text`` is not the
        template's text with the conversation's contents in its slots. A template may trim a
        content (Qwen3 strips newlines around a reasoning): its own text must stay."""
        head = self.segments[0]
        if not text.startswith(head):
            return None
        position, regions = len(head), {}
        for n, slot in enumerate(self.slots):
            value, footer = conversation.part(*slot), self.segments[n + 1]
            last = n == len(self.slots) - 1
            if text.startswith(value, position) and text.startswith(footer, position + len(value)):
                end = position + len(value)
            elif last:
                end = len(text) - len(footer) if text.endswith(footer) else -1
            else:
                # the template changed the content
                end = text.find(footer, position) if footer else -1
            if end < position:
                return None
            regions[slot] = (position, end)
            position = end + len(footer)
        return regions if position == len(text) else None

    def position(self, regions: dict[Slot, tuple[int, int]], offset: int) -> int:
        """Where ``offset`` of ``text`` (outside any placeholder) falls in the real rendering
        whose slots are ``regions``."""
        shift = 0
        for slot, (_, end) in zip(self.slots, self.spans):
            if end > offset:
                break
            shift = regions[slot][1] - end
        return offset + shift

    def end_of(self, turn: int) -> int | None:
        """Where ``turn``'s content ends in ``text``, its end-of-turn included; None if the
        template leaves it out."""
        slot = (turn, False)
        if slot not in self.slots:
            return None
        n = self.slots.index(slot)
        return self.spans[n][1] + self.closes[n]


def cut(text: str, slots: list[Slot], *, added: list[str], specials: list[str], index: int):
    """The structure of ``text``, a rendering of placeholders for ``slots``: ``added`` are the
    tokenizer's added tokens, ``specials`` its special ones (an end-of-turn is one)."""
    found = sorted((text.find(placeholder(s)), s) for s in slots if placeholder(s) in text)
    if any(text.count(placeholder(s)) > 1 for _, s in found):
        raise RowError(
            index,
            "chat template",
            "the template writes a turn's content twice; set data.chat_template to one that "
            "writes it once",
        )
    segments, spans, position = [], [], 0
    for start, slot in found:
        segments.append(text[position:start])
        position = start + len(placeholder(slot))
        spans.append((start, position))
    segments.append(text[position:])
    closes = tuple(closing(footer, specials)[0] for footer in segments[1:])
    ends = [segments[-1].rfind(t) + len(t) for t in added if t in segments[-1]]
    tail = segments[-1][max(ends) :] if ends else None
    return Structure(text, tuple(segments), tuple(s for _, s in found), tuple(spans), closes, tail)


def closing(footer: str, specials: list[str]) -> tuple[int, str | None]:
    """The footer's first special token (the end-of-turn), and the footer's length up to and
    including it; (0, None) when it has none."""
    hits = [(footer.find(token), -len(token), token) for token in specials if token in footer]
    if not hits:
        return 0, None
    start, _, token = min(hits)
    return start + len(token), token
