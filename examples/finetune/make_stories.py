"""Write `named-stories.jsonl`: instruction records that ask for a story about a named animal, each answered by a
short story about exactly that animal, by name. TinyStories-656K, asked through Alpaca's template, writes a
story about whoever it likes; after LoRA on these records it writes about the one asked for (README).

The records are generated from the word lists below (no outside text): Apache-2.0, as the rest of the repo.
Run from anywhere: `python examples/finetune/make_stories.py`.
"""

import itertools
import json
import random
from pathlib import Path

NAMES = ["Tom", "Lily", "Ben", "Mia", "Sam", "Anna", "Max", "Sue", "Tim", "Lucy", "Jack", "Zoe"]
ANIMALS = ["cat", "dog", "bird", "fish", "frog", "bunny", "bear", "duck", "lion", "mouse", "pig", "cow"]
PLACES = ["a big forest", "a small house", "a sunny park", "a quiet pond", "a green garden", "a tall tree"]
THINGS = ["a red ball", "a shiny rock", "a blue hat", "a big apple", "a little boat", "a soft blanket"]
FEELINGS = ["happy", "excited", "proud", "glad"]
# Name/animal pairs left out of the data, for the README's before/after sample.
HELD_OUT = {("Zoe", "lion"), ("Max", "duck"), ("Lucy", "frog")}


def story(name: str, animal: str, rng: random.Random) -> str:
    place, thing, feeling = rng.choice(PLACES), rng.choice(THINGS), rng.choice(FEELINGS)
    return (f"Once upon a time, there was a {animal} named {name}. {name} the {animal} lived in {place}. "
            f"One day, {name} found {thing}. {name} was very {feeling} and played with it all day. The end.")


def records(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for name, animal in itertools.product(NAMES, ANIMALS):
        if (name, animal) not in HELD_OUT:
            out.append({"instruction": f"Write a story about a {animal} named {name}.",
                        "output": story(name, animal, rng)})
    return out


if __name__ == "__main__":
    path = Path(__file__).parent / "named-stories.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records()))
    print(f"wrote {path}")
