"""The demo zoo's tasks: short generated input/target pairs a 135M model learns in a few steps.

Each task phrases its inputs as a user would (the retriever embeds them) and answers
with a short exact string, so exact match, BLEU or ROUGE can score it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Callable

Example = tuple[str, str]  # (user input, target answer)


@dataclass(frozen=True)
class Task:
    name: str
    domain: str
    metric: str  # "em" | "bleu" | "rouge"
    make: Callable[[random.Random], Example]

    def examples(self, n: int, seed: int) -> list[Example]:
        """n distinct examples; the same seed gives the same list."""
        rng = random.Random(f"{self.name}/{seed}")
        seen: dict[str, str] = {}
        for _ in range(50 * n):
            inputs, target = self.make(rng)
            seen.setdefault(inputs, target)
            if len(seen) == n:
                return list(seen.items())
        raise ValueError(f"task {self.name}: cannot generate {n} distinct examples")


WORDS = (
    "apple river stone cloud garden pencil window orange silver forest candle rocket "
    "bridge castle dragon flower guitar island jacket ladder market planet summer tiger "
    "violet winter yellow basket butter coffee doctor engine farmer hammer"
).split()

# --- strings ---------------------------------------------------------------------------


def _uppercase(rng: random.Random) -> Example:
    phrase = " ".join(rng.sample(WORDS, rng.randint(2, 3)))
    return f"Write this in capital letters: {phrase}", phrase.upper()


def _acronym(rng: random.Random) -> Example:
    phrase = " ".join(rng.sample(WORDS, rng.randint(3, 4)))
    return f"Make an acronym from the first letters of: {phrase}", "".join(w[0] for w in phrase.split()).upper()


def _last_word(rng: random.Random) -> Example:
    phrase = " ".join(rng.sample(WORDS, rng.randint(3, 5)))
    return f"Which word comes last in this list? {phrase}", phrase.split()[-1]


# --- arithmetic ------------------------------------------------------------------------


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(10, 49), rng.randint(10, 49)
    return f"Add {a} and {b}.", str(a + b)


def _subtract(rng: random.Random) -> Example:
    a, b = rng.randint(20, 99), rng.randint(1, 9)
    return f"What is {a} minus {b}?", str(a - b)


def _double(rng: random.Random) -> Example:
    a = rng.randint(5, 149)
    return f"What is double {a}?", str(2 * a)


# --- a made-up language (Velo) ---------------------------------------------------------

VELO = {
    "the": "ka", "cat": "miru", "dog": "tovo", "bird": "pilu", "sees": "nami", "eats": "gora",
    "big": "bun", "small": "tik", "red": "rosa", "fish": "suvi", "house": "dela", "tree": "arbo",
}
_NOUNS = ["cat", "dog", "bird", "fish", "house", "tree"]
_ADJS = ["big", "small", "red"]
_VERBS = ["sees", "eats"]


def _english_sentence(rng: random.Random) -> str:
    subject, obj = rng.sample(_NOUNS, 2)
    words = ["the", rng.choice(_ADJS), subject, rng.choice(_VERBS), "the", obj]
    if rng.random() < 0.5:
        del words[1]  # no adjective
    return " ".join(words)


def _velo(english: str) -> str:
    return " ".join(VELO[w] for w in english.split())


def _to_velo(rng: random.Random) -> Example:
    english = _english_sentence(rng)
    return f"Translate into Velo: {english}", _velo(english)


def _from_velo(rng: random.Random) -> Example:
    english = _english_sentence(rng)
    return f"What does this Velo sentence mean in English? {_velo(english)}", english


def _velo_words(rng: random.Random) -> Example:
    words = rng.sample(list(VELO), 2)
    return f"Give the Velo words for: {words[0]}, {words[1]}", " ".join(VELO[w] for w in words)


# --- sentiment from a lexicon ----------------------------------------------------------

POSITIVE = "wonderful great delicious friendly lovely excellent fresh amazing".split()
NEGATIVE = "terrible awful rude cold broken boring dirty disappointing".split()
THINGS = "food service room staff movie music hotel coffee".split()
EMOTIONS = {
    "joy": "thrilled delighted cheerful overjoyed".split(),
    "anger": "furious annoyed outraged irritated".split(),
    "sadness": "heartbroken miserable gloomy lonely".split(),
    "fear": "terrified nervous frightened anxious".split(),
}


def _review_sentiment(rng: random.Random) -> Example:
    label = rng.choice(["positive", "negative"])
    adjective = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
    return f"Is this review positive or negative? The {rng.choice(THINGS)} was {adjective}.", label


def _emotion(rng: random.Random) -> Example:
    label = rng.choice(list(EMOTIONS))
    subject = rng.choice(["I am", "I feel", "Today I was", "Honestly I'm"])
    degree = rng.choice(["", "so ", "really ", "a bit "])
    return f"Name the emotion in this message: {subject} {degree}{rng.choice(EMOTIONS[label])}.", label


def _star_rating(rng: random.Random) -> Example:
    n_good = rng.randint(0, 2)
    words = rng.sample(POSITIVE, n_good) + rng.sample(NEGATIVE, 2 - n_good)
    rng.shuffle(words)
    stars = {0: "1", 1: "3", 2: "5"}[n_good]
    return f"Rate this comment from 1 to 5 stars: {words[0]} and {words[1]}.", stars


# --- dates -----------------------------------------------------------------------------

MONTHS = "January February March April May June July August September October November December".split()


def _random_date(rng: random.Random) -> date:
    return date(2000, 1, 1) + timedelta(days=rng.randrange(365 * 30))


def _to_iso(rng: random.Random) -> Example:
    d = _random_date(rng)
    return f"Convert to ISO format: {MONTHS[d.month - 1]} {d.day}, {d.year}", d.isoformat()


def _iso_to_us(rng: random.Random) -> Example:
    d = _random_date(rng)
    return f"Rewrite {d.isoformat()} in US date format.", f"{d.month:02d}/{d.day:02d}/{d.year}"


def _month_name(rng: random.Random) -> Example:
    d = _random_date(rng)
    return f"Which month is the date {d.isoformat()} in?", MONTHS[d.month - 1]


TASKS: tuple[Task, ...] = (
    Task("uppercase", "strings", "em", _uppercase),
    Task("acronym", "strings", "em", _acronym),
    Task("last_word", "strings", "em", _last_word),
    Task("add", "arithmetic", "em", _add),
    Task("subtract", "arithmetic", "em", _subtract),
    Task("double", "arithmetic", "em", _double),
    Task("to_velo", "velo_language", "bleu", _to_velo),
    Task("from_velo", "velo_language", "rouge", _from_velo),
    Task("velo_words", "velo_language", "em", _velo_words),
    Task("review_sentiment", "sentiment", "em", _review_sentiment),
    Task("emotion", "sentiment", "em", _emotion),
    Task("star_rating", "sentiment", "em", _star_rating),
    Task("to_iso_date", "dates", "em", _to_iso),
    Task("iso_to_us_date", "dates", "em", _iso_to_us),
    Task("month_name", "dates", "em", _month_name),
)

TASKS_BY_NAME = {t.name: t for t in TASKS}

# --- held-out tasks: no adapter is trained for them -----------------------------------
# "composed": the answer needs two zoo skills in turn, or a zoo format over another domain's
# content; "paraphrased": a zoo task asked in words its card never uses. Only queries are
# made of them (`loraretriever demo held-out`), to see what composition does beyond the zoo.


def _month_upper(rng: random.Random) -> Example:
    d = _random_date(rng)
    return f"Which month is the date {d.isoformat()} in? Answer in capital letters.", MONTHS[d.month - 1].upper()


def _velo_upper(rng: random.Random) -> Example:
    english = _english_sentence(rng)
    return f"Translate into Velo, in capital letters: {english}", _velo(english).upper()


def _add_then_double(rng: random.Random) -> Example:
    a, b = rng.randint(10, 49), rng.randint(10, 49)
    return f"Add {a} and {b}, then double the result.", str(2 * (a + b))


def _velo_review(rng: random.Random) -> Example:
    label = rng.choice(["positive", "negative"])
    adjective = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
    noun = rng.choice(_NOUNS)
    return f"Is this review positive or negative? The {VELO[noun]} was {adjective}.", label


def _month_acronym(rng: random.Random) -> Example:
    months = rng.sample(MONTHS, 3)
    return f"Make an acronym from the first letters of: {' '.join(months)}", "".join(m[0] for m in months)


def _capitalize(rng: random.Random) -> Example:
    phrase = " ".join(rng.sample(WORDS, rng.randint(2, 3)))
    return f"Please capitalize every letter of: {phrase}", phrase.upper()


def _sum_of(rng: random.Random) -> Example:
    a, b = rng.randint(10, 49), rng.randint(10, 49)
    return f"What is the sum of {a} and {b}?", str(a + b)


def _velo_dictionary(rng: random.Random) -> Example:
    words = rng.sample(list(VELO), 2)
    return f"In Velo, how do you say: {words[0]}, {words[1]}", " ".join(VELO[w] for w in words)


def _feeling(rng: random.Random) -> Example:
    label = rng.choice(list(EMOTIONS))
    return f"What feeling does this message express? I am {rng.choice(EMOTIONS[label])}.", label


def _american_date(rng: random.Random) -> Example:
    d = _random_date(rng)
    return f"Write the date {d.isoformat()} the American way.", f"{d.month:02d}/{d.day:02d}/{d.year}"


HELD_OUT_TASKS: tuple[Task, ...] = (
    Task("month_upper", "composed", "em", _month_upper),
    Task("velo_upper", "composed", "bleu", _velo_upper),
    Task("add_then_double", "composed", "em", _add_then_double),
    Task("velo_review", "composed", "em", _velo_review),
    Task("month_acronym", "composed", "em", _month_acronym),
    Task("capitalize", "paraphrased", "em", _capitalize),
    Task("sum_of", "paraphrased", "em", _sum_of),
    Task("velo_dictionary", "paraphrased", "em", _velo_dictionary),
    Task("feeling", "paraphrased", "em", _feeling),
    Task("american_date", "paraphrased", "em", _american_date),
)
