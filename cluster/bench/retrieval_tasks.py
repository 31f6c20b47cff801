"""Synthetic adapter tasks for retrieval experiments: CARDS.json and QUERIES.json.

54 tasks in 9 domains. Every task has its own phrasings (templates) plus generic ones shared
by its whole domain, and random fillers; tasks of one domain are built to be confusable
(English->French vs English->German, movie vs hotel reviews, addition vs subtraction), so
top-1 numbers say something.

    python -m cluster.bench.retrieval_tasks --out var/retrieval_tasks [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Make = Callable[[random.Random], tuple[dict, str]]  # rng -> (template slots, target)


@dataclass(frozen=True)
class Task:
    name: str
    domain: str
    metric: str  # em | bleu | rouge
    templates: tuple[str, ...]
    make: Make

    def example(self, rng: random.Random) -> dict:
        slots, target = self.make(rng)
        template = rng.choice(self.templates + SHARED_TEMPLATES[self.domain])
        return {"inputs": template.format(**slots), "targets": target}


# Generic phrasings every task of a domain also uses, as datasets of one task type share
# instructions: on these only the content tells the tasks apart.
SHARED_TEMPLATES: dict[str, tuple[str, ...]] = {
    "sentiment": ("{text}", "Text: {text}\nLabel:", "Read the text and give its label. {text}"),
    "translation": ("Translate: {text}", "{text}\nTranslation:", "Please translate the following sentence. {text}"),
    "arithmetic": ("Numbers: {a}, {b}. Answer:", "Given {a} and {b}, what is the answer?", "Solve the problem for {a} and {b}."),
    "strings": ("Word: {word}\nOutput:", "Apply the rule to {word}.", "Input: {word}"),
    "sentence_pairs": ("{a}\n{b}\nAnswer:", "Sentence 1: {a} Sentence 2: {b} Label:", "Compare the two sentences. {a} {b}"),
    "knowledge": ("{x}?", "Question about {x}. Answer:", "Tell me the answer about {x}."),
    "lexical": ("Word: {word}\nAnswer:", "{word} ->", "Give the related word for {word}."),
    "classification": ("{text}", "Text: {text}\nCategory:", "Label this: {text}"),
    "generation": ("{text}\nOutput:", "Input: {text}\nWrite the text.", "Generate: {text}"),
}


# ---- vocabularies ------------------------------------------------------------------------------
NOUNS = ["cat", "dog", "house", "river", "teacher", "garden", "window", "city", "book", "child",
         "doctor", "train", "bird", "lamp", "forest", "market", "letter", "mountain", "kitchen", "friend"]
NAMES = ["Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam"]
PLACES = ["park", "library", "kitchen", "station", "garden", "office", "museum", "beach"]
ACTIONS = [("reading a book", "reading"), ("playing the guitar", "making music"), ("cooking dinner", "preparing food"),
           ("riding a bicycle", "cycling"), ("painting a wall", "painting"), ("eating an apple", "eating fruit")]
# word: (French, German, Spanish)
LEXICON = {
    "the cat": ("le chat", "die Katze", "el gato"), "the dog": ("le chien", "der Hund", "el perro"),
    "the child": ("l'enfant", "das Kind", "el niño"), "the teacher": ("le professeur", "der Lehrer", "el profesor"),
    "the bird": ("l'oiseau", "der Vogel", "el pájaro"), "my friend": ("mon ami", "mein Freund", "mi amigo"),
    "sleeps": ("dort", "schläft", "duerme"), "eats": ("mange", "isst", "come"), "reads": ("lit", "liest", "lee"),
    "sings": ("chante", "singt", "canta"), "runs": ("court", "läuft", "corre"), "works": ("travaille", "arbeitet", "trabaja"),
    "in the garden": ("dans le jardin", "im Garten", "en el jardín"), "at home": ("à la maison", "zu Hause", "en casa"),
    "every day": ("chaque jour", "jeden Tag", "cada día"), "in the morning": ("le matin", "am Morgen", "por la mañana"),
    "in the city": ("dans la ville", "in der Stadt", "en la ciudad"), "tonight": ("ce soir", "heute Abend", "esta noche"),
}
SUBJECTS = ["the cat", "the dog", "the child", "the teacher", "the bird", "my friend"]
VERBS = ["sleeps", "eats", "reads", "sings", "runs", "works"]
ADVERBIALS = ["in the garden", "at home", "every day", "in the morning", "in the city", "tonight"]
LANGS = {"French": 0, "German": 1, "Spanish": 2}

CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa",
            "Egypt": "Cairo", "Norway": "Oslo", "Chile": "Santiago", "India": "New Delhi", "Spain": "Madrid",
            "Italy": "Rome", "Poland": "Warsaw", "Vietnam": "Hanoi", "Ghana": "Accra"}
CURRENCIES = {"Japan": "yen", "India": "rupee", "Mexico": "peso", "Poland": "zloty", "Brazil": "real",
              "Russia": "ruble", "China": "yuan", "Sweden": "krona", "Thailand": "baht", "Turkey": "lira",
              "South Korea": "won", "Vietnam": "dong", "Kenya": "shilling", "Hungary": "forint"}
ELEMENTS = {"gold": "Au", "silver": "Ag", "iron": "Fe", "sodium": "Na", "potassium": "K", "lead": "Pb",
            "copper": "Cu", "tin": "Sn", "mercury": "Hg", "helium": "He", "oxygen": "O", "carbon": "C",
            "neon": "Ne", "zinc": "Zn"}
AUTHORS = {"Hamlet": "William Shakespeare", "Pride and Prejudice": "Jane Austen", "1984": "George Orwell",
           "Don Quixote": "Miguel de Cervantes", "War and Peace": "Leo Tolstoy", "Moby-Dick": "Herman Melville",
           "The Odyssey": "Homer", "Dracula": "Bram Stoker", "Frankenstein": "Mary Shelley",
           "Ulysses": "James Joyce", "Beloved": "Toni Morrison", "The Trial": "Franz Kafka"}
SOUNDS = {"dog": "bark", "cat": "meow", "cow": "moo", "lion": "roar", "snake": "hiss", "duck": "quack",
          "horse": "neigh", "sheep": "bleat", "owl": "hoot", "pig": "oink", "frog": "croak", "bee": "buzz"}
INVENTIONS = {"telephone": "Alexander Graham Bell", "light bulb": "Thomas Edison", "printing press": "Johannes Gutenberg",
              "World Wide Web": "Tim Berners-Lee", "dynamite": "Alfred Nobel", "radio": "Guglielmo Marconi",
              "steam engine": "James Watt", "airplane": "the Wright brothers", "penicillin": "Alexander Fleming",
              "vaccine": "Edward Jenner"}
SYNONYMS = {"happy": "glad", "big": "large", "fast": "quick", "smart": "clever", "begin": "start", "angry": "mad",
            "tiny": "small", "rich": "wealthy", "shout": "yell", "hard": "difficult", "gift": "present", "end": "finish"}
ANTONYMS = {"happy": "sad", "big": "small", "fast": "slow", "hot": "cold", "early": "late", "rich": "poor",
            "open": "closed", "light": "dark", "strong": "weak", "young": "old", "full": "empty", "begin": "end"}
PLURALS = {"child": "children", "mouse": "mice", "city": "cities", "box": "boxes", "knife": "knives",
           "foot": "feet", "man": "men", "leaf": "leaves", "bus": "buses", "tooth": "teeth", "story": "stories",
           "wolf": "wolves"}
PAST = {"go": "went", "eat": "ate", "run": "ran", "see": "saw", "write": "wrote", "swim": "swam", "buy": "bought",
        "think": "thought", "sing": "sang", "take": "took", "drink": "drank", "fly": "flew"}
RHYMES = {"cat": "hat", "light": "night", "tree": "bee", "cake": "lake", "moon": "spoon", "ring": "king",
          "rain": "train", "bear": "chair", "fox": "box", "star": "car", "goat": "boat", "mouse": "house"}
DEFINITIONS = {"a place where books are lent": "library", "a person who treats sick people": "doctor",
               "frozen water": "ice", "the meal eaten in the morning": "breakfast", "a young cat": "kitten",
               "a building where films are shown": "cinema", "a tool used to cut paper": "scissors",
               "the season after summer": "autumn", "a very large body of salt water": "ocean",
               "a person who flies a plane": "pilot", "a machine that keeps food cold": "refrigerator",
               "the opposite of day": "night"}

POSITIVE = ["was wonderful", "exceeded my expectations", "was absolutely brilliant", "made my day",
            "was a real pleasure", "is worth every penny", "was excellent"]
NEGATIVE = ["was terrible", "was a huge disappointment", "was awful", "ruined everything",
            "was a waste of money", "left a lot to be desired", "was frustrating"]
ASPECTS = {
    "movie": ["the plot", "the acting", "the soundtrack", "the ending", "the director's vision", "the cinematography"],
    "product": ["the battery", "the build quality", "the charger", "the packaging", "the screen", "the delivery"],
    "restaurant": ["the pasta", "the waiter", "the dessert", "the wine list", "the soup", "the service"],
    "hotel": ["the room", "the front desk", "the breakfast buffet", "the pool", "the bed", "the view from the balcony"],
    "app": ["the interface", "the latest update", "the login screen", "the notifications", "the sync feature", "the dark mode"],
    "tweet": ["today's game", "my commute", "this weather", "the new album", "monday morning", "the concert"],
}
TOPICS = {
    "sports": ["The striker scored twice as the home team won the final", "The tennis champion retired after a knee injury",
               "The marathon was won in record time"],
    "business": ["Shares of the carmaker fell after weak quarterly profits", "The bank raised interest rates again",
                 "The retailer announced plans to close forty stores"],
    "technology": ["The company unveiled a faster smartphone chip", "A new update fixes a security flaw in the browser",
                   "Researchers built a robot that sorts recycling"],
    "politics": ["The parliament passed the budget after a long debate", "The president met foreign ministers in Geneva",
                 "Voters head to the polls in the regional election"],
}
INTENTS = {"book_flight": ["I need a flight to {city} next {day}", "book me a plane ticket to {city} on {day}"],
           "weather": ["will it rain in {city} on {day}", "what's the forecast for {city} this {day}"],
           "set_alarm": ["wake me up at 7 on {day}", "set an alarm for {day} morning"],
           "play_music": ["put on some jazz", "play my {day} playlist"]}
EMOTIONS = {"joy": ["I can't stop smiling, {name} got the job!", "We finally won, I'm over the moon"],
            "anger": ["{name} lied to me again and I am furious", "How dare they cancel without telling us"],
            "fear": ["I heard footsteps behind me in the dark", "{name} hasn't called and I'm terrified"],
            "sadness": ["I miss {name} so much since she moved away", "Our old dog passed away this morning"]}
CITIES = ["Paris", "Berlin", "Madrid", "Tokyo", "Boston", "Lima", "Cairo", "Oslo"]
DAYS = ["Monday", "Tuesday", "Friday", "Saturday", "Sunday", "weekend"]
DISHES = [("tomato", "soup"), ("chicken", "curry"), ("lemon", "cake"), ("mushroom", "risotto"), ("apple", "pie"),
          ("garlic", "bread"), ("beef", "stew"), ("spinach", "salad")]
FOODS = ["Italian", "Chinese", "French", "Indian", "Mexican", "Japanese"]
AREAS = ["city centre", "riverside", "old town", "harbour"]
PRICES = ["cheap", "moderate", "high"]


def _pick(table: dict) -> Callable[[random.Random], tuple]:
    items = sorted(table.items())
    return lambda rng: rng.choice(items)


# ---- makers ------------------------------------------------------------------------------------
def review(kind: str, labels: tuple[str, str] = ("positive", "negative")) -> Make:
    def make(rng):
        good = rng.random() < 0.5
        first, second = rng.sample(ASPECTS[kind], 2)
        phrase = rng.choice(POSITIVE if good else NEGATIVE)
        text = f"{first.capitalize()} {phrase}, and {second} {rng.choice(POSITIVE if good else NEGATIVE)}."
        return {"text": text}, labels[0] if good else labels[1]
    return make


def stars(kind: str) -> Make:
    def make(rng):
        n = rng.randint(1, 5)
        phrases = NEGATIVE if n <= 2 else POSITIVE
        aspect = rng.choice(ASPECTS[kind])
        return {"text": f"{aspect.capitalize()} {rng.choice(phrases)}."}, str(n)
    return make


def tweet(rng):
    mood = rng.choice(["positive", "negative", "neutral"])
    topic = rng.choice(ASPECTS["tweet"])
    text = {"positive": f"loving {topic} so much #blessed", "negative": f"{topic} is the worst, ugh #fail",
            "neutral": f"just thinking about {topic} @{rng.choice(NAMES).lower()}"}[mood]
    return {"text": text}, mood


def english_sentence(rng) -> tuple[list[str], str]:
    parts = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(ADVERBIALS)]
    return parts, " ".join(parts)


def to_language(lang: str) -> Make:
    def make(rng):
        parts, text = english_sentence(rng)
        return {"text": text, "lang": lang}, " ".join(LEXICON[p][LANGS[lang]] for p in parts)
    return make


def from_language(lang: str) -> Make:
    def make(rng):
        parts, text = english_sentence(rng)
        return {"text": " ".join(LEXICON[p][LANGS[lang]] for p in parts), "lang": lang}, text
    return make


def numbers(op: Callable[[int, int], str], lo: int = 2, hi: int = 99) -> Make:
    def make(rng):
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        return {"a": a, "b": b, "name": rng.choice(NAMES), "thing": rng.choice(["apples", "stamps", "marbles", "coins"])}, op(a, b)
    return make


def word_op(op: Callable[[str], str]) -> Make:
    return lambda rng: (lambda w: ({"word": w}, op(w)))(rng.choice(NOUNS))


def words_op(op: Callable[[list[str]], str]) -> Make:
    return lambda rng: (lambda ws: ({"words": " ".join(ws), "word": " ".join(ws)}, op(ws)))(rng.sample(NOUNS, rng.randint(3, 5)))


def lookup(table: dict, key_slot: str = "x") -> Make:
    pick = _pick(table)
    return lambda rng: (lambda kv: ({key_slot: kv[0]}, kv[1]))(pick(rng))


def scene(rng) -> tuple[str, str, str]:
    """(sentence, a sentence it entails, one it contradicts)."""
    name, place = rng.choice(NAMES), rng.choice(PLACES)
    action, gist = rng.choice(ACTIONS)
    other = rng.choice([p for p in PLACES if p != place])
    return (f"{name} is {action} in the {place}.", f"{name} is {gist}.", f"{name} is in the {other} right now.")


def nli(rng):
    premise, entailed, contradicted = scene(rng)
    label = rng.choice(["entailment", "contradiction", "neutral"])
    hyp = {"entailment": entailed, "contradiction": contradicted,
           "neutral": f"{premise.split()[0]} is waiting for a {rng.choice(NOUNS)}."}[label]
    return {"a": premise, "b": hyp}, label


def yes_no_pair(kind: str) -> Make:
    def make(rng):
        premise, entailed, contradicted = scene(rng)
        same = rng.random() < 0.5
        if kind == "paraphrase":
            words = premise.rstrip(".").split(" ", 2)
            other = f"In the {premise.split(' in the ')[-1].rstrip('.')}, {words[0]} is {words[2].split(' in the ')[0]}."
            return {"a": premise, "b": other if same else contradicted}, "yes" if same else "no"
        if kind == "contradiction":
            return {"a": premise, "b": contradicted if same else entailed}, "yes" if same else "no"
        return {"a": premise, "b": entailed if same else contradicted}, "yes" if same else "no"
    return make


def duplicate_questions(rng):
    city, day = rng.choice(CITIES), rng.choice(DAYS)
    q1 = f"What is the best way to get to {city} on {day}?"
    same = rng.random() < 0.5
    q2 = f"How should I travel to {city} on {day}?" if same else f"What is the weather like in {city} on {day}?"
    return {"a": q1, "b": q2}, "yes" if same else "no"


def similarity(rng):
    premise, entailed, contradicted = scene(rng)
    score = rng.choice([0, 2, 4, 5])
    other = {0: f"The {rng.choice(NOUNS)} is {rng.choice(['red', 'old', 'broken'])}.", 2: contradicted,
             4: entailed, 5: premise}[score]
    return {"a": premise, "b": other}, str(score)


def answer_relevance(rng):
    country, capital = rng.choice(sorted(CAPITALS.items()))
    good = rng.random() < 0.5
    answer = f"The capital is {capital}." if good else f"{country} is famous for its {rng.choice(['food', 'music', 'beaches'])}."
    return {"a": f"What is the capital of {country}?", "b": answer}, "yes" if good else "no"


def topic(rng):
    label = rng.choice(sorted(TOPICS))
    return {"text": rng.choice(TOPICS[label])}, label


def spam(rng):
    is_spam = rng.random() < 0.5
    name = rng.choice(NAMES)
    text = (f"Congratulations {name}! You won a free {rng.choice(['cruise', 'iPhone', 'gift card'])}, click here now"
            if is_spam else f"Hi {name}, can we move our meeting to {rng.choice(DAYS)}?")
    return {"text": text}, "spam" if is_spam else "not spam"


def language_id(rng):
    lang = rng.choice(["English", *LANGS])
    parts, text = english_sentence(rng)
    if lang != "English":
        text = " ".join(LEXICON[p][LANGS[lang]] for p in parts)
    return {"text": text}, lang


def intent(rng):
    label = rng.choice(sorted(INTENTS))
    return {"text": rng.choice(INTENTS[label]).format(city=rng.choice(CITIES), day=rng.choice(DAYS))}, label


def emotion(rng):
    label = rng.choice(sorted(EMOTIONS))
    return {"text": rng.choice(EMOTIONS[label]).format(name=rng.choice(NAMES))}, label


def question_type(rng):
    label, question = rng.choice([
        ("location", f"Where is the {rng.choice(NOUNS)} kept?"), ("person", f"Who wrote {rng.choice(sorted(AUTHORS))}?"),
        ("number", f"How many {rng.choice(NOUNS)}s are in the {rng.choice(PLACES)}?"),
        ("date", f"When did {rng.choice(NAMES)} arrive in {rng.choice(CITIES)}?")])
    return {"text": question}, label


def restaurant_data(rng):
    name = f"The {rng.choice(['Golden', 'Blue', 'Old', 'Green'])} {rng.choice(['Spoon', 'Fork', 'Lantern', 'Mill'])}"
    food, area, price = rng.choice(FOODS), rng.choice(AREAS), rng.choice(PRICES)
    data = f"name[{name}], food[{food}], area[{area}], priceRange[{price}]"
    return {"text": data}, f"{name} serves {food} food in the {area} at {price} prices."


def headline(rng):
    label = rng.choice(sorted(TOPICS))
    story = rng.choice(TOPICS[label])
    return {"text": f"{story}, officials said on {rng.choice(DAYS)}. More details are expected later."}, story


def recipe(rng):
    main, dish = rng.choice(DISHES)
    steps = f"Chop the {main}. Simmer it with onions for {rng.randint(10, 40)} minutes. Season and serve the {dish} hot."
    return {"text": steps}, f"Easy {main} {dish}"


def dialogue(rng):
    a, b = rng.sample(NAMES, 2)
    place, day = rng.choice(PLACES), rng.choice(DAYS)
    text = f"{a}: Are you free on {day}? {b}: Yes, why? {a}: Let's meet at the {place}. {b}: Great, see you there."
    return {"text": text}, f"{a} and {b} will meet at the {place} on {day}."


def email(rng):
    name, day = rng.choice(NAMES), rng.choice(DAYS)
    thing = rng.choice(["the budget report", "the team dinner", "the client visit", "the server upgrade"])
    return ({"text": f"Hi all, {thing} is moved to {day}. Please update your calendars. Thanks, {name}"},
            f"{thing.capitalize()} moved to {day}")


def weather(rng):
    city, temp = rng.choice(CITIES), rng.randint(-5, 35)
    sky, wind = rng.choice(["sunny", "cloudy", "rainy", "snowy"]), rng.choice(["calm", "breezy", "stormy"])
    return {"text": f"city={city}; temp_c={temp}; sky={sky}; wind={wind}"}, f"{city} will be {sky} and {wind}, around {temp} degrees."


# ---- the task list -----------------------------------------------------------------------------
def _t(name, domain, metric, make, *templates) -> Task:
    return Task(name, domain, metric, tuple(templates), make)


def _review_templates(thing: str) -> tuple[str, ...]:
    return (f"Review: {{text}}\nIs this {thing} review positive or negative?",
            f"What is the sentiment of the following {thing} review?\n{{text}}",
            f"{{text}}\nDid the author of this {thing} review like it? Answer positive or negative.",
            f"Classify this {thing} review as positive or negative: {{text}}",
            f"Here is a customer's opinion about a {thing}: \"{{text}}\" Was the opinion favourable?")


TASKS: tuple[Task, ...] = (
    # sentiment: the same review phrases about different things
    _t("movie_review_polarity", "sentiment", "em", review("movie"), *_review_templates("movie")),
    _t("restaurant_review_polarity", "sentiment", "em", review("restaurant"), *_review_templates("restaurant")),
    _t("hotel_review_polarity", "sentiment", "em", review("hotel"), *_review_templates("hotel")),
    _t("product_review_stars", "sentiment", "em", stars("product"),
       "Product review: {text}\nHow many stars (1-5) did the buyer give?", "Predict the star rating of this product review: {text}",
       "{text}\nOn a scale of 1 to 5, how would this customer rate the item?", "Rate this Amazon review from 1 to 5 stars: {text}"),
    _t("app_review_rating", "sentiment", "em", stars("app"),
       "App store review: {text}\nWhat rating from 1 to 5 goes with it?", "Guess the app rating (1-5) for this review: {text}",
       "{text}\nHow many stars would this user give the app?", "A user wrote about our mobile app: {text} Score it 1-5."),
    _t("tweet_sentiment", "sentiment", "em", tweet,
       "Tweet: {text}\nIs the sentiment positive, negative or neutral?", "What is the mood of this tweet? {text}",
       "{text}\nLabel the tweet as positive, neutral or negative.", "Classify the sentiment of the following tweet: {text}"),
    # translation: same sentences, different language pairs
    *[_t(f"translate_en_{code}", "translation", "bleu", to_language(lang),
         "Translate to {lang}: {text}", "How do you say \"{text}\" in {lang}?", "{text}\nTranslate the sentence above into {lang}.",
         "English: {text}\n{lang}:", "Please give me the {lang} version of: {text}")
      for code, lang in (("fr", "French"), ("de", "German"), ("es", "Spanish"))],
    *[_t(f"translate_{code}_en", "translation", "bleu", from_language(lang),
         "Translate this {lang} sentence into English: {text}", "What does \"{text}\" mean in English?",
         "{text}\nTranslate the {lang} above to English.", "{lang}: {text}\nEnglish:", "Give an English translation of: {text}")
      for code, lang in (("fr", "French"), ("de", "German"), ("es", "Spanish"))],
    # arithmetic: same numbers, different operations
    _t("addition", "arithmetic", "em", numbers(lambda a, b: str(a + b)),
       "What is {a} plus {b}?", "Compute {a} + {b}.", "Add {a} and {b}.", "{a} + {b} = ?", "Find the sum of {a} and {b}."),
    _t("subtraction", "arithmetic", "em", numbers(lambda a, b: str(a - b)),
       "What is {a} minus {b}?", "Compute {a} - {b}.", "Subtract {b} from {a}.", "{a} - {b} = ?", "Find the difference between {a} and {b}."),
    _t("multiplication", "arithmetic", "em", numbers(lambda a, b: str(a * b), 2, 20),
       "What is {a} times {b}?", "Compute {a} * {b}.", "Multiply {a} by {b}.", "{a} x {b} = ?", "Find the product of {a} and {b}."),
    _t("word_problem_addition", "arithmetic", "em", numbers(lambda a, b: str(a + b)),
       "{name} has {a} {thing} and finds {b} more. How many {thing} does {name} have now?",
       "There are {a} {thing} in a jar. {name} puts in {b} more. How many {thing} are in the jar?",
       "{name} collected {a} {thing} on Monday and {b} on Tuesday. How many in total?",
       "If {name} owns {a} {thing} and is given {b}, how many {thing} does {name} own?"),
    _t("compare_numbers", "arithmetic", "em", numbers(lambda a, b: str(max(a, b))),
       "Which is larger, {a} or {b}?", "What is the bigger number: {a} or {b}?", "Return the maximum of {a} and {b}.",
       "{a} vs {b}: which one is greater?"),
    _t("parity", "arithmetic", "em", numbers(lambda a, b: "even" if a % 2 == 0 else "odd"),
       "Is {a} even or odd?", "Tell me whether the number {a} is odd or even.", "{a}: odd or even?", "Determine the parity of {a}."),
    # string manipulation: same words, different operations
    _t("reverse_word", "strings", "em", word_op(lambda w: w[::-1]),
       "Reverse the word: {word}", "Spell '{word}' backwards.", "Write {word} in reverse order.", "What is {word} reversed?"),
    _t("uppercase", "strings", "em", word_op(str.upper),
       "Convert to uppercase: {word}", "Write '{word}' in capital letters.", "Make {word} all caps.", "Uppercase this word: {word}"),
    _t("count_letters", "strings", "em", word_op(lambda w: str(len(w))),
       "How many letters are in the word '{word}'?", "Count the characters in {word}.", "What is the length of '{word}'?",
       "Number of letters in {word}?"),
    _t("first_letter", "strings", "em", word_op(lambda w: w[0]),
       "What is the first letter of '{word}'?", "Which letter does {word} start with?", "Give the initial letter of {word}.",
       "{word} begins with which letter?"),
    _t("sort_words", "strings", "em", words_op(lambda ws: " ".join(sorted(ws))),
       "Sort these words alphabetically: {words}", "Put in alphabetical order: {words}",
       "Arrange the following words from A to Z: {words}", "Alphabetize: {words}"),
    _t("remove_vowels", "strings", "em", word_op(lambda w: "".join(c for c in w if c not in "aeiou")),
       "Remove the vowels from '{word}'.", "Delete every vowel in {word}.", "Write {word} without its vowels.",
       "Strip a, e, i, o and u from: {word}"),
    # sentence pairs: same scenes, different questions
    _t("entailment_3way", "sentence_pairs", "em", nli,
       "Premise: {a}\nHypothesis: {b}\nEntailment, neutral or contradiction?",
       "Does \"{a}\" entail \"{b}\"? Answer entailment, neutral or contradiction.",
       "{a}\nBased on that, is it true that \"{b}\"? (entailment / neutral / contradiction)",
       "Read: {a} Then judge the claim: {b}"),
    _t("paraphrase_detection", "sentence_pairs", "em", yes_no_pair("paraphrase"),
       "Sentence 1: {a}\nSentence 2: {b}\nDo they mean the same thing?", "Are these two sentences paraphrases? \"{a}\" / \"{b}\"",
       "{a}\n{b}\nIs the second sentence a rewording of the first?", "Do \"{a}\" and \"{b}\" say the same?"),
    _t("textual_entailment", "sentence_pairs", "em", yes_no_pair("entailment"),
       "{a}\nQuestion: does this imply that {b} Yes or no?", "If \"{a}\", does it follow that \"{b}\"?",
       "Given: {a}\nCan we conclude: {b}", "Is \"{b}\" true whenever \"{a}\" is true?"),
    _t("contradiction_detection", "sentence_pairs", "em", yes_no_pair("contradiction"),
       "Do these statements contradict each other? {a} {b}", "Statement A: {a}\nStatement B: {b}\nCan both be true?",
       "{a}\n{b}\nIs there a contradiction?", "Are \"{a}\" and \"{b}\" inconsistent?"),
    _t("sentence_similarity", "sentence_pairs", "em", similarity,
       "Rate the similarity of these sentences from 0 to 5: {a} / {b}", "How similar are \"{a}\" and \"{b}\" on a 0-5 scale?",
       "Sentence A: {a}\nSentence B: {b}\nSimilarity score (0-5):", "Score 0 to 5 how close in meaning: {a} || {b}"),
    _t("duplicate_questions", "sentence_pairs", "em", duplicate_questions,
       "Question 1: {a}\nQuestion 2: {b}\nAre these questions duplicates?", "Do \"{a}\" and \"{b}\" ask the same thing?",
       "{a}\n{b}\nWould these two questions have the same answer?", "Same question or not? {a} | {b}"),
    # knowledge questions: same form, different tables
    _t("country_capital", "knowledge", "em", lookup(CAPITALS),
       "What is the capital of {x}?", "Name the capital city of {x}.", "{x}'s capital is which city?", "Which city is the seat of government of {x}?"),
    _t("country_currency", "knowledge", "em", lookup(CURRENCIES),
       "What is the currency of {x}?", "Which money is used in {x}?", "Name the official currency of {x}.", "In {x}, people pay with what currency?"),
    _t("element_symbol", "knowledge", "em", lookup(ELEMENTS),
       "What is the chemical symbol for {x}?", "Give the periodic table symbol of {x}.", "Which symbol stands for {x}?",
       "{x} is written as what symbol in chemistry?"),
    _t("book_author", "knowledge", "em", lookup(AUTHORS),
       "Who wrote {x}?", "Name the author of the book {x}.", "{x} was written by whom?", "Which writer is behind {x}?"),
    _t("inventor", "knowledge", "em", lookup(INVENTIONS),
       "Who invented the {x}?", "Name the inventor of the {x}.", "The {x} was invented by whom?", "Which person is credited with the {x}?"),
    _t("animal_sound", "knowledge", "em", lookup(SOUNDS),
       "What sound does a {x} make?", "A {x} says what?", "Which noise is made by a {x}?", "What do you call the sound of a {x}?"),
    # words: same words, different relations
    _t("synonym", "lexical", "em", lookup(SYNONYMS, "word"),
       "Give a synonym of '{word}'.", "What is another word for {word}?", "Name a word that means the same as {word}.",
       "{word} - similar word?"),
    _t("antonym", "lexical", "em", lookup(ANTONYMS, "word"),
       "Give an antonym of '{word}'.", "What is the opposite of {word}?", "Name a word that means the reverse of {word}.",
       "{word} - opposite word?"),
    _t("plural_form", "lexical", "em", lookup(PLURALS, "word"),
       "What is the plural of '{word}'?", "Give the plural form of {word}.", "One {word}, two ...?", "Pluralize: {word}"),
    _t("past_tense", "lexical", "em", lookup(PAST, "word"),
       "What is the past tense of '{word}'?", "Give the simple past of the verb {word}.", "Yesterday I ... ({word})",
       "Conjugate {word} in the past tense."),
    _t("rhyming_word", "lexical", "em", lookup(RHYMES, "word"),
       "Give a word that rhymes with '{word}'.", "What rhymes with {word}?", "Name a rhyme for {word}.", "{word} rhymes with ...?"),
    _t("word_from_definition", "lexical", "em", lookup(DEFINITIONS, "word"),
       "Which word means: {word}?", "Give the word for {word}.", "Definition: {word}\nWord:", "What do we call {word}?"),
    # classification: labels other than sentiment
    _t("news_topic", "classification", "em", topic,
       "Article: {text}\nTopic: sports, business, technology or politics?", "Which section of the newspaper does this belong to? {text}",
       "{text}\nClassify the news topic.", "Categorize this headline: {text}"),
    _t("spam_detection", "classification", "em", spam,
       "Message: {text}\nIs this spam?", "Spam or not spam? {text}", "{text}\nShould this email go to the spam folder?",
       "Detect whether this SMS is spam: {text}"),
    _t("language_identification", "classification", "em", language_id,
       "Which language is this sentence in? {text}", "Identify the language: {text}", "{text}\nWhat language was that written in?",
       "Detect the language of the following text: {text}"),
    _t("intent_detection", "classification", "em", intent,
       "User said: {text}\nWhat is the intent?", "Classify the assistant command: {text}", "{text}\nWhich action does the user want?",
       "Detect the intent of this voice request: {text}"),
    _t("emotion_detection", "classification", "em", emotion,
       "Text: {text}\nWhich emotion: joy, anger, fear or sadness?", "What emotion does the writer feel? {text}",
       "{text}\nName the emotion expressed.", "Detect the emotion in this message: {text}"),
    _t("question_type", "classification", "em", question_type,
       "What kind of answer does this question expect? {text}", "Question: {text}\nAnswer type (person, location, number, date):",
       "Classify the question by its expected answer: {text}", "{text}\nIs this asking for a person, place, number or date?"),
    # text generation: short texts from data or longer texts
    _t("restaurant_data_to_text", "generation", "rouge", restaurant_data,
       "Write a sentence about this restaurant: {text}", "Turn this data into a description: {text}",
       "{text}\nDescribe the restaurant in one sentence.", "Generate text from the meaning representation: {text}"),
    _t("weather_report", "generation", "rouge", weather,
       "Write a weather forecast from: {text}", "Turn these readings into a short forecast: {text}",
       "{text}\nDescribe tomorrow's weather.", "Generate a one-line weather report for {text}"),
    _t("news_headline", "generation", "rouge", headline,
       "Write a headline for this article: {text}", "Give this news story a title: {text}",
       "{text}\nHeadline:", "Summarize the article in one headline: {text}"),
    _t("recipe_title", "generation", "rouge", recipe,
       "Give a name to this recipe: {text}", "What would you call a dish made like this? {text}",
       "{text}\nRecipe title:", "Suggest a title for these cooking steps: {text}"),
    _t("dialogue_summary", "generation", "rouge", dialogue,
       "Summarize the conversation: {text}", "What did they agree on? {text}", "{text}\nSummary:",
       "Write a one-sentence summary of this chat: {text}"),
    _t("email_subject", "generation", "rouge", email,
       "Write a subject line for this email: {text}", "Suggest an email subject: {text}", "{text}\nSubject:",
       "What would be a good title for this message? {text}"),
)


def _unique_examples(task: Task, rng: random.Random, n: int, taken: set[str]) -> list[dict]:
    """n examples whose inputs are not in `taken` (queries never repeat a card sample)."""
    out = []
    for _ in range(n * 50):
        ex = task.example(rng)
        if ex["inputs"] not in taken:
            taken.add(ex["inputs"])
            out.append(ex)
            if len(out) == n:
                return out
    raise RuntimeError(f"task {task.name} cannot produce {n} distinct examples")


def generate(seed: int = 0, samples_per_card: int = 20, queries_per_task: int = 10) -> tuple[list[dict], list[dict]]:
    """(cards, queries) in the CARDS.json / QUERIES.json formats of `loraretriever eval retrieval`."""
    rng = random.Random(seed)
    cards, queries = [], []
    for task in TASKS:
        taken: set[str] = set()
        cards.append({"model_name": task.name, "domain": task.domain,
                      "sample": _unique_examples(task, rng, samples_per_card, taken)})
        queries += [{**ex, "task": task.name, "domain": task.domain, "metric": task.metric}
                    for ex in _unique_examples(task, rng, queries_per_task, taken)]
    return cards, queries


def _passage(rng: random.Random, words: int) -> str:
    """Task-neutral filler prose (the same vocabulary for every task), about `words` words long."""
    sentences = []
    while sum(len(x.split()) for x in sentences) < words:
        name, place, (action, _) = rng.choice(NAMES), rng.choice(PLACES), rng.choice(ACTIONS)
        sentences.append(rng.choice([f"{name} was {action} in the {place}.",
                                     f"Later that day the {rng.choice(NOUNS)} near the {place} was quiet.",
                                     f"{name} met a friend at the {place} and they talked about the {rng.choice(NOUNS)}."]))
    return " ".join(sentences)


def lengthen(examples: list[dict], seed: int, words: tuple[int, int] = (120, 320)) -> list[dict]:
    """Long-prompt variants: each input gets a filler passage of words[0]..words[1] words, before it
    (the task text ends the prompt, as in reading-comprehension prompts) or after it (the task text
    opens the prompt), half and half; the passage says nothing about the task."""
    rng = random.Random(seed)
    out = []
    for ex in examples:
        passage = _passage(rng, rng.randint(*words))
        inputs = f"{passage}\n\n{ex['inputs']}" if rng.random() < 0.5 else f"{ex['inputs']}\n\nContext: {passage}"
        out.append({**ex, "inputs": inputs})
    return out


def write_task_files(out: Path, seed: int = 0, samples_per_card: int = 20, queries_per_task: int = 10,
                     long: bool = False) -> tuple[Path, Path]:
    """CARDS.json and QUERIES.json under `out`; long=True lengthens every card sample and query."""
    cards, queries = generate(seed, samples_per_card, queries_per_task)
    if long:
        cards = [{**c, "sample": lengthen(c["sample"], seed=seed * 1000 + i)} for i, c in enumerate(cards)]
        queries = lengthen(queries, seed=seed * 1000 + len(cards))
    out.mkdir(parents=True, exist_ok=True)
    cards_path, queries_path = out / "CARDS.json", out / "QUERIES.json"
    cards_path.write_text(json.dumps(cards, indent=1, ensure_ascii=False))
    queries_path.write_text(json.dumps(queries, indent=1, ensure_ascii=False))
    return cards_path, queries_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("var/retrieval_tasks"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=20, help="card samples per adapter")
    parser.add_argument("--queries", type=int, default=10, help="queries per task")
    parser.add_argument("--long", action="store_true", help="wrap every input in a long task-neutral passage")
    args = parser.parse_args()
    cards_path, queries_path = write_task_files(args.out, args.seed, args.samples, args.queries, args.long)
    print(f"{len(TASKS)} tasks in {len({t.domain for t in TASKS})} domains: {cards_path}, {queries_path}")


if __name__ == "__main__":
    main()
