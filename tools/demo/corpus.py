"""Procedurally generated training text for the demo model (public domain by
construction: every sentence comes from the small grammar below, seeded).

Three kinds of documents, so the demo model has something to say in `dsv4 run`
and `dsv4 chat` and something to be measured on in `dsv4 perplexity`:
  * short stories (plain text paragraphs from a tiny English grammar),
  * chat turns in the DeepSeek V4 template (../../shared/spec/chat.md):
    arithmetic ("What is 7 plus 5?"), facts (colours, animal sounds, opposites)
    and "Tell me a story about ..." — in thinking mode (`<think>reasoning</think>answer`)
    and in chat mode (`</think>answer`),
  * plain question / answer lines.
"""

import random

NAMES = ["Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lena", "Milo", "Nora", "Otto", "Pia"]
ANIMALS = ["cat", "dog", "fox", "owl", "frog", "duck", "bear", "mouse", "horse", "goat", "bird", "fish"]
SOUNDS = {"cat": "meow", "dog": "woof", "fox": "yip", "owl": "hoot", "frog": "croak", "duck": "quack",
          "bear": "growl", "mouse": "squeak", "horse": "neigh", "goat": "bleat", "bird": "tweet", "fish": "blub"}
COLORS = {"grass": "green", "the sky": "blue", "snow": "white", "the sun": "yellow", "coal": "black",
          "a lemon": "yellow", "a tomato": "red", "the sea": "blue", "milk": "white", "a leaf": "green",
          "a carrot": "orange", "a plum": "purple"}
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "up": "down", "day": "night",
             "old": "new", "light": "dark", "wet": "dry", "open": "closed", "full": "empty", "early": "late"}
ADJ = ["little", "big", "brave", "sleepy", "happy", "clever", "quiet", "funny", "kind", "curious"]
PLACES = ["the river", "the forest", "the hill", "the garden", "the old barn", "the village", "the lake", "the meadow"]
THINGS = ["a red ball", "a shiny stone", "a blue hat", "a big apple", "a small boat", "a golden key", "a warm cake", "a green kite"]
VERBS_GO = ["walked", "ran", "hopped", "went", "wandered", "raced"]
FEEL = ["happy", "tired", "surprised", "proud", "hungry", "sleepy"]
NUMW = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def story(rng, hero=None):
    name = rng.choice(NAMES)
    animal = hero or rng.choice(ANIMALS)
    adj = rng.choice(ADJ)
    place, place2 = rng.sample(PLACES, 2)
    thing = rng.choice(THINGS)
    friend = rng.choice([a for a in ANIMALS if a != animal])
    n = rng.randint(2, 9)
    s = [
        f"Once upon a time there was a {adj} {animal} named {name}.",
        f"One morning {name} {rng.choice(VERBS_GO)} to {place}.",
        f"There {name} found {thing}.",
        rng.choice([
            f"A {friend} came by and said \"{SOUNDS[friend]}\".",
            f"{name} met a {friend} who wanted to play.",
            f"The {friend} asked, \"Can I see it?\"",
        ]),
        rng.choice([
            f"They counted {NUMW[n]} birds in the sky.",
            f"Together they {rng.choice(VERBS_GO)} to {place2}.",
            f"{name} shared it with the {friend}.",
        ]),
        f"At night {name} was {rng.choice(FEEL)} and went to sleep.",
        "The end.",
    ]
    return " ".join(s)


def arithmetic(rng):
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if rng.random() < 0.5:
        q, r, op, sym = f"What is {a} plus {b}?", a + b, "plus", "+"
    else:
        a, b = max(a, b), min(a, b)
        q, r, op, sym = f"What is {a} minus {b}?", a - b, "minus", "-"
    think = f"The user wants {a} {sym} {b}. {a} {sym} {b} = {r}."
    return q, think, f"{a} {op} {b} is {r}."


def fact(rng):
    k = rng.randrange(3)
    if k == 0:
        thing = rng.choice(list(COLORS))
        t = thing[0].upper() + thing[1:]
        return f"What color is {thing}?", f"The user asks about the color of {thing}. It is {COLORS[thing]}.", f"{t} is {COLORS[thing]}."
    if k == 1:
        a = rng.choice(ANIMALS)
        return f"What does a {a} say?", f"A {a} makes the sound {SOUNDS[a]}.", f"A {a} says \"{SOUNDS[a]}\"."
    w = rng.choice(list(OPPOSITES))
    return f"What is the opposite of {w}?", f"The opposite of {w} is {OPPOSITES[w]}.", f"The opposite of {w} is {OPPOSITES[w]}."


def chat_doc(rng):
    """One chat turn rendered with the V4 template (without the leading BOS)."""
    k = rng.random()
    if k < 0.35:
        q, think, ans = arithmetic(rng)
    elif k < 0.7:
        q, think, ans = fact(rng)
    else:
        hero = rng.choice(ANIMALS)
        q = rng.choice([f"Tell me a story about a {hero}.", f"Write a short story about a {hero}.", "Tell me a story."])
        think = f"The user wants a short story. I will write about a {hero}."
        ans = story(rng, hero)
    if rng.random() < 0.6:
        return f"<｜User｜>{q}<｜Assistant｜><think>{think}</think>{ans}<｜end▁of▁sentence｜>"
    return f"<｜User｜>{q}<｜Assistant｜></think>{ans}<｜end▁of▁sentence｜>"


def plain_doc(rng):
    k = rng.random()
    if k < 0.6:
        return story(rng)
    qa = [arithmetic(rng) if rng.random() < 0.5 else fact(rng) for _ in range(rng.randint(2, 4))]
    return " ".join(f"Q: {q} A: {a}" for q, _, a in qa)


def documents(seed, n, chat_fraction=0.5):
    rng = random.Random(seed)
    return [chat_doc(rng) if rng.random() < chat_fraction else plain_doc(rng) for _ in range(n)]


def heldout_text(seed, n):
    """Plain text (no special tokens) for perplexity: stories and Q/A lines, one per paragraph."""
    rng = random.Random(seed)
    return "\n\n".join(plain_doc(rng) for _ in range(n)) + "\n"
