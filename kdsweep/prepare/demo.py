"""The embedded default: generated conversations, a Qwen-like chat tokenizer and tiny Qwen3 models.

The demo study runs the real code offline on a laptop CPU, and shows what distillation is for: a
teacher that knows more than the student's data. Everything is generated here, deterministically:
"name a ..." conversations (``messages`` rows) with several right answers per question; a corpus
of 20,000 of them on which the teacher (~660K parameters) is trained once and cached, as a
pretrained teacher would be; the 200-row train split and 1,000 held-out rows the study's students
(~80K parameters) see (shipped in ``studies/data/picks``); and a byte-level BPE tokenizer built
from the corpus with Qwen's ChatML chat template (``<|im_start|>`` and ``<|im_end|>`` special
tokens), through which the rows are rendered, as a Qwen model's are. Models and tokenizer are
saved under :func:`demo_dir`; a study names them ``demo:teacher`` and ``demo:student``.
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

from kdsweep.data import ChatTemplate, Conversation, make_batches, tokenize
from kdsweep.distill import train
from kdsweep.distill.evaluate import score
from kdsweep.distill.models import Vocabulary
from kdsweep.paths import atomic_folder, cache_dir
from kdsweep.study.config import TrainConfig

PREFIX = "demo:"  # a study's teacher or student named demo:teacher / demo:student
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

# Qwen2/Qwen3's pre-tokenizer pattern: digits stand alone, so numbers are read digit by digit.
_QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def demo_dir() -> Path:
    """The demo's tokenizer and trained models live here."""
    return cache_dir() / "demo"


# ---------------------------------------------------------------------------------------------
# Data: "name a ..." questions with several right answers

# Each category's members, most popular first; an answer is drawn with weight 1 / rank. Every
# question has several right answers and a most likely one: a teacher trained on a large corpus
# learns each category's whole answer distribution, while a student given a few hundred rows sees
# only a handful of sampled answers per category (some right answers never). That is where soft
# targets carry more than a sampled label, and where distillation can win on held-out rows.
CATEGORIES = {
    "fruit": "apple, banana, orange, grape, pear, mango, cherry, peach",
    "colour": "blue, red, green, purple, yellow, black, pink, white",
    "animal": "dog, cat, lion, horse, elephant, tiger, rabbit, bear",
    "vegetable": "carrot, potato, broccoli, tomato, onion, pea, cabbage, lettuce",
    "country": "France, Japan, Brazil, Canada, Italy, India, Egypt, Peru",
    "city": "Paris, London, Tokyo, Rome, Berlin, Cairo, Sydney, Madrid",
    "drink": "water, tea, coffee, milk, juice, lemonade, cocoa, soda",
    "sport": "football, tennis, basketball, golf, cricket, rugby, hockey, swimming",
    "instrument": "piano, guitar, violin, drums, flute, trumpet, harp, cello",
    "bird": "eagle, robin, sparrow, owl, parrot, crow, swan, penguin",
    "tree": "oak, pine, maple, birch, willow, palm, cedar, elm",
    "metal": "iron, gold, silver, copper, aluminium, tin, lead, zinc",
    "planet": "Mars, Jupiter, Saturn, Venus, Earth, Mercury, Neptune, Uranus",
    "month": "January, December, July, May, June, October, April, March",
    "day of the week": "Monday, Friday, Saturday, Sunday, Tuesday, Wednesday, Thursday",
    "season": "summer, winter, spring, autumn",
    "shape": "circle, square, triangle, rectangle, star, oval, hexagon, diamond",
    "flower": "rose, tulip, daisy, sunflower, lily, orchid, daffodil, poppy",
    "fish": "salmon, tuna, goldfish, shark, cod, trout, clownfish, carp",
    "tool": "hammer, screwdriver, saw, wrench, drill, pliers, shovel, axe",
    "vehicle": "car, bus, bicycle, train, truck, motorcycle, boat, plane",
    "body part": "hand, arm, head, leg, eye, nose, foot, ear",
    "language": "English, Spanish, French, Chinese, German, Japanese, Arabic, Hindi",
    "gas": "oxygen, hydrogen, helium, nitrogen, neon, argon",
    "insect": "ant, bee, butterfly, fly, beetle, mosquito, ladybird, grasshopper",
    "piece of furniture": "chair, table, sofa, bed, desk, shelf, wardrobe, stool",
    "vowel": "a, e, i, o, u",
    "prime number": "7, 3, 5, 2, 11, 13, 17, 19",
    "even number": "2, 4, 6, 8, 10, 12, 20, 100",
    "odd number": "3, 7, 5, 1, 9, 11, 13, 21",
    "dessert": "cake, ice cream, pie, cookie, pudding, brownie, tart, mousse",
    "cheese": "cheddar, brie, mozzarella, parmesan, gouda, feta, camembert, stilton",
    "dog breed": "labrador, poodle, beagle, bulldog, terrier, husky, collie, dachshund",
    "car brand": "Toyota, Ford, BMW, Honda, Tesla, Audi, Volvo, Fiat",
    "ocean": "Pacific, Atlantic, Indian, Arctic, Southern",
    "continent": "Asia, Africa, Europe, Australia, Antarctica",
    "river": "Nile, Amazon, Thames, Danube, Mississippi, Rhine, Ganges, Seine",
    "mountain": "Everest, Kilimanjaro, Fuji, Olympus, Elbrus, Denali, Matterhorn, Etna",
    "writer": "Shakespeare, Dickens, Austen, Tolstoy, Orwell, Twain, Homer, Hemingway",
    "painter": "Picasso, Monet, Rembrandt, Vermeer, Dali, Matisse, Turner, Goya",
    "composer": "Mozart, Beethoven, Bach, Chopin, Vivaldi, Handel, Haydn, Brahms",
    "scientist": "Einstein, Newton, Darwin, Curie, Galileo, Tesla, Faraday, Bohr",
    "dance": "waltz, tango, salsa, ballet, tap, jive, samba, polka",
    "board game": "chess, checkers, Monopoly, Scrabble, backgammon, go, Cluedo, Risk",
    "card game": "poker, bridge, snap, rummy, solitaire, blackjack, whist, canasta",
    "kind of weather": "rain, sun, snow, wind, fog, hail, storm, drizzle",
    "emotion": "happiness, anger, sadness, fear, joy, surprise, love, disgust",
    "piece of clothing": "shirt, jeans, dress, hat, jacket, sock, skirt, coat",
    "kitchen utensil": "spoon, fork, knife, whisk, ladle, spatula, pan, pot",
    "spice": "pepper, cinnamon, salt, ginger, cumin, paprika, nutmeg, saffron",
    "herb": "basil, mint, parsley, thyme, rosemary, oregano, sage, dill",
    "grain": "rice, wheat, corn, oats, barley, rye, millet, quinoa",
    "nut": "peanut, almond, walnut, cashew, hazelnut, pecan, pistachio, chestnut",
    "berry": "strawberry, blueberry, raspberry, blackberry, cranberry, gooseberry",
    "reptile": "snake, lizard, crocodile, turtle, alligator, gecko, iguana, chameleon",
    "sea mammal": "whale, dolphin, seal, walrus, otter, orca, manatee",
    "farm animal": "cow, pig, sheep, chicken, horse, goat, duck, donkey",
    "gemstone": "diamond, ruby, emerald, sapphire, pearl, opal, topaz, amethyst",
    "currency": "dollar, euro, pound, yen, rupee, franc, peso, rouble",
    "fabric": "cotton, wool, silk, linen, denim, leather, velvet, nylon",
    "school subject": "maths, English, science, history, art, music, geography, French",
    "job": "doctor, teacher, nurse, engineer, lawyer, chef, farmer, pilot",
    "room in a house": "kitchen, bedroom, bathroom, living room, hall, garage, attic, cellar",
    "hobby": "reading, painting, gardening, cooking, fishing, hiking, knitting, dancing",
    "breakfast food": "cereal, toast, eggs, porridge, pancakes, bacon, yoghurt, croissant",
}
_QUESTIONS = ("Name {a} {c}.", "Give me {a} {c}.", "Can you name {a} {c}?", "Tell me {a} {c}.")
TURNS = 2  # exchanges per row: two make the rows (almost) all distinct, and keep them short

CORPUS_ROWS, CORPUS_SEED = 20_000, 0  # the teacher's corpus: generated when the teacher is built
# Held out from both the corpus and the train split: the first half validates (the sweep selects
# on it), the second half tests (the verdict is measured on it).
HELD_OUT_ROWS, HELD_OUT_SEED = 1_000, 1
VALIDATION_ROWS = TEST_ROWS = HELD_OUT_ROWS // 2
# the study's students train on these (about 6 answers per category)
TRAIN_ROWS, TRAIN_SEED = (
    200,
    2,
)


Messages = list[dict[str, str]]  # a conversation as a messages row holds it: {role, content} turns


def generate_conversations(n: int, *, seed: int) -> list[Messages]:
    """``n`` conversations of two "name a ..." exchanges, the same for the same ``seed``.

    Example:
        >>> generate_conversations(1, seed=0)[0]  # doctest: +SKIP
        [{'role': 'user', 'content': 'Tell me a berry.'}, {'role': 'assistant', 'content':
        'blueberry'}, ...]
    """
    rng = random.Random(seed)
    names = list(CATEGORIES)
    conversations = []
    for _ in range(n):
        messages = []
        for category in rng.sample(names, TURNS):
            members = answers(category)
            answer = rng.choices(
                members, weights=[1 / rank for rank in range(1, len(members) + 1)]
            )[0]
            question = rng.choice(_QUESTIONS).format(
                a="an" if category[0] in "aeiou" else "a", c=category
            )
            messages += [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        conversations.append(messages)
    return conversations


def chatml(messages: Messages) -> str:
    """The conversation as :data:`CHAT_TEMPLATE` renders it."""
    return "".join(f"{TURN_START}{m['role']}\n{m['content']}{TURN_END}\n" for m in messages)


def answers(category: str) -> list[str]:
    """A category's right answers, most popular first."""
    return CATEGORIES[category].split(", ")


def splits() -> tuple[list[Messages], list[Messages], list[Messages]]:
    """The teacher's corpus, the students' train split and the held-out rows (validation, then
    test).

    Test rows are distinct, and none of them is in the corpus or the train split: evaluation
    measures what was learned about the categories, not memory of rows.
    """
    test = list(
        {
            _key(c): c for c in generate_conversations(2 * HELD_OUT_ROWS, seed=HELD_OUT_SEED)
        }.values()
    )[:HELD_OUT_ROWS]
    held_out = {_key(c) for c in test}
    corpus = [
        c for c in generate_conversations(CORPUS_ROWS, seed=CORPUS_SEED) if _key(c) not in held_out
    ]
    train = [
        c
        for c in generate_conversations(2 * TRAIN_ROWS, seed=TRAIN_SEED)
        if _key(c) not in held_out
    ][:TRAIN_ROWS]
    return corpus, train, test


def _key(messages: Messages) -> str:
    return json.dumps(messages)


def write_demo_data(folder: str | Path) -> None:
    """Write the students' ``train.jsonl`` and the held-out ``validation.jsonl`` and
    ``test.jsonl`` (a ``messages`` field per row) into ``folder``: what ``studies/data/picks``
    ships."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _, train, held_out = splits()
    validation, test = held_out[:VALIDATION_ROWS], held_out[VALIDATION_ROWS:]
    for name, rows in (
        ("train.jsonl", train),
        ("validation.jsonl", validation),
        ("test.jsonl", test),
    ):
        (folder / name).write_text(
            "".join(json.dumps({"messages": messages}) + "\n" for messages in rows)
        )


# ---------------------------------------------------------------------------------------------
# Tokenizer


def build_tokenizer(conversations: list[Messages]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``conversations`` as the chat template renders them,
    built the way Qwen's is.

    Bytes as the base alphabet (any text encodes, nothing is unknown), Qwen's pre-tokenizer
    pattern (digits one by one), no BOS token, ``<|endoftext|>`` as both EOS and padding token as
    in Qwen (the case where masking by token id would wrongly drop every real EOS), and ChatML's
    ``<|im_start|>`` and ``<|im_end|>`` as special tokens, the second closing every turn.
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
    trainer = trainers.BpeTrainer(
        vocab_size=MAX_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((chatml(c) for c in conversations), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        extra_special_tokens=[TURN_START, TURN_END],
        chat_template=CHAT_TEMPLATE,
    )


# ---------------------------------------------------------------------------------------------
# Models

# Shapes follow Qwen3-0.6B in kind (tied embeddings, grouped-query attention, SiLU MLP, q/k norms)
# at a size a 2-core CPU trains in seconds. With the demo vocabulary (about 1,700 tokens: every
# answer is one token) the teacher has about 660K parameters and the student about 80K, most of
# them its embeddings.
_TEACHER_SHAPE = {
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
    return _config(vocab_size, eos_token_id=eos_token_id, **_TEACHER_SHAPE)


def student_config(vocab_size: int, *, eos_token_id: int = EOS_TOKEN_ID) -> Qwen3Config:
    """The demo student: a Qwen3 of about 80K parameters, same vocabulary as the teacher."""
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
DEMO_VERSION = 3
TEACHER_TRAINING = {"max_steps": 500, "batch_size": 32, "learning_rate": 3e-3, "eval_every": 250}


def ensure_models() -> dict[str, Path]:
    """Folders of the demo teacher and student (with the tokenizer), built on first use.

    The teacher is trained on the demo's corpus, 100 times the students' train split, so that it
    knows the categories' answers better than the students' data can tell them. Workers racing
    to build it wait on a lock; the folder appears whole, by an atomic rename.
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
    corpus, _, test = splits()
    tokenizer = build_tokenizer(corpus)
    torch.manual_seed(0)
    student = Qwen3ForCausalLM(student_config(len(tokenizer)))
    teacher = Qwen3ForCausalLM(teacher_config(len(tokenizer)))
    console.print(
        f"building the demo teacher ({_count(teacher):,} parameters) in {root}: one-time, under "
        "a minute"
    )
    _train_teacher(teacher, tokenizer, corpus, test, console)
    for role, model in (("teacher", teacher), ("student", student)):
        with atomic_folder(folders[role]) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)


def _train_teacher(
    teacher, tokenizer, corpus: list[Messages], test: list[Messages], console
) -> None:
    """Plain next-token training (alpha 0) with kdsweep's own loop, on the whole corpus rendered
    through the chat template, questions included."""
    cfg = TEACHER_TRAINING
    chat = ChatTemplate(tokenizer, tokenizer.chat_template)
    split = tokenize(
        _conversations(corpus), tokenizer, max_length=64, assistant_only=False, chat=chat
    )
    test_rows = tokenize(
        _conversations(test[:256]), tokenizer, max_length=64, assistant_only=False, chat=chat
    )
    held_out = make_batches(
        test_rows,
        batch_size=64,
        pad_id=tokenizer.pad_token_id,
        shuffle_seed=None,
        group_by_length=True,
    )
    vocab = Vocabulary(
        size=len(tokenizer), teacher_rows=len(tokenizer), student_rows=len(tokenizer)
    )
    settings = train.DistillSettings(
        alpha=0.0,
        temperature=1.0,
        top_k=None,
        learning_rate=cfg["learning_rate"],
        train=TrainConfig(
            max_steps=cfg["max_steps"],
            batch_size=cfg["batch_size"],
            eval_every=cfg["eval_every"],
            log_every=100,
            warmup_ratio=0.05,
            device="cpu",
            select="last",
        ),
    )

    def held_out_perplexity(model, step: int) -> dict[str, float]:
        return {"ppl": score(model, held_out, vocab).perplexity}

    data = train.TrainingData(split, vocab, tokenizer.pad_token_id, held_out_perplexity)
    train.distill(teacher, settings, data, None, _Printed(console, cfg["max_steps"]))


class _Printed(train.TrialHooks):
    """The teacher's training as lines on the console."""

    def __init__(self, console: Console, steps: int):
        self.console, self.steps = console, steps

    def logged(self, log: train.StepLog) -> None:
        self.console.print(f"  teacher step {log.step}/{self.steps}: loss {log.loss:.3f}")

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        self.console.print(f"  teacher step {step}: held-out perplexity {metrics['ppl']:.2f}")


def _conversations(rows: list[Messages]) -> list[Conversation]:
    return [Conversation(tuple((m["role"], m["content"]) for m in messages)) for messages in rows]


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())
