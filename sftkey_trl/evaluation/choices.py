"""Which option letter (A-E) a multiple-choice reply commits to, read as a person reads it.

A reply names letters; each naming (a single letter, or a list such as "A, B and C" or "B or C") is read in its
clause: ruled out ("not A", "A and C are wrong", "rather than A", "rule out A and D"), hedged ("B or C", "between B
and D", "C is also possible") or standing. A reply that hedges commits to no letter unless a commitment ("the answer
is C") follows the hedge. Otherwise the last committed letter wins ("the answer is A. No, wait: the answer is D"),
then a single standing letter, then a letter the reply opens with ("B) Vitamin C"). Lower-case letters count only
where they cannot be words: bracketed, alone, opening the reply before punctuation, or closing a commitment ("my
answer is c."), so "a bit unclear" names no option; neither does the article "A" in "A cat is a mammal".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .numbers import prepare

_BARE_RE = re.compile(r"[(\[]?\s*([A-Ea-e])\s*[)\]]?\s*[.:)!]?")
_MENTION_RE = re.compile(r"(?<![A-Za-z0-9'])([(\[])?([A-Ea-e])(?![A-Za-z0-9'])([)\]])?")
# Words after an upper-case "A" that make it an option, not the article ("A is wrong", not "A cat")
_LETTER_VERBS = {"is", "was", "and", "or", "are", "would", "seems", "looks", "rather", "not", "because", "since",
                 "fits", "matches", "makes", "gives", "instead", "nor", "only"}  # fmt: skip
_FILLERS = r"(?:\s+(?:options?|choices?|be|the|answer|definitely|clearly|decide|between|either|just|even|it|that))*"
_NEGATED_BEFORE = re.compile(
    r"(?:\b(?:not|never|no|nor|neither|except|excluding|exclude|eliminate[ds]?|rather\s+than|instead\s+of|"
    r"rul(?:e|es|ed|ing)\s+out)|n't)" + _FILLERS + r"\s*$"
)
_NEGATED_AFTER = re.compile(
    r"^\s*(?:is|are|was|were|seems|looks)\s+(?:both\s+|also\s+|definitely\s+|clearly\s+|obviously\s+|simply\s+)?"
    r"(?:wrong|incorrect|false|not\b|out\b|ruled\s+out|eliminated|impossible)"
)
_HEDGED_BEFORE = re.compile(r"\bbetween" + _FILLERS + r"\s*$")
_HEDGED_AFTER = re.compile(
    r"^\s*(?:is|are)\s+(?:also|both|equally)\s+(?:possible|plausible|likely|correct|right|valid)"
)
_COMMITTED_BEFORE = re.compile(
    r"(?:\b(?:answer|choice|option)s?\s*(?:is|was|would\s+be|should\s+be|must\s+be|will\s+be)?\s*:?|"
    r"\b(?:choose|chose|pick|select|go\s+(?:with|for)|going\s+with|say|it'?s|it\s+is|must\s+be|leaves|so|thus|hence|"
    r"therefore))"
    r"(?:\s+(?:definitely|clearly|probably|surely|for\s+sure|option|choice|then|indeed))*\s*$"
)
_JOINERS = {",", "and", "or", "/", "&", ", and", ", or", "nor"}
_CLAUSE_END = ",.;:!?\n"  # a naming's clause, for what rules it out or hedges it
_SENTENCE_END = ".;!?\n"  # a naming's sentence, for what commits to it ("Therefore, the best answer is E")


@dataclass
class _Naming:
    """Letters named together ("B", "A, B and C", "B or C") and how the reply treats them."""

    letters: list[str]
    start: int
    end: int
    either: bool = False  # joined by "or" or "/": the reply weighs them against each other
    ruled_out: bool = False
    hedged: bool = False
    committed: bool = False


def _before(text: str, position: int, ends: str) -> str:
    start = max(text.rfind(mark, 0, position) for mark in ends) + 1
    return text[start:position].lower()


def _after(text: str, position: int) -> str:
    ends = [found for mark in _CLAUSE_END if (found := text.find(mark, position)) != -1]
    return text[position : min(ends, default=len(text))].lower()


def _is_letter(text: str, match: re.Match) -> bool:
    """Whether a lone A-E is an option letter, not a word: the article "A", or a lower-case "a"/"e" in prose."""
    opened, letter, closed = match.groups()
    rest = text[match.end() :]
    if opened or closed:
        return True
    next_word = re.match(r"\s+([a-z]+)", rest)
    if letter == "A":
        return not next_word or next_word.group(1) in _LETTER_VERBS
    if letter.isupper():
        return True
    if rest.startswith((".g", ".e")):  # e.g., i.e.
        return False
    ends_here = not rest.strip() or rest[0] in ".,;:!?)]"
    opening = match.start() == 0 and rest[:1] in (".", ")", ":")
    return ends_here and (opening or bool(_COMMITTED_BEFORE.search(_before(text, match.start(), _SENTENCE_END))))


def _namings(text: str) -> list[_Naming]:
    """The letters `text` names, lists of them joined, each read in its clause."""
    namings: list[_Naming] = []
    for match in _MENTION_RE.finditer(text):
        if not _is_letter(text, match):
            continue
        letter = match.group(2).upper()
        gap = text[namings[-1].end : match.start()].lower() if namings else ""
        joiner = " ".join(re.sub(r"\b(?:options?|choices?|maybe|perhaps|possibly)\b", " ", gap).split())
        if namings and joiner in _JOINERS:
            namings[-1].letters.append(letter)
            namings[-1].end = match.end()
            namings[-1].either |= "or" in joiner.split() or "/" in joiner
        else:
            namings.append(_Naming([letter], match.start(), match.end()))
    for naming in namings:
        before, after = _before(text, naming.start, _CLAUSE_END), _after(text, naming.end)
        naming.ruled_out = bool(_NEGATED_BEFORE.search(before) or _NEGATED_AFTER.match(after))
        hedged = naming.either or _HEDGED_BEFORE.search(before) or _HEDGED_AFTER.match(after)
        naming.hedged = bool(hedged) and not naming.ruled_out
        naming.committed = bool(_COMMITTED_BEFORE.search(_before(text, naming.start, _SENTENCE_END)))
    return namings


def committed_letter(text: str) -> str | None:
    """The option letter A-E `text` commits to (see the module's docstring), else None."""
    s = re.sub(r"[$*]", "", prepare(text)).strip()
    if bare := _BARE_RE.fullmatch(s):
        return bare.group(1).upper()
    namings = _namings(s)
    standing = [n for n in namings if not n.ruled_out and not n.hedged]
    committed = [n for n in standing if n.committed and len(n.letters) == 1]
    hedges = [n for n in namings if n.hedged]
    if hedges:  # a hedge commits to nothing, unless a commitment follows it
        return next((n.letters[0] for n in reversed(committed) if n.start > hedges[-1].start), None)
    if committed:
        return committed[-1].letters[0]
    letters = {letter for n in standing for letter in n.letters}
    if len(letters) == 1 and all(len(n.letters) == 1 for n in standing):
        return letters.pop()
    if standing and standing[0].start == 0 and len(standing[0].letters) == 1:  # "B) Vitamin C"
        return standing[0].letters[0]
    return None
