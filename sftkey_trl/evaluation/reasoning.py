"""The value a chain of thought arrives at, read from its last sentence that states a number.

In it: an explicit answer ("the answer is 5") wins; premises ("Since ... ,", "because ...") are dropped; a
conclusion replaces what precedes it ("= 15.36, which rounds down to 15", ", so ... 4 days"); then the bare number
right of the last '=', else the first number that is no operand or bound, or a later one a verb presents as the
result ("75 cans would have 225 balls"). A last sentence without digits may state it in words ("three days").
"""

from __future__ import annotations

import re

from .numbers import NUMBER, NUMBER_RE, clean_number, prepare

_SENTENCE_END_RE = re.compile(r"\n+|(?<=[.!?])\s+(?=[A-Z(\"'])")
_ABBREVIATION_RE = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|vs|etc|e\.g|i\.e|approx|No)\.$")
_BARE = r"(?!\s*(?:[A-Za-z]+\s*)?(?:[-+*/×÷=^]|\\times|\\cdot))"
_SUPERLATIVE = (
    r"(?:final\s+)?answer|highest|greatest|largest|smallest|lowest|longest|shortest|fastest|slowest|cheapest|"
    r"biggest|oldest|youngest|fewest|tallest|best|closest|heaviest|lightest|earliest|latest|most|least|maximum|minimum"
)
_ANSWER_RE = re.compile(
    rf"\banswer\s*(?:is|would\s+be|will\s+be|:|=)\s*(?:[$€£]\s*)?({NUMBER}){_BARE}"
    rf"|({NUMBER})\s*(?:[a-z]+\s+)?(?:is|was)\s+(?:the|our|my)\s+(?:{_SUPERLATIVE})\b",
    re.IGNORECASE,
)
_LEADING_CLAUSE_RE = re.compile(
    r"^\s*(?:since|if|as|when|because|given|once|after|assuming|while|now\s+that)\b"
    r"(?:[^,]|,(?=\d)|,\s+and\b)*,\s+(?:then\s+)?",
    re.IGNORECASE,
)
_JUSTIFICATION_RE = re.compile(r",?\s+because\b", re.IGNORECASE)
_NUMBER_AHEAD = r"(?=\s*[$€£]?\s*-?[\d.]\d*)"
_CONNECTOR_RE = re.compile(
    rf"\b(?:which|that)\s+(?:is|equals|makes)(?:\s+(?:about|approximately|roughly|around))?{_NUMBER_AHEAD}"
    rf"|\b(?:or|i\.e\.),?{_NUMBER_AHEAD}"
    r"|\b(?:rounds?|rounded|rounding)(?:\s+(?:up|down))?\s+to\b"
    r"|\b(?:so|thus|therefore|hence|meaning|which\s+means|that\s+means|this\s+means)\b",
    re.IGNORECASE,
)
_EQUALS_RE = re.compile(r"(?<![<>!=])=(?!=)")
_FILLER = r"(?:(?:about|approximately|roughly|around|nearly|almost|exactly|only|just|in)\s+)?"
_RESULT_RE = re.compile(rf"\s*{_FILLER}[$€£]?\s*(?:(\d{{1,2}}):00\b|({NUMBER}))", re.IGNORECASE)
_CONTINUES_RE = re.compile(r",\d|\s*(?:[-+*×÷^(]|/\s*[\d$(.]|\\(?:times|cdot|div)\b)")
_OPERATOR = r"\s*(?:[-+*/×÷x]|\\times|\\cdot)\s*[$€£]?\s*"
_EXPRESSION_RE = re.compile(rf"{NUMBER}(?:{_OPERATOR}{NUMBER})+")
# A number that is given rather than found: a bound ("less than 50", "x <= 5") or a known group ("the 3 people").
_GIVEN_RE = re.compile(
    r"(?:\b(?:less|more|fewer|greater|higher|lower)\s+than|\bat\s+(?:least|most)|\b(?:above|below|under|over|up\s+to)"
    r"|\b(?:the|these|those|other|remaining)|[<>≤≥]=?)\s*[$€£]?\s*$",
    re.IGNORECASE,
)
_PRESENTS_RESULT_RE = re.compile(
    r"(?:\b(?:would|will|should|could|can)\s+[a-z]+|'ll\s+[a-z]+|\b(?<!to )(?:equals?|makes?|gives?|yields?|totals?)"
    r"|\b(?:is|are|was|were))\s+(?:a\s+total\s+of\s+)?[$€£]?\s*$",
    re.IGNORECASE,
)
_WINDOW = 60
_UNITS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
_UNITS += "seventeen eighteen nineteen"
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety"
_NUMBER_WORDS = {word: str(i) for i, word in enumerate(_UNITS.split())}
_NUMBER_WORDS.update({word: str(10 * i) for i, word in enumerate(_TENS.split(), 2)})
_NUMBER_WORD_RE = re.compile(rf"\b(?:{'|'.join(_NUMBER_WORDS)})\b(?=\s+[a-z])", re.IGNORECASE)


def _has_number(text: str) -> bool:
    return NUMBER_RE.search(text) is not None


def _sentences(text: str) -> list[str]:
    """Lines split into sentences, keeping "Mr. Tan" and the like together."""
    sentences: list[str] = []
    for piece in _SENTENCE_END_RE.split(text):
        if sentences and _ABBREVIATION_RE.search(sentences[-1]) and piece.strip():
            sentences[-1] += " " + piece
        elif piece.strip():
            sentences.append(piece)
    return sentences


def _equals_result(clause: str) -> str | None:
    """The bare number right of the last '=' (``= $7200/year`` -> 7200, ``= 2:00 pm`` -> 2), or None."""
    equals = list(_EQUALS_RE.finditer(clause))
    if not equals:
        return None
    m = _RESULT_RE.match(clause, equals[-1].end())
    if m is not None and not _CONTINUES_RE.match(clause, m.end()):
        return m.group(1) or m.group(2)
    if re.fullmatch(r"\s*[A-Za-z]\s*\.?\s*", clause[equals[-1].end() :]):  # "... so 6 = x"
        lhs = list(NUMBER_RE.finditer(clause, 0, equals[-1].start()))
        if lhs and not clause[lhs[-1].end() : equals[-1].start()].strip():
            return lhs[-1].group(0)
    return None


def _clause_value(clause: str) -> str | None:
    if (result := _equals_result(clause)) is not None:
        return result
    numbers = list(NUMBER_RE.finditer(clause))
    if not numbers:
        return None
    operands = {n.start() for e in _EXPRESSION_RE.finditer(clause) for n in NUMBER_RE.finditer(clause, *e.span())}
    free = [n for n in numbers if n.start() not in operands]
    if operands and free and (later := [n for n in free if n.start() > max(operands)]):
        free = later
    if not free:  # the clause ends on arithmetic without a result: its last number
        return numbers[-1].group(0)
    # Both patterns end at the number, so a bounded look-back window keeps long clauses linear.
    free = [n for n in free if not _GIVEN_RE.search(clause, max(0, n.start() - _WINDOW), n.start())] or free
    result = free[0]
    for n in free[1:]:
        if _PRESENTS_RESULT_RE.search(clause, max(result.end(), n.start() - _WINDOW), n.start()):
            result = n
    return result.group(0)


def _sentence_value(sentence: str) -> str | None:
    """The value `sentence` states, or None when its numbers are only premises."""
    if answers := list(_ANSWER_RE.finditer(sentence)):
        return answers[-1].group(1) or answers[-1].group(2)
    while m := _LEADING_CLAUSE_RE.match(sentence):
        if not _has_number(sentence[m.end() :]):
            return None
        sentence = sentence[m.end() :]
    if (m := _JUSTIFICATION_RE.search(sentence)) and _has_number(sentence[: m.start()]):
        sentence = sentence[: m.start()]
    last_number = list(NUMBER_RE.finditer(sentence))[-1].start() if _has_number(sentence) else -1
    for m in reversed(list(_CONNECTOR_RE.finditer(sentence))):
        if m.end() <= last_number:  # the last conclusion that still has a number after it
            sentence = sentence[m.end() :]
            break
    return _clause_value(sentence)


def reasoning_final_value(reasoning: str | None) -> str | None:
    """The value the reasoning arrives at (see the module docstring) without thousands separators, or None."""
    if not reasoning:
        return None
    sentences = _sentences(prepare(reasoning))
    if sentences and not _has_number(sentences[-1]):
        sentences[-1] = _NUMBER_WORD_RE.sub(lambda m: _NUMBER_WORDS[m.group(0).lower()], sentences[-1])
    for sentence in reversed(sentences):
        if _has_number(sentence) and (value := _sentence_value(sentence)) is not None:
            return clean_number(value)
    return None
