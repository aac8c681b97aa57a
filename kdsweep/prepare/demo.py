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
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from transformers import Qwen3ForCausalLM

from kdsweep.errors import UsageError
from kdsweep.paths import cache_dir
from kdsweep.prepare import demo_reasoning
from kdsweep.prepare.demo_models import (
    Messages,
    build_once,
    build_tokenizer,
    folders,
    parameters,
    student_config,
    teacher_config,
    train_and_save,
)

PREFIX = "demo:"  # a study's teacher or student named demo:teacher / demo:student


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


# ---------------------------------------------------------------- the demo's models, built once

# Bump when the demo data, tokenizer, configs or teacher training change: it names the cache.
DEMO_VERSION = 3
TEACHER_TRAINING = {"max_steps": 500, "batch_size": 32, "learning_rate": 3e-3, "eval_every": 250}


def ensure_models() -> dict[str, Path]:
    """Folders of the demo teacher and student (with the tokenizer), built on first use.

    The teacher is trained on the demo's corpus, 100 times the students' train split, so that it
    knows the categories' answers better than the students' data can tell them.
    """
    return build_once(_models_root(), _build_models)


def location(name: str) -> str:
    """The folder of a demo model, built on first use: ``demo:teacher`` or ``demo:student``, or
    the reasoning demo's ``demo:reasoning-teacher`` or ``demo:reasoning-student``."""
    root, build, role = _demo(name)
    return str(build_once(root, build)[role])


def is_demo(name: str) -> bool:
    return name.startswith(PREFIX)


def built(name: str) -> bool:
    """Whether the demo model ``name`` is built already (``location`` would not build it)."""
    root, _, role = _demo(name)
    return (folders(root)[role] / "config.json").exists()


def _demo(name: str) -> tuple[Path, Callable[[dict[str, Path]], None], str]:
    """Where a demo model is kept, how its demo builds it, and its role there."""
    role = name.removeprefix(PREFIX)
    if role in ("teacher", "student"):
        return _models_root(), _build_models, role
    if role.removeprefix(demo_reasoning.PREFIX) in ("teacher", "student"):
        return (
            demo_reasoning.models_root(),
            demo_reasoning.build_models,
            role.removeprefix(demo_reasoning.PREFIX),
        )
    raise UsageError(
        f"unknown demo model {name!r}; use demo:teacher and demo:student, or "
        "demo:reasoning-teacher and demo:reasoning-student"
    )


def _models_root() -> Path:
    return demo_dir() / f"v{DEMO_VERSION}"


def _build_models(folders: dict[str, Path]) -> None:
    console = Console(stderr=True)
    corpus, _, test = splits()
    tokenizer = build_tokenizer(corpus)
    torch.manual_seed(0)
    student = Qwen3ForCausalLM(student_config(len(tokenizer)))
    teacher = Qwen3ForCausalLM(teacher_config(len(tokenizer)))
    console.print(
        f"building the demo teacher ({parameters(teacher):,} parameters) in "
        f"{folders['teacher'].parent}: one-time, under a minute"
    )
    train_and_save(
        folders,
        teacher,
        student,
        tokenizer,
        corpus,
        test,
        settings=TEACHER_TRAINING,
        console=console,
    )
