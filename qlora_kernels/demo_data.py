"""The demo's classification task: topic of a short English sentence (sports, technology, food,
weather), written for this project from templates.

Deterministic: the same examples and the same train/eval split on every machine. The eval split
uses sentence templates the training split never shows, so eval accuracy measures more than
memorised phrasing.
"""

from __future__ import annotations

import itertools
import random

LABELS = ("sports", "technology", "food", "weather")

# Per topic: subjects (who/what the sentence is about) and happenings (what happened).
_TOPICS = {
    "sports": (
        ["the home team", "our striker", "the goalkeeper", "the tennis champion", "the marathon runner",
         "the basketball coach", "the young sprinter", "the cycling squad", "the rugby captain",
         "the swim team", "the boxer", "the league leaders"],
        ["won the final in extra time", "scored twice in the second half", "broke the national record",
         "was sent off after a foul", "signed a new contract with the club", "lost the match on penalties",
         "trained hard before the championship", "lifted the trophy", "missed the tournament with an injury",
         "finished first in the race"],
    ),
    "technology": (
        ["the new phone", "the software update", "the startup", "the chip maker", "our laptop",
         "the search engine", "the robot", "the web browser", "the video game console",
         "the programming language", "the smart watch", "the operating system"],
        ["shipped a faster processor", "fixed a security bug", "crashed after the latest patch",
         "released a new version of its app", "doubled the battery life", "added support for wireless charging",
         "was hacked last night", "launched an online store", "runs the code twice as fast",
         "now ships with more memory"],
    ),
    "food": (
        ["the bakery", "my grandmother's soup", "the new restaurant", "the chef", "the pasta dish",
         "the chocolate cake", "the street vendor", "the vegetarian menu", "the coffee shop",
         "the curry", "the pizza place", "the farmers market"],
        ["tasted sweet and spicy", "serves fresh bread every morning", "burned the garlic",
         "uses tomatoes from the garden", "was too salty for me", "opened a second kitchen",
         "won a prize for its dessert", "ran out of cheese", "cooks everything in olive oil",
         "sells the best dumplings in town"],
    ),
    "weather": (
        ["the storm", "the morning fog", "the heat wave", "the forecast", "the cold front",
         "the hurricane", "the spring rain", "the snowfall", "the wind", "the thunderstorm",
         "the drought", "the sunny spell"],
        ["brought heavy rain to the coast", "closed the mountain roads", "kept temperatures below freezing",
         "is expected to clear by noon", "flooded the low streets", "caused power cuts in the north",
         "made the afternoon hot and humid", "left ice on the bridges", "moved east overnight",
         "dried out the fields"],
    ),
}

# The last three templates are held out for the eval split.
_TEMPLATES = (
    "{s} {h}.",
    "Yesterday {s} {h}.",
    "I read that {s} {h}.",
    "Everyone is talking about how {s} {h}.",
    "According to the news, {s} {h}.",
    "Did you hear? {s} {h}!",
    "It seems {s} {h} again.",
    "My friend told me {s} {h}.",
    "Breaking: {s} {h}.",
    "Last week {s} {h}, people say.",
    "Believe it or not, {s} {h}.",
    "Reports confirm that {s} {h}.",
)
_EVAL_TEMPLATES = 3
TRAIN_PER_CLASS = 160
EVAL_PER_CLASS = 50


def _sentences(label: str, templates, rng: random.Random, count: int) -> list[str]:
    subjects, happenings = _TOPICS[label]
    combos = list(itertools.product(templates, subjects, happenings))
    rng.shuffle(combos)
    out = []
    for t, s, h in combos[:count]:
        text = t.format(s=s, h=h)
        out.append(text[0].upper() + text[1:])
    return out


def load_splits(seed: int = 0) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, eval): lists of (sentence, label index); 640 and 200 examples, classes balanced."""
    rng = random.Random(seed)
    train_t, eval_t = _TEMPLATES[:-_EVAL_TEMPLATES], _TEMPLATES[-_EVAL_TEMPLATES:]
    train, evals = [], []
    for i, label in enumerate(LABELS):
        train += [(s, i) for s in _sentences(label, train_t, rng, TRAIN_PER_CLASS)]
        evals += [(s, i) for s in _sentences(label, eval_t, rng, EVAL_PER_CLASS)]
    rng.shuffle(train)
    rng.shuffle(evals)
    return train, evals
