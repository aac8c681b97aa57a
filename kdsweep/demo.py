"""The embedded default: generated arithmetic data, a Qwen-like tokenizer and tiny Qwen3 models.

The demo study runs the real code offline on a laptop CPU. Everything it needs is generated here
deterministically: guanaco-format arithmetic rows (shipped in ``studies/data/arithmetic``), a
byte-level BPE tokenizer built from them, and the configurations of a small teacher (~1.8M
parameters) and a much smaller student (~57K). Models and tokenizer are saved under
:func:`demo_dir`; a study names them ``demo:teacher`` and ``demo:student``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from filelock import FileLock
from rich.console import Console
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from kdsweep import train
from kdsweep.config import TrainConfig
from kdsweep.data import make_batches, tokenize
from kdsweep.evaluate import score
from kdsweep.models import Vocabulary
from kdsweep.paths import atomic_folder, cache_dir

PREFIX = "demo:"  # a study's teacher or student named demo:teacher / demo:student
EOS_TOKEN = "<|endoftext|>"  # Qwen's end-of-text token, also its padding token
EOS_TOKEN_ID = 0  # build_tokenizer gives the special token the first id
MAX_VOCAB_SIZE = 512  # bytes + the special token + merges; on the demo rows the merges run out at 321
TRAIN_ROWS, TRAIN_SEED = 2000, 0
TEST_ROWS, TEST_SEED = 200, 1

# Qwen2/Qwen3's pre-tokenizer pattern: digits stand alone, so numbers are read digit by digit.
_QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def demo_dir() -> Path:
    """The demo's tokenizer and trained models live here."""
    return cache_dir() / "demo"


# ---------------------------------------------------------------------------------------------
# Data


# Question phrasings, and for each the weights of the three answer phrasings below. The answer's
# first token is uncertain but not random, so a trained teacher's distribution over it carries
# information that a one-hot label does not: the signal distillation is supposed to transfer.
_QUESTIONS = (
    ("What is {a} {op} {b}?", (6, 3, 1)),
    ("Compute {a} {op} {b}.", (8, 1, 1)),
    ("How much is {a} {word} {b}?", (2, 6, 2)),
    ("{a} {op} {b} = ?", (1, 2, 7)),
)
_ANSWERS = ("{a} {op} {b} = {c}.", "The answer is {c}.", "{c}")
_FOLLOW_UPS = ("And {word} {b}?", "Now {word} {b}.")
_WORDS = {"+": "plus", "-": "minus", "*": "times"}
_TWO_TURN_SHARE = 0.15


def generate_rows(n: int, *, seed: int) -> list[str]:
    """``n`` arithmetic exchanges in guanaco format, the same for the same ``seed``.

    Example:
        >>> generate_rows(1, seed=0)[0]  # doctest: +SKIP
        '### Human: What is 37 + 48?### Assistant: 37 + 48 = 85.'
    """
    rng = random.Random(seed)
    return [_row(rng) for _ in range(n)]


def _row(rng: random.Random) -> str:
    op = rng.choice("+-*")
    a, b = _operands(rng, op)
    text, result = _exchange(rng, rng.choice(_QUESTIONS), a=a, op=op, b=b)
    if rng.random() < _TWO_TURN_SHARE:
        # The follow-up works on the previous result, which the model must carry over.
        follow_up = (rng.choice(_FOLLOW_UPS), (8, 2, 0))
        more, _ = _exchange(rng, follow_up, a=result, op=rng.choice("+*"), b=rng.randint(2, 9))
        text += more
    return text


def _operands(rng: random.Random, op: str) -> tuple[int, int]:
    if op == "*":
        return rng.randint(2, 12), rng.randint(2, 12)
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return (max(a, b), min(a, b)) if op == "-" else (a, b)  # no negative results


def _exchange(
    rng: random.Random, question: tuple[str, tuple[int, ...]], *, a: int, op: str, b: int
) -> tuple[str, int]:
    """One human/assistant turn pair, and the number it answers."""
    pattern, weights = question
    c = {"+": a + b, "-": a - b, "*": a * b}[op]
    values = {"a": a, "op": op, "word": _WORDS[op], "b": b, "c": c}
    answer = rng.choices(_ANSWERS, weights=weights)[0]
    return f"### Human: {pattern.format(**values)}### Assistant: {answer.format(**values)}", c


def write_demo_data(folder: str | Path) -> None:
    """Write ``train.jsonl`` and ``test.jsonl`` (a ``text`` field per row) into ``folder``.

    Test rows never repeat a training row, so evaluation measures more than memory.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train = generate_rows(TRAIN_ROWS, seed=TRAIN_SEED)
    seen = set(train)
    # Draw extra rows so that enough remain once those also in train are left out.
    test = [row for row in generate_rows(4 * TEST_ROWS, seed=TEST_SEED) if row not in seen]
    test = list(dict.fromkeys(test))[:TEST_ROWS]
    _write_jsonl(folder / "train.jsonl", train)
    _write_jsonl(folder / "test.jsonl", test)


def _write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))


# ---------------------------------------------------------------------------------------------
# Tokenizer


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``, built the way Qwen's is.

    Bytes as the base alphabet (any text encodes, nothing is unknown), Qwen's pre-tokenizer
    pattern (digits one by one), no BOS token, and ``<|endoftext|>`` as both EOS and padding token
    as in Qwen: the case where masking by token id would wrongly drop every real EOS.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=MAX_VOCAB_SIZE,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


# ---------------------------------------------------------------------------------------------
# Models

# Shapes follow Qwen3-0.6B in kind (tied embeddings, grouped-query attention, SiLU MLP, q/k norms)
# at a size a 2-core CPU trains in minutes. With the demo vocabulary (321 tokens) the teacher has
# about 1.8M parameters and the student about 57K, a quarter of them its embeddings.
_TEACHER_SHAPE = {"hidden_size": 128, "intermediate_size": 448, "num_hidden_layers": 8,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}
_STUDENT_SHAPE = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                  "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 24}
MAX_POSITIONS = 256  # the longest demo row is about 50 tokens


def teacher_config(vocab_size: int, *, eos_token_id: int = EOS_TOKEN_ID) -> Qwen3Config:
    """The demo teacher: a Qwen3 of about 1.8M parameters."""
    return _config(vocab_size, eos_token_id=eos_token_id, **_TEACHER_SHAPE)


def student_config(vocab_size: int, *, eos_token_id: int = EOS_TOKEN_ID) -> Qwen3Config:
    """The demo student: a Qwen3 of about 57K parameters, same vocabulary as the teacher."""
    return _config(vocab_size, eos_token_id=eos_token_id, **_STUDENT_SHAPE)


def _config(vocab_size: int, *, eos_token_id: int, **shape: int) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=vocab_size,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,  # as in Qwen3-0.6B; untied, the student would grow by a quarter
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,  # Qwen pads with its EOS token
        bos_token_id=None,
        **shape,
    )


# ---------------------------------------------------------------- the demo's models, built once

# Bump when the demo data, tokenizer, configs or teacher training change: it names the cache.
DEMO_VERSION = 1
TEACHER_TRAINING = {"max_steps": 500, "batch_size": 32, "learning_rate": 3e-3, "eval_every": 250}


def ensure_models() -> dict[str, Path]:
    """Folders of the demo teacher and student (with the tokenizer), built on first use.

    The teacher is trained on the demo's train rows so that distilling from it means something.
    Workers racing to build it wait on a lock; the folder appears whole, by an atomic rename.
    """
    root = demo_dir() / f"v{DEMO_VERSION}"
    folders = {"teacher": root / "teacher", "student": root / "student"}
    if all((f / "config.json").exists() for f in folders.values()):
        return folders
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / ".lock"):
        if not all((f / "config.json").exists() for f in folders.values()):
            _build_models(root, folders)
    return folders


def location(name: str) -> str:
    """The folder of ``demo:teacher`` or ``demo:student``, built on first use."""
    return str(ensure_models()[name.removeprefix(PREFIX)])


def _build_models(root: Path, folders: dict[str, Path]) -> None:
    console = Console(stderr=True)
    texts = generate_rows(TRAIN_ROWS, seed=TRAIN_SEED)  # the rows shipped in studies/data/arithmetic
    tokenizer = build_tokenizer(texts)
    torch.manual_seed(0)
    student = Qwen3ForCausalLM(student_config(len(tokenizer)))
    teacher = Qwen3ForCausalLM(teacher_config(len(tokenizer)))
    console.print(f"building the demo teacher ({_count(teacher):,} parameters) in {root}: one-time, about two minutes")
    _train_teacher(teacher, tokenizer, texts, console)
    for role, model in (("teacher", teacher), ("student", student)):
        with atomic_folder(folders[role]) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)


def _train_teacher(teacher, tokenizer, texts: list[str], console) -> None:
    """Plain next-token training (alpha 0) with kdsweep's own loop."""
    cfg = TEACHER_TRAINING
    split = tokenize(texts, tokenizer, max_length=64, assistant_only=False)
    test_rows = tokenize(generate_rows(256, seed=TEST_SEED), tokenizer, max_length=64, assistant_only=False)
    held_out = make_batches(test_rows, batch_size=64, pad_id=tokenizer.pad_token_id, shuffle_seed=None, group_by_length=True)
    vocab = Vocabulary(size=len(tokenizer), teacher_rows=len(tokenizer), student_rows=len(tokenizer))
    settings = train.DistillSettings(
        alpha=0.0,
        temperature=1.0,
        top_k=None,
        learning_rate=cfg["learning_rate"],
        train=TrainConfig(max_steps=cfg["max_steps"], batch_size=cfg["batch_size"], eval_every=cfg["eval_every"], log_every=100, warmup_ratio=0.05, device="cpu"),
    )
    train.distill(
        teacher,
        split,
        None,
        settings,
        vocab=vocab,
        pad_id=tokenizer.pad_token_id,
        evaluate=lambda model, step: {"ppl": score(model, held_out, vocab).perplexity},
        on_log=lambda log: console.print(f"  teacher step {log.step}/{cfg['max_steps']}: loss {log.loss:.3f}"),
        on_eval=lambda step, m: console.print(f"  teacher step {step}: held-out perplexity {m['ppl']:.2f}"),
    )


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())
