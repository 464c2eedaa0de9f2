"""Plain numbers in answers and reasoning: LaTeX clean-up, numbers in prose, a whole answer as one number, equality.

Thousands groups follow a leading group not starting with 0 (``1 234`` is 1234, ``0,111`` is 0.111); a comma that
cannot group thousands is decimal (``1,22``); ``$7200/year`` is a rate, not a fraction; hedge words (``maybe``)
are never units, so ``4 maybe`` is no number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

MINUS = str.maketrans({"\u2212": "-", "\ufe63": "-", "\uff0d": "-"})
_SPACES = "[ \u00a0\u2009\u202f]"
_FRAC_RE = re.compile(r"\\[dt]?frac\{\s*(-?\d+)\s*\}\s*\{\s*(\d+)\s*\}")
_WRAPPER_RE = re.compile(r"\\(?:boxed|text|textbf|textrm|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}")

# A number inside prose (not a clock time like 6:07). The spaced-thousands form refuses a hyphen after it
# ("12 200-kilobyte" is 12, then 200).
_SCAN_NUM = (
    r"(?:\d+/\d+(?![.\d])"
    r"|[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?"
    rf"|[1-9]\d{{0,2}}(?:{_SPACES}\d{{3}})+(?![\d-])"
    r"|\d+(?:\.\d+)?|\.\d+)"
)
NUMBER = rf"(?:(?<![\w)\]}}])-)?(?<![\w.,/])(?<!\d:){_SCAN_NUM}(?!\d|/(?![A-Za-z])|:\d)"
NUMBER_RE = re.compile(NUMBER)


def prepare(text: str) -> str:
    """Unicode minus -> '-', ``\\frac{a}{b}`` -> ``a/b``, unwrap ``\\boxed{}``/``\\text{}``, drop markdown bold."""
    text = text.translate(MINUS).replace("**", "")
    for _ in range(3):  # inside out: \boxed{\frac{1}{2}} needs the fraction rewritten before the box is unwrapped
        text = _WRAPPER_RE.sub(r"\1", _FRAC_RE.sub(r"\1/\2", text))
    text = text.replace("{,}", ",")
    return text.replace("\\$", "$").replace("\\%", "%").replace("\\!", "").replace("\\,", "")


def clean_number(token: str) -> str:
    """A found number without its thousands separators."""
    return re.sub(rf"[,{_SPACES[1:-1]}]", "", token)


def last_number(text: str) -> str | None:
    """The last number in `text` (thousands separators removed), or None."""
    matches = list(NUMBER_RE.finditer(prepare(text)))
    return clean_number(matches[-1].group(0)) if matches else None


# ------------------------------------------------------------------------------------------ a whole answer as a number
_WHOLE_NUM = (
    r"(?P<frac>\d+/\d+)"
    r"|(?P<thousands>[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?)"
    rf"|(?P<spaced>[1-9]\d{{0,2}}(?:{_SPACES}\d{{3}})+(?:[.,]\d+)?)"
    r"|(?P<comma>\d+,\d+)"
    r"|(?P<plain>\d+(?:\.\d+)?|\.\d+)"
)
_UNIT_TERM = r"(?:°|°?[A-Za-z]+(?:\^\{?-?\d\}?|[²³])?)"
_UNIT = rf"{_UNIT_TERM}(?:\s*(?:/|\\cdot|·)?\s*{_UNIT_TERM})*"
_WHOLE_RE = re.compile(
    rf"(?P<sign>[-+])?\s*(?:{_WHOLE_NUM})\s*(?P<percent>%|percent\b)?\s*(?P<unit>{_UNIT})?", re.IGNORECASE
)
_ANSWER_PREFIX_RE = re.compile(r"^(?:(?:the\s+)?(?:final\s+)?answer\s*(?:is\b|:|=)|[a-z]\s*=)\s*", re.IGNORECASE)
NOT_UNITS = {"pi", "sqrt", "inf", "infinity", "or", "and", "maybe", "perhaps", "possibly", "either", "probably"}
_UNIT_LETTERS = set("mslLgNJWVAKhC")  # one-letter units, accepted only in a compound like m/s or m^2


@dataclass(frozen=True)
class Number:
    """A parsed answer: its value and whether it was written as a percentage."""

    value: Fraction
    percent: bool


def _unit_ok(unit: str) -> bool:
    words = re.findall(r"[A-Za-z]+", unit)
    if any(w.lower() in NOT_UNITS for w in words):
        return False
    compound = bool(re.search(r"[/^²³·]|\\cdot", unit)) or "°" in unit
    return all(len(w) > 1 or (compound and w in _UNIT_LETTERS) for w in words)


def parse_number(text: str) -> Number | None:
    """A whole answer as one number, ignoring currency, thousands separators, ``x =``, a trailing '.' and units
    (``5 m/s``); None when anything else is left (an expression, two numbers, a hedge)."""
    s = prepare(text).replace("^\\circ", "°").replace("^{\\circ}", "°")
    s = re.sub(r"[$€£]", "", s).strip().rstrip(".").strip()
    s = _ANSWER_PREFIX_RE.sub("", s)
    m = _WHOLE_RE.fullmatch(s)
    if not m or (m.group("unit") and not _unit_ok(m.group("unit"))):
        return None
    kind = next(k for k in ("frac", "thousands", "spaced", "comma", "plain") if m.group(k))
    token = m.group(kind)
    if kind == "thousands":
        token = token.replace(",", "")
    elif kind in ("comma", "spaced"):  # "1 000,5": spaces group the thousands, so a comma can only be decimal
        token = re.sub(_SPACES, "", token).replace(",", ".")
    try:
        value = Fraction(token)
    except (ValueError, ZeroDivisionError):
        return None
    return Number(-value if m.group("sign") == "-" else value, bool(m.group("percent")))


def numbers_equal(predicted: Number, gold: Number) -> bool:
    """Equal numbers: exact for an integer gold, else equal after rounding both to 6 decimals. A percentage on
    either side may also be read as a fraction of 100 (``50%`` = ``0.5``), never the other way round."""
    for g in (gold.value, gold.value / 100) if gold.percent else (gold.value,):
        for p in (predicted.value, predicted.value / 100) if predicted.percent else (predicted.value,):
            if p == g or (g.denominator != 1 and round(p, 6) == round(g, 6)):
                return True
    return False


_HEDGE_RE = re.compile(r"\b(?:or|maybe|perhaps|possibly|either|probably)\b", re.IGNORECASE)
_SPACED_DIGITS_RE = re.compile(rf"\d{_SPACES}+\d")


def is_hedged(text: str) -> bool:
    """Whether `text` offers candidates instead of one answer: a hedge word (``or``, ``maybe``...) with two or more
    numbers, or numbers separated only by spaces (``2 3``) that are not thousands groups (``1 000``)."""
    s = prepare(text)
    if _HEDGE_RE.search(s) and len(re.findall(r"\d+(?:\.\d+)?", s)) >= 2:
        return True
    without_thousands = re.sub(rf"(?<![\d.,])[1-9]\d{{0,2}}(?:{_SPACES}\d{{3}})+(?:[.,]\d+)?(?![\d.,])", "N", s)
    return bool(_SPACED_DIGITS_RE.search(without_thousands))
