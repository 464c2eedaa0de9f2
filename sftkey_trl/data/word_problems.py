"""`demo:word_problems`: natural-language multi-step word problems for a small pretrained model, built offline.

Each problem (people, objects, prices or times) takes 2-4 operations, each written in the reasoning. In part of the
rows (48% of the default training file) the question asks for one more step the reasoning never writes down (change
from a bill, a remainder, a 12-hour clock, how many more), so, as in `demo:remainder`, the answer carries a
computation of its own. Deterministic; no question appears twice.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from .synthetic import write_dataset

PEOPLE = ("Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jonas", "Kira", "Leo",
          "Maya", "Nina", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara")  # fmt: skip
GOODS = (("pencil", "pencils"), ("notebook", "notebooks"), ("apple", "apples"), ("ticket", "tickets"),
         ("sticker", "stickers"), ("mug", "mugs"), ("candle", "candles"), ("ball", "balls"))  # fmt: skip
THINGS = (("marble", "marbles"), ("card", "cards"), ("shell", "shells"), ("coin", "coins"), ("stamp", "stamps"),
          ("cookie", "cookies"), ("bead", "beads"))  # fmt: skip
EXTRA_SHARE = 0.5  # rows that draw the extra-step question, where the template has one
# story, reasoning lines, the reasoning's value, the plain question, the extra-step question and its answer (None:
# this draw has no extra step)
Problem = tuple[str, list[str], int, str, str, int | None]


def _shopping(rng: random.Random, name: str) -> Problem:
    """Two kinds of goods at a price each; the extra step is the change from a bill."""
    (_, many), (_, many_2) = rng.sample(GOODS, 2)
    a, p, b, q = rng.randint(2, 6), rng.randint(2, 9), rng.randint(2, 6), rng.randint(2, 9)
    total = a * p + b * q
    story = f"{name} buys {a} {many} at {p} dollars each and {b} {many_2} at {q} dollars each."
    lines = [f"The {many} cost {a} x {p} = {a * p} dollars.", f"The {many_2} cost {b} x {q} = {b * q} dollars.",
             f"Together that is {a * p} + {b * q} = {total} dollars."]  # fmt: skip
    bill = next(bill for bill in (20, 50, 100, 200) if bill > total)  # total <= 108
    extra = f"{name} pays with a {bill}-dollar bill. How many dollars of change does {name} get?"
    return story, lines, total, f"How many dollars does {name} spend?", extra, bill - total


def _collection(rng: random.Random, name: str) -> Problem:
    """Start with some things, give some away, buy packs; the extra step is what is left after sharing."""
    _, many = rng.choice(THINGS)
    start, packs, per_pack = rng.randint(10, 40), rng.randint(2, 5), rng.randint(3, 8)
    given = rng.randint(2, start - 3)
    friend = rng.choice([person for person in PEOPLE if person != name])
    after, bought = start - given, packs * per_pack
    total = after + bought
    story = (f"{name} has {start} {many}. {name} gives {given} {many} to {friend}, then buys {packs} packs "
             f"of {per_pack} {many} each.")  # fmt: skip
    lines = [f"After giving some away, {name} has {start} - {given} = {after} {many}.",
             f"The packs hold {packs} x {per_pack} = {bought} {many}.",
             f"Now {name} has {after} + {bought} = {total} {many}."]  # fmt: skip
    boxes = rng.choice([k for k in range(3, 10) if total % k])  # total <= 77: some k never divides it
    extra = (f"{name} puts them into {boxes} boxes, the same number in each box, as many as fit. "
             f"How many {many} are left over?")  # fmt: skip
    return story, lines, total, f"How many {many} does {name} have now?", extra, total % boxes


def _schedule(rng: random.Random, name: str) -> Problem:
    """Hours of activities from a start hour; the extra step is the hour on a 12-hour clock."""
    start, a, b, c = rng.randint(6, 11), rng.randint(2, 5), rng.randint(1, 3), rng.randint(2, 5)
    story = (f"{name} starts at {start} o'clock in the morning, studies for {a} hours, takes a break of {b} hours, "
             f"and then works for {c} hours.")  # fmt: skip
    first, second, end = start + a, start + a + b, start + a + b + c
    lines = [f"Studying ends at {start} + {a} = {first}.", f"The break ends at {first} + {b} = {second}.",
             f"Work ends at {second} + {c} = {end}."]  # fmt: skip
    extra = f"What hour does the 12-hour clock show when {name} finishes?"
    plain = f"How many hours after midnight does {name} finish?"
    return story, lines, end, plain, extra, end - 12 if end > 12 else None


def _saving(rng: random.Random, name: str) -> Problem:
    """Weekly savings minus a purchase; the extra step is how much more a goal needs."""
    weekly, weeks = rng.randint(3, 9), rng.randint(2, 6)
    saved = weekly * weeks
    spent = rng.randint(2, saved - 2)
    left = saved - spent
    story = f"{name} saves {weekly} dollars every week for {weeks} weeks and then spends {spent} dollars on a game."
    lines = [f"{name} saves {weekly} x {weeks} = {saved} dollars.", f"After the game, {saved} - {spent} = {left}."]
    goal = left + rng.randint(3, 20)
    extra = f"{name} wants a bike that costs {goal} dollars. How many more dollars does {name} need?"
    return story, lines, left, f"How many dollars does {name} have left?", extra, goal - left


TEMPLATES: tuple[Callable[[random.Random, str], Problem], ...] = (_shopping, _collection, _schedule, _saving)


def make_word_problem(rng: random.Random) -> dict[str, str]:
    """One problem: question, reasoning (one line per operation) and answer. The template gives the plain question
    and the extra-step one; the extra step is drawn in `EXTRA_SHARE` of the rows where the template has one."""
    template = rng.choice(TEMPLATES)
    story, lines, value, plain, extra, extra_answer = template(rng, rng.choice(PEOPLE))
    if extra_answer is not None and rng.random() < EXTRA_SHARE:
        return {"question": f"{story} {extra}", "reasoning": "\n".join(lines), "answer": str(extra_answer)}
    return {"question": f"{story} {plain}", "reasoning": "\n".join(lines), "answer": str(value)}


def write_word_problem_dataset(
    directory: str | Path, num_train: int = 2000, num_test: int = 300, seed: int = 0
) -> Path:
    """The `demo:word_problems` files: 2,000 training and 300 test problems (recipes cut them to the machine)."""
    return write_dataset(directory, make_word_problem, num_train, num_test, seed)
