"""Conversations rendered through a chat template, and where their answers lie in the text.

The text is exactly what ``apply_chat_template`` makes of the conversation: the student is
distilled on the format it will be prompted with. Which characters are answers is found without
``{% generation %}`` tags (Qwen3's template, like most, has none):

1. The template renders a conversation of the same shape with placeholder contents, once per
   shape (``structure``): what lies around them is the template's own text. The real rendering
   must be that text with each content (and reasoning) in its slot. A template that trims a
   content is followed, as long as its own text around it is unchanged; a template whose own
   text depends on the contents is reported for that row, with the fix.
2. An answer is what the model generates for it: the text from the end of its generation prompt
   (the turns before it, rendered with ``add_generation_prompt`` and ``data.chat_template_kwargs``,
   as a served model is prompted) to the footer's first special token, the end-of-turn
   (``<|im_end|>``) that teaches the model to stop. So in Qwen3's thinking mode the think block,
   reasoning or empty, is scored with the answer; with ``enable_thinking: false`` it is part of
   the prompt. A rendering that does not begin with the generation prompt (a template that
   renders earlier turns unlike the last) scores the turn from its first slot, and is counted.
3. An assistant turn's reasoning is rendered where the template puts it, under
   ``reasoning_content`` (and the other keys templates read). What the template leaves out is
   counted (``AnswerCounts``); a template that renders no reasoning at all is refused for a row
   that has some, as is reasoning in a turn whose generation prompt opens past it.
"""

from __future__ import annotations

from functools import cached_property

from transformers import PreTrainedTokenizerBase

from kdsweep.compat.transformers import compiled_chat_template
from kdsweep.data.formats import ASSISTANT, SYSTEM, USER, Conversation
from kdsweep.data.reasoning import AnswerCounts
from kdsweep.data.rendered import Rendered, RowError
from kdsweep.data.structure import Slot, Structure, closing, cut, placeholder_messages
from kdsweep.errors import UsageError, first_line
from kdsweep.study.config import REASONING, DataConfig, read_chat_template

# Generation prompts both rendered and filled in, before the filled ones are trusted.
PROMPT_CHECKS = 16
DIRECT_CHECKS = 16  # conversations rendered both ways before the template is rendered directly
TRAIN, STRIP = REASONING


class ChatTemplate:
    """A tokenizer's chat template (or the study's ``data.chat_template``), with the keyword
    arguments it is rendered with (``data.chat_template_kwargs``) and what becomes of reasoning
    (``data.reasoning``: trained on, or stripped)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        template: str,
        kwargs: dict | None = None,
        *,
        reasoning: str = TRAIN,
    ):
        self.tokenizer = tokenizer
        self.template = template
        self.kwargs = dict(kwargs or {})
        self.strips_reasoning = reasoning == STRIP
        added = tokenizer.added_tokens_decoder.values()
        # tokenizers split text at these before anything else
        self._added = [t.content for t in added]
        self._specials = [t.content for t in added if t.special]
        # by shape and generation prompt
        self._structures: dict[tuple[tuple, bool], Structure] = {}
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
        return cls(tokenizer, template, data.chat_template_kwargs, reasoning=data.reasoning)

    def render(
        self, conversations: list[Conversation], *, with_prompts: bool = True
    ) -> list[Rendered]:
        """Each conversation's text, its answers' character spans (each from where its
        generation starts to its end-of-turn), what became of their reasoning and, when it ends
        with an answer (and ``with_prompts``), the conversation before it with the generation
        prompt."""
        stripped = [
            sum(bool(c.reasoning[t]) for t in c.answers) if self.strips_reasoning else 0
            for c in conversations
        ]
        if self.strips_reasoning:
            conversations = [c.without_reasoning() for c in conversations]
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
            self._rendered(i, c, text, structure, regions, prompts.get(i), stripped[i])
            for i, (c, text, (structure, regions, _)) in enumerate(
                zip(conversations, texts, found)
            )
        ]

    @cached_property
    def places_reasoning(self) -> bool:
        """Whether the template renders an assistant turn's reasoning at all (in a last turn)."""
        for roles in ((USER, ASSISTANT), (SYSTEM, USER, ASSISTANT)):
            try:
                structure = self._structure(tuple((r, r == ASSISTANT) for r in roles), 0)
            except RowError:
                continue  # a template that wants a system turn first, say
            return (len(roles) - 1, True) in structure.slots
        return False

    def _regions(
        self, index: int, conversation: Conversation, text: str
    ) -> tuple[Structure, dict[Slot, tuple[int, int]], bool]:
        """The conversation's structure, each slot's text in ``text``, and whether every content
        is there as it is."""
        structure = self._structure(conversation.shape(), index)
        regions = structure.regions(text, conversation)
        if regions is None:
            raise RowError(
                index,
                "chat template",
                "the template's own text around the turns changes with their contents, so the "
                "answers cannot be found by their characters; remove template markers from the "
                "contents, or set data.chat_template to a template that renders each content as "
                "it is",
            )
        verbatim = all(
            end - start == len(conversation.part(*slot)) for slot, (start, end) in regions.items()
        )
        return structure, regions, verbatim

    def _rendered(
        self,
        index: int,
        conversation: Conversation,
        text: str,
        structure: Structure,
        regions: dict,
        prompt: str | None,
        stripped: int,
    ) -> Rendered:
        spans, counts = [], AnswerCounts(reasoned=stripped, stripped=stripped)
        for turn in conversation.answers:
            span, answer = self._answer(index, conversation, turn, structure, regions)
            spans.append(span)
            counts += answer
        if prompt is None:
            return Rendered(text, tuple(spans), counts=counts)
        tail = self._structure(conversation.shape(-1), index, generation_prompt=True).tail
        return Rendered(
            text,
            tuple(spans),
            answer=conversation.turns[-1][1],
            answer_start=spans[-1][0],
            prompt=prompt,
            prompt_tail=tail,
            counts=counts,
        )

    def _answer(
        self,
        index: int,
        conversation: Conversation,
        turn: int,
        structure: Structure,
        regions: dict,
    ) -> tuple[tuple[int, int], AnswerCounts]:
        """An answer's scored characters (from where its generation starts to its end-of-turn),
        and what became of its reasoning."""
        content = (turn, False)
        if content not in regions:
            raise RowError(
                index,
                f"turn {turn}",
                "the chat template leaves this assistant turn out; fix the row or the template",
            )
        reasoned, placed = bool(conversation.reasoning[turn]), (turn, True) in regions
        if reasoned and not placed and not self.places_reasoning:
            raise RowError(
                index,
                f"turn {turn}",
                "has reasoning, and the chat template renders none (it reads no "
                "reasoning_content), so it would be dropped; set data.chat_template to one that "
                "renders it (the model's own, e.g. Qwen3's), or data.reasoning: strip to train "
                "on the answers alone",
            )
        start = self._generation_start(index, conversation, turn, structure, regions)
        if start is None and placed:
            raise RowError(
                index,
                f"turn {turn}",
                "has reasoning, and the generation prompt does not lead into it (Qwen3 with "
                "enable_thinking: false prefills an empty think block), so it could never be "
                "generated as trained; set data.reasoning: strip to train on the answers alone, "
                "or turn thinking on in data.chat_template_kwargs",
            )
        first = min(regions[slot][0] for slot in ((turn, True), content) if slot in regions)
        end = regions[content][1] + structure.closes[structure.slots.index(content)]
        as_generated = start is not None and self._renders_as_last(
            index, conversation, turn, structure
        )
        counts = AnswerCounts(
            answers=1,
            reasoned=int(reasoned),
            trained=int(placed),
            left_out=int(reasoned and not placed),
            unlike_generation=int(not as_generated),
        )
        return (first if start is None else start, end), counts

    def _generation_start(
        self,
        index: int,
        conversation: Conversation,
        turn: int,
        structure: Structure,
        regions: dict,
    ) -> int | None:
        """Where the model starts to generate ``turn``: the end of its generation prompt, when
        the rendering begins with it (None when it does not)."""
        prompt = self._structure(conversation.shape(turn), index, generation_prompt=True)
        if not structure.text.startswith(prompt.text):
            return None
        return structure.position(regions, len(prompt.text))

    def _renders_as_last(
        self, index: int, conversation: Conversation, turn: int, structure: Structure
    ) -> bool:
        """Whether the template renders ``turn`` as it renders a last turn, the one a model
        generates (Qwen3's renders earlier turns without their think block)."""
        last = self._structure(conversation.shape(turn + 1), index)
        end = last.end_of(turn)
        return end is not None and structure.text.startswith(last.text[:end])

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
        structure = self._structure(conversation.shape(-1), index, generation_prompt=True)
        pieces = [structure.segments[0]]
        for n, slot in enumerate(structure.slots):
            pieces += [conversation.part(*slot), structure.segments[n + 1]]
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
        self, shape: tuple[tuple[str, bool], ...], index: int, *, generation_prompt: bool = False
    ) -> Structure:
        """What the template makes of a conversation of ``shape`` (followed by the generation
        prompt, if asked), rendered once with placeholder contents."""
        key = (shape, generation_prompt)
        if key not in self._structures:
            text = self._apply(
                [placeholder_messages(shape)], [index], generation_prompt=generation_prompt
            )[0]
            slots = [
                (turn, part)
                for turn, (_, reasoned) in enumerate(shape)
                for part in ((True, False) if reasoned else (False,))
            ]
            self._structures[key] = cut(
                text, slots, added=self._added, specials=self._specials, index=index
            )
        return self._structures[key]

    def _end_of_turn(self) -> str | None:
        """The special token the template closes an assistant turn with: where generation stops."""
        for roles in ((USER, ASSISTANT), (SYSTEM, USER, ASSISTANT)):
            try:
                structure = self._structure(tuple((r, False) for r in roles), 0)
            except RowError:
                continue  # a template that wants a system turn first, say
            answer = (len(roles) - 1, False)
            if answer in structure.slots:
                footer = structure.segments[structure.slots.index(answer) + 1]
                return closing(footer, self._specials)[1]
        return None
