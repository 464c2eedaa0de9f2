"""Multiple-choice answers read as a person reads them: `multiple_choice_replies.jsonl` holds replies in the styles
models produce, each with the letter a person reads it as committing to (null: it commits to none), written by hand
and independent of the extraction's rules. Every reply that commits to a letter scores as that letter, and only as
it; a reply that hedges between letters, or names none, scores as no letter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftkey_trl.evaluation.answers import answers_match

REPLIES = [
    json.loads(line) for line in (Path(__file__).parent / "multiple_choice_replies.jsonl").read_text().splitlines()
]
STYLES = {"leading", "answer_is", "parenthesised", "rules_out", "hedge", "no_letter"}


def test_the_set_covers_every_style_with_enough_replies():
    assert len(REPLIES) >= 50
    assert {row["style"] for row in REPLIES} == STYLES
    assert len({row["reply"] for row in REPLIES}) == len(REPLIES)


@pytest.mark.parametrize("row", REPLIES, ids=[f"{row['style']}:{row['reply'][:40]}" for row in REPLIES])
def test_a_reply_scores_as_the_letter_it_commits_to(row):
    scored = [letter for letter in "ABCDE" if answers_match(row["reply"], letter, "multiple_choice")]
    assert scored == ([row["letter"]] if row["letter"] else []), row
