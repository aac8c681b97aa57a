"""The demos' tokenizer and tiny Qwen3 models, built the way Qwen's are, and the training of a
demo's teacher on its corpus (once: each demo caches its models).

The tokenizer is byte-level BPE trained on the demo's conversations, with Qwen's pre-tokenizer
and its end-of-text token as padding; with ChatML's plainest template (the demo), or with Qwen3's
added tokens, their special flags and Qwen3's published chat template (the reasoning demo, and
the tests of reasoning). The models follow Qwen3-0.6B in kind at a size a 2-core CPU trains in
seconds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock
from rich.console import Console
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from kdsweep.data import ChatTemplate, Conversation, make_batches, split_reasoning, tokenize
from kdsweep.data.formats import ASSISTANT
from kdsweep.distill import train
from kdsweep.distill.evaluate import score
from kdsweep.distill.models import Vocabulary
from kdsweep.paths import atomic_folder
from kdsweep.study.config import TrainConfig

Messages = list[dict[str, str]]  # a conversation as a messages row holds it: {role, content} turns

EOS_TOKEN = "<|endoftext|>"  # Qwen's end-of-text token, also its padding token
EOS_TOKEN_ID = 0  # build_tokenizer gives the special tokens the first ids, in this order
# ChatML's, as Qwen's chat template writes them
TURN_START, TURN_END = (
    "<|im_start|>",
    "<|im_end|>",
)
SPECIAL_TOKENS = (EOS_TOKEN, TURN_START, TURN_END)
# Bytes, the special tokens and merges; on the demo corpus the merges run out first.
MAX_VOCAB_SIZE = 2048
# Qwen's chat template in its plainest form (no tools, no thinking): each turn between <|im_start|>
# and <|im_end|>, and the generation prompt that opens an assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen3's added tokens (ids 151643 to 151668 in its tokenizer), in its order, each with its
# special flag: decode(skip_special_tokens=True) drops the special ones and keeps the others, so
# <think> and </think>, single tokens, survive decoding as Qwen3's do.
QWEN3_ADDED_TOKENS = {
    "<|endoftext|>": True,
    "<|im_start|>": True,
    "<|im_end|>": True,
    **dict.fromkeys(
        (
            "<|object_ref_start|>",
            "<|object_ref_end|>",
            "<|box_start|>",
            "<|box_end|>",
            "<|quad_start|>",
            "<|quad_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|vision_pad|>",
            "<|image_pad|>",
            "<|video_pad|>",
        ),
        True,
    ),
    **dict.fromkeys(
        (
            "<tool_call>",
            "</tool_call>",
            "<|fim_prefix|>",
            "<|fim_middle|>",
            "<|fim_suffix|>",
            "<|fim_pad|>",
            "<|repo_name|>",
            "<|file_sep|>",
            "<tool_response>",
            "</tool_response>",
            "<think>",
            "</think>",
        ),
        False,
    ),
}
# Qwen3's chat template as published (with its thinking and tool-call branches).
QWEN3_CHAT_TEMPLATE = (Path(__file__).parent / "qwen3_chat_template.jinja").read_text()

# Qwen2/Qwen3's pre-tokenizer pattern: digits stand alone, so numbers are read digit by digit.
_QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def chatml(messages: Messages) -> str:
    """The conversation as :data:`CHAT_TEMPLATE` renders it."""
    return "".join(f"{TURN_START}{m['role']}\n{m['content']}{TURN_END}\n" for m in messages)


def build_tokenizer(
    conversations: list[Messages], *, qwen3: bool = False
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``conversations`` as the chat template renders them,
    built the way Qwen's is.

    Bytes as the base alphabet (any text encodes, nothing is unknown), Qwen's pre-tokenizer
    pattern (digits one by one), no BOS token, ``<|endoftext|>`` as both EOS and padding token as
    in Qwen (the case where masking by token id would wrongly drop every real EOS), and ChatML's
    ``<|im_start|>`` and ``<|im_end|>`` as special tokens, the second closing every turn.

    With ``qwen3``, it is Qwen3's in all but its merges: Qwen3's added tokens with their special
    flags (:data:`QWEN3_ADDED_TOKENS`), ``<|im_end|>`` as EOS and ``<|endoftext|>`` as padding,
    and Qwen3's published chat template (:data:`QWEN3_CHAT_TEMPLATE`).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    added = QWEN3_ADDED_TOKENS if qwen3 else dict.fromkeys(SPECIAL_TOKENS, True)
    trainer = trainers.BpeTrainer(
        vocab_size=MAX_VOCAB_SIZE,
        special_tokens=list(
            added
        ),  # kept whole, out of the merges; the trainer flags them special
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((chatml(c) for c in conversations), trainer=trainer)
    tokenizer = _flagged(tokenizer, added)
    specials = [token for token, special in added.items() if special]
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=TURN_END if qwen3 else EOS_TOKEN,
        pad_token=EOS_TOKEN,
        extra_special_tokens=[t for t in specials if t != EOS_TOKEN],
        chat_template=QWEN3_CHAT_TEMPLATE if qwen3 else CHAT_TEMPLATE,
    )


def _flagged(tokenizer: Tokenizer, special: dict[str, bool]) -> Tokenizer:
    """The tokenizer with its added tokens' special flags as given (its trainer sets them all)."""
    state = json.loads(tokenizer.to_str())
    for token in state["added_tokens"]:
        token["special"] = special[token["content"]]
    return Tokenizer.from_str(json.dumps(state))


# Shapes follow Qwen3-0.6B in kind (tied embeddings, grouped-query attention, SiLU MLP, q/k norms)
# at a size a 2-core CPU trains in seconds. With the demo vocabulary (about 1,700 tokens: every
# answer is one token) the teacher has about 660K parameters and the student about 80K, most of
# them its embeddings.
TEACHER_SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 448,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
}
_STUDENT_SHAPE = {
    "hidden_size": 32,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
}
MAX_POSITIONS = 256  # the longest demo row is about 30 tokens


def teacher_config(vocab_size: int, *, eos_token_id: int = EOS_TOKEN_ID) -> Qwen3Config:
    """The demo teacher: a Qwen3 of about 660K parameters."""
    return config(vocab_size, TEACHER_SHAPE, eos_token_id=eos_token_id)


def student_config(vocab_size: int, *, eos_token_id: int = EOS_TOKEN_ID) -> Qwen3Config:
    """The demo student: a Qwen3 of about 80K parameters, same vocabulary as the teacher."""
    return config(vocab_size, _STUDENT_SHAPE, eos_token_id=eos_token_id)


def config(
    vocab_size: int, shape: dict, *, eos_token_id: int, pad_token_id: int | None = None
) -> Qwen3Config:
    """A Qwen3 of ``shape``; padded with its EOS token, as Qwen pads, unless told otherwise."""
    return Qwen3Config(
        vocab_size=vocab_size,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,  # as in Qwen3-0.6B; untied, the student would grow by a quarter
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id if pad_token_id is None else pad_token_id,
        bos_token_id=None,
        **shape,
    )


# ---------------------------------------------------------------------------------------------
# A demo's models, built once


def build_once(root: Path, build: Callable[[dict[str, Path]], None]) -> dict[str, Path]:
    """The folders of a demo's teacher and student under ``root``, which ``build`` fills on first
    use. Workers racing to build them wait on a lock; a folder appears whole, by an atomic
    rename (``save``)."""
    found = folders(root)
    if all((f / "config.json").exists() for f in found.values()):
        return found
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / ".lock"):
        if not all((f / "config.json").exists() for f in found.values()):
            build(found)
    return found


def folders(root: Path) -> dict[str, Path]:
    """A demo's teacher and student folders under ``root``."""
    return {"teacher": root / "teacher", "student": root / "student"}


def train_and_save(
    folders: dict[str, Path],
    teacher: Qwen3ForCausalLM,
    student: Qwen3ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    corpus: list[Messages],
    held_out: list[Messages],
    *,
    settings: dict,
    console: Console,
) -> None:
    """A demo's models: the teacher trained (:func:`train_teacher`, on rows of up to 64 tokens,
    as the demo studies read them), then it and the untrained student saved, each folder whole
    with the tokenizer."""
    train_teacher(
        teacher, tokenizer, corpus, held_out, settings=settings, max_length=64, console=console
    )
    for role, model in (("teacher", teacher), ("student", student)):
        with atomic_folder(folders[role]) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)


def train_teacher(
    teacher: Qwen3ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    corpus: list[Messages],
    held_out: list[Messages],
    *,
    settings: dict,
    max_length: int,
    console: Console,
) -> None:
    """Plain next-token training (alpha 0) with kdsweep's own loop on the whole corpus rendered
    through the chat template, questions and reasoning included; ``settings`` holds
    ``max_steps``, ``batch_size``, ``learning_rate`` and ``eval_every`` (steps between held-out
    perplexities)."""
    chat = ChatTemplate(tokenizer, tokenizer.chat_template)
    split, held_out_split = (
        tokenize(
            conversations(rows), tokenizer, max_length=max_length, assistant_only=False, chat=chat
        )
        for rows in (corpus, held_out[:256])
    )
    held_out_batches = make_batches(
        held_out_split,
        batch_size=64,
        pad_id=tokenizer.pad_token_id,
        shuffle_seed=None,
        group_by_length=True,
    )
    vocab = Vocabulary(
        size=len(tokenizer), teacher_rows=len(tokenizer), student_rows=len(tokenizer)
    )
    steps = settings["max_steps"]
    train.distill(
        teacher,
        train.DistillSettings(
            alpha=0.0,
            temperature=1.0,
            top_k=None,
            learning_rate=settings["learning_rate"],
            train=TrainConfig(
                max_steps=steps,
                batch_size=settings["batch_size"],
                eval_every=settings["eval_every"],
                log_every=100,
                warmup_ratio=0.05,
                device="cpu",
                select="last",  # the teacher as trained; its held-out perplexity is shown
            ),
        ),
        train.TrainingData(
            split,
            vocab,
            tokenizer.pad_token_id,
            lambda model, step: {"ppl": score(model, held_out_batches, vocab).perplexity},
        ),
        None,
        _Progress(console, steps),
    )


class _Progress(train.TrialHooks):
    """The teacher's training, as lines on the console."""

    def __init__(self, console: Console, steps: int):
        self.console, self.steps = console, steps

    def logged(self, log: train.StepLog) -> None:
        self.console.print(f"  teacher step {log.step}/{self.steps}: loss {log.loss:.3f}")

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        self.console.print(f"  teacher step {step}: held-out perplexity {metrics['ppl']:.2f}")


def conversations(rows: list[Messages]) -> list[Conversation]:
    """Messages rows as kdsweep reads them: an assistant's inline reasoning kept apart."""
    return [_conversation(messages) for messages in rows]


def _conversation(messages: Messages) -> Conversation:
    turns, reasoning = [], []
    for m in messages:
        thought, content = (
            split_reasoning(m["content"]) if m["role"] == ASSISTANT else ("", m["content"])
        )
        turns.append((m["role"], content))
        reasoning.append(thought)
    return Conversation(tuple(turns), reasoning=tuple(reasoning))


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
