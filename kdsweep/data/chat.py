"""Conversations rendered through a chat template, and where their answers lie in the text.

The text is exactly what ``apply_chat_template`` makes of the conversation: the student is
distilled on the format it will be prompted with. Which characters are answers is found without
``{% generation %}`` tags (Qwen3's template, like most, has none):

1. The template renders a conversation with the same roles whose contents are placeholders
   (private-use characters no template or tokenizer gives meaning to). What lies around the
   placeholders is the template's own text: a header before each turn, a footer after it.
   This *structure* is rendered once per sequence of roles and kept.
2. The real rendering must be that template text with each turn's content in its slot. Usually
   the contents appear as they are; a template that trims them is followed too, as long as its
   own text around them is unchanged. A template whose own text depends on the contents (Qwen3
   splitting a ``<think>`` block out of an assistant turn) is reported for that row, with the fix.
3. An answer is its content plus the footer up to and including the footer's first special
   token, the end-of-turn (``<|im_end|>``) that teaches the model to stop.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from kdsweep.compat.transformers import compiled_chat_template
from kdsweep.data.formats import ASSISTANT, SYSTEM, USER, Conversation
from kdsweep.data.rendered import Rendered, RowError
from kdsweep.errors import UsageError, first_line
from kdsweep.study.config import DataConfig, read_chat_template

_OPEN, _CLOSE = "\ue000", "\ue001"  # a placeholder is _OPEN + turn number + _CLOSE
# Generation prompts both rendered and filled in, before the filled ones are trusted.
PROMPT_CHECKS = 16
DIRECT_CHECKS = 16  # conversations rendered both ways before the template is rendered directly


@dataclass(frozen=True)
class _Structure:
    """The template's text around the contents of a conversation with given roles."""

    # the text before the first content, between contents, after the last
    segments: tuple[str, ...]
    order: tuple[int, ...]  # the turn whose content each slot holds, in rendered order
    closes: tuple[int, ...]  # per slot: the length of its footer's end-of-turn part (0: none)
    # the text after the last added token (<|im_start|>) of the last segment, if it has one
    tail: str | None

    def regions(
        self, text: str, turns: tuple[tuple[str, str], ...]
    ) -> dict[int, tuple[int, int]] | None:
        """Each rendered turn's content as a character range of ``text``; None when ``text`` is
        not this structure's template text with contents in its slots."""
        head = self.segments[0]
        if not text.startswith(head):
            return None
        position, regions = len(head), {}
        for slot, turn in enumerate(self.order):
            content, footer = turns[turn][1], self.segments[slot + 1]
            last = slot == len(self.order) - 1
            if text.startswith(content, position) and text.startswith(
                footer, position + len(content)
            ):
                end = position + len(content)
            elif last:
                end = len(text) - len(footer) if text.endswith(footer) else -1
            else:
                # the template changed the content
                end = text.find(footer, position) if footer else -1
            if end < position:
                return None
            regions[turn] = (position, end)
            position = end + len(footer)
        return regions if position == len(text) else None


class ChatTemplate:
    """A tokenizer's chat template (or the study's ``data.chat_template``), with the keyword
    arguments it is rendered with (``data.chat_template_kwargs``)."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, template: str, kwargs: dict | None = None
    ):
        self.tokenizer = tokenizer
        self.template = template
        self.kwargs = dict(kwargs or {})
        added = tokenizer.added_tokens_decoder.values()
        # tokenizers split text at these before anything else
        self._added = [t.content for t in added]
        self._specials = [t.content for t in added if t.special]
        self._structures: dict[
            tuple[tuple[str, ...], bool], _Structure
        ] = {}  # by roles, generation prompt
        self._compiled = compiled_chat_template(template)
        # what apply_chat_template passes
        self._variables = {
            **tokenizer.special_tokens_map,
            **self.kwargs,
        }
        # until _render_directly differs from transformers once
        self._direct = self._compiled is not None
        self.end_of_turn = self._end_of_turn()  # the token that closes an assistant turn, if any
        self.end_of_turn_id: int | None = (
            tokenizer.convert_tokens_to_ids(self.end_of_turn) if self.end_of_turn else None
        )

    @classmethod
    def of(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        data: DataConfig,
        *,
        base_dir: str,
        role: str = "student",
    ) -> ChatTemplate:
        """The template conversations are rendered with: ``data.chat_template`` if set, else the
        tokenizer's own."""
        template = (
            read_chat_template(data.chat_template, base_dir)
            if data.chat_template
            else tokenizer.chat_template
        )
        if not template:
            raise UsageError(
                f"data.chat_template: the {role}'s tokenizer has no chat template, which "
                "conversational rows are "
                "rendered with; set data.chat_template to a Jinja template or a file holding one "
                "(e.g. ChatML), "
                "or use a model whose tokenizer has one"
            )
        return cls(tokenizer, template, data.chat_template_kwargs)

    def render(
        self, conversations: list[Conversation], *, with_prompts: bool = True
    ) -> list[Rendered]:
        """Each conversation's text, its answers' character spans (end-of-turn included) and, when
        it ends with an answer (and ``with_prompts``), the conversation before it with the
        generation prompt."""
        texts = self._apply(
            [c.messages() for c in conversations],
            range(len(conversations)),
            generation_prompt=False,
        )
        found = [
            self._regions(i, c, text) for i, (c, text) in enumerate(zip(conversations, texts))
        ]
        prompts = (
            self._prompts(conversations, [verbatim for _, _, verbatim in found])
            if with_prompts
            else {}
        )
        return [
            self._rendered(i, c, text, structure, regions, prompts.get(i))
            for i, (c, text, (structure, regions, _)) in enumerate(
                zip(conversations, texts, found)
            )
        ]

    def _regions(
        self, index: int, conversation: Conversation, text: str
    ) -> tuple[_Structure, dict[int, tuple[int, int]], bool]:
        """The conversation's structure, each turn's content in ``text``, and whether every content
        is there as it is."""
        structure = self._structure(conversation.roles, index)
        regions = structure.regions(text, conversation.turns)
        if regions is None:
            raise RowError(
                index,
                "chat template",
                "the template's own text around the turns changes with their contents, so the "
                "answers cannot be "
                "found by their characters; remove <think> blocks and template markers from the "
                "contents, "
                "or set data.chat_template to a template that renders each content as it is",
            )
        verbatim = all(
            regions[t][1] - regions[t][0] == len(conversation.turns[t][1]) for t in regions
        )
        return structure, regions, verbatim

    def _rendered(
        self,
        index: int,
        conversation: Conversation,
        text: str,
        structure: _Structure,
        regions: dict,
        prompt: str | None,
    ) -> Rendered:
        spans = []
        for turn in conversation.answers:
            if turn not in regions:
                raise RowError(
                    index,
                    f"turn {turn}",
                    "the chat template leaves this assistant turn out; fix the row or the "
                    "template",
                )
            start, end = regions[turn]
            spans.append((start, end + structure.closes[structure.order.index(turn)]))
        if prompt is None:
            return Rendered(text, tuple(spans))
        final = regions[len(conversation.turns) - 1]
        tail = self._structure(conversation.roles[:-1], index, generation_prompt=True).tail
        return Rendered(
            text,
            tuple(spans),
            answer=conversation.turns[-1][1],
            answer_start=final[0],
            prompt=prompt,
            prompt_tail=tail,
        )

    def _prompts(self, conversations: list[Conversation], verbatim: list[bool]) -> dict[int, str]:
        """The generation prompts of the conversations that end with an answer.

        Rendering them is half the template's cost. For a conversation whose contents the
        template wrote as they are, its prompt is the template's prompt structure with the same
        contents in its slots; the first ``PROMPT_CHECKS`` such prompts are also rendered, and
        one that differs sends every prompt through the template.
        """
        answered = [i for i, c in enumerate(conversations) if c.ends_with_answer]
        filled = {i: self._filled_prompt(i, conversations[i]) for i in answered if verbatim[i]}
        checked = list(filled)[:PROMPT_CHECKS]
        rendered = self._apply(
            [conversations[i].messages(-1) for i in checked], checked, generation_prompt=True
        )
        if any(filled[i] != text for i, text in zip(checked, rendered)):
            filled = {}
        rest = [i for i in answered if i not in filled]
        return filled | dict(
            zip(
                rest,
                self._apply(
                    [conversations[i].messages(-1) for i in rest], rest, generation_prompt=True
                ),
            )
        )

    def _filled_prompt(self, index: int, conversation: Conversation) -> str:
        structure = self._structure(conversation.roles[:-1], index, generation_prompt=True)
        pieces = [structure.segments[0]]
        for slot, turn in enumerate(structure.order):
            pieces += [conversation.turns[turn][1], structure.segments[slot + 1]]
        return "".join(pieces)

    def _apply(self, messages: list[list[dict]], indices, *, generation_prompt: bool) -> list[str]:
        """The template's texts of ``messages`` (of the rows ``indices``, named if one is
        refused)."""
        if not messages:
            return []
        try:
            return self._render(messages, generation_prompt=generation_prompt)
        except Exception:  # find the row the template refuses, and say so; anything else is a bug
            for index, one in zip(indices, messages):
                try:
                    self._render([one], generation_prompt=generation_prompt)
                except Exception as exc:
                    refused = f"the template refuses it ({first_line(exc)})"
                    raise RowError(
                        index, "chat template", f"{refused}; fix the row or the template"
                    ) from None
            raise

    def _render(self, messages: list[list[dict]], *, generation_prompt: bool) -> list[str]:
        if self._direct:  # checked on the first conversations of every call
            sample = messages[:DIRECT_CHECKS]
            direct = [self._render_directly(m, generation_prompt) for m in sample]
            self._direct = direct == self._through_transformers(sample, generation_prompt)
        if not self._direct:
            return self._through_transformers(messages, generation_prompt)
        return direct + [
            self._render_directly(m, generation_prompt) for m in messages[DIRECT_CHECKS:]
        ]

    def _through_transformers(
        self, messages: list[list[dict]], generation_prompt: bool
    ) -> list[str]:
        return self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            chat_template=self.template,
            add_generation_prompt=generation_prompt,
            **self.kwargs,
        )

    def _render_directly(self, messages: list[dict], generation_prompt: bool) -> str:
        """What ``apply_chat_template`` renders, without its per-message copying and checks (two
        thirds of its time on short turns): the template compiled by transformers, given the same
        variables. Used only once it rendered the first conversations exactly as transformers
        did."""
        return self._compiled.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=generation_prompt,
            **self._variables,
        )

    def _structure(
        self, roles: tuple[str, ...], index: int, *, generation_prompt: bool = False
    ) -> _Structure:
        """What the template makes of a conversation with ``roles`` (followed by the generation
        prompt, if asked), rendered once with placeholder contents."""
        key = (roles, generation_prompt)
        if key not in self._structures:
            placeholders = [
                {"role": role, "content": f"{_OPEN}{i}{_CLOSE}"} for i, role in enumerate(roles)
            ]
            text = self._apply([placeholders], [index], generation_prompt=generation_prompt)[0]
            self._structures[key] = self._cut(text, len(roles), index)
        return self._structures[key]

    def _cut(self, text: str, turns: int, index: int) -> _Structure:
        found = sorted(
            (text.find(f"{_OPEN}{i}{_CLOSE}"), i)
            for i in range(turns)
            if f"{_OPEN}{i}{_CLOSE}" in text
        )
        if any(text.count(f"{_OPEN}{i}{_CLOSE}") > 1 for _, i in found):
            raise RowError(
                index,
                "chat template",
                "the template writes a turn's content twice; set data.chat_template to one that "
                "writes it once",
            )
        segments, position = [], 0
        for start, i in found:
            segments.append(text[position:start])
            position = start + len(f"{_OPEN}{i}{_CLOSE}")
        segments.append(text[position:])
        closes = tuple(self._closing(footer)[0] for footer in segments[1:])
        ends = [
            segments[-1].rfind(token) + len(token)
            for token in self._added
            if token in segments[-1]
        ]
        tail = segments[-1][max(ends) :] if ends else None
        return _Structure(tuple(segments), tuple(i for _, i in found), closes, tail)

    def _closing(self, footer: str) -> tuple[int, str | None]:
        """The footer's first special token (the end-of-turn), and the footer's length up to and
        including it; (0, None) when it has none."""
        hits = [
            (footer.find(token), -len(token), token) for token in self._specials if token in footer
        ]
        if not hits:
            return 0, None
        start, _, token = min(hits)
        return start + len(token), token

    def _end_of_turn(self) -> str | None:
        """The special token the template closes an assistant turn with: where generation stops."""
        for roles in ((USER, ASSISTANT), (SYSTEM, USER, ASSISTANT)):
            try:
                structure = self._structure(roles, 0)
            except RowError:
                continue  # a template that wants a system turn first, say
            answer = len(roles) - 1
            if answer in structure.order:
                return self._closing(structure.segments[structure.order.index(answer) + 1])[1]
        return None
