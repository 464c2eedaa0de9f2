"""Answer extraction from generations, matching against gold, and the paper's composite score.

An empty answer inside tags is ``None`` (no number fallback). Two plain numbers compare only as numbers; "numeric"
never uses math_verify (``2+3`` is not 5), "math" does unless the prediction hedges (``3 or 4``). math_verify gets
5 s signal timeouts on the main thread only (signals fail elsewhere); pathological inputs skip it.
"""

from __future__ import annotations

import inspect
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

from ..data.formatting import RESPONSE_FORMATS, Tags, one_answer_slot
from .choices import committed_letter
from .numbers import MINUS, NOT_UNITS, is_hedged, last_number, numbers_equal, parse_number

ANSWER_TYPES = ("numeric", "math", "multiple_choice", "text")


@dataclass(frozen=True)
class Extraction:
    """What `extract_answer` found in one generation."""

    answer: str | None
    method: str
    format_ok: bool
    reasoning: str | None


_TRAILING_PUNCT = ".!?,;:"


def _thinking(text: str, tags: Tags, end: int) -> str | None:
    """Reasoning in text[:end]: after the last thinking-open tag up to its close (or `end`), else before a close."""
    start = text.rfind(tags.thinking_open, 0, end)
    if start != -1:
        segment = text[start + len(tags.thinking_open) : end]
        close = segment.find(tags.thinking_close)
        segment = segment[:close] if close != -1 else segment
    else:
        close = text.rfind(tags.thinking_close, 0, end)
        segment = text[:close] if close != -1 else ""
    return segment.strip() or None


def _extract_tags(text: str, tags: Tags) -> Extraction | None:
    e = re.escape
    strict = re.fullmatch(
        f"{e(tags.thinking_open)}(.*?){e(tags.thinking_close)}\n{e(tags.answer_open)}(.*?){e(tags.answer_close)}",
        text.strip(),
        re.DOTALL,
    )
    all_tags = (tags.thinking_open, tags.thinking_close, tags.answer_open, tags.answer_close)
    if strict and not any(tag in group for group in strict.groups() for tag in all_tags):
        return Extraction(strict.group(2).strip() or None, "strict_tags", True, strict.group(1).strip() or None)
    opens = [m.start() for m in re.finditer(e(tags.answer_open), text)]
    if not opens:
        return None
    for pos in reversed(opens):  # the last answer tag with some content; an unclosed one runs to the next tag/end
        body = text[pos + len(tags.answer_open) :]
        cut = [i for i in (body.find(tags.answer_close), body.find(tags.answer_open)) if i != -1]
        answer = (body[: min(cut)] if cut else body).strip()
        if answer:
            return Extraction(answer, "lenient_tags", False, _thinking(text, tags, pos))
    return Extraction(None, "lenient_tags", False, _thinking(text, tags, opens[-1]))


@lru_cache(maxsize=32)
def _template_regex(template: str) -> re.Pattern[str]:
    if not one_answer_slot(template):
        raise ValueError(f"answer_template must contain '{{answer}}' exactly once, got {template!r}")
    prefix, suffix = template.split("{answer}")
    core = suffix.rstrip(_TRAILING_PUNCT)
    punct = suffix[len(core) :]

    def escape(part: str) -> str:
        return r"[ \t]+".join(re.escape(word) for word in re.split(r"\s+", part))

    group = f"((?:(?!{escape(prefix)}).)+?)" if prefix.strip() else "(.+?)"  # starts at the line's last prefix
    optional = f"(?:{re.escape(punct)})?" if punct else ""
    return re.compile(escape(prefix) + group + escape(core) + optional + r"[ \t]*$", re.IGNORECASE | re.MULTILINE)


def _extract_plain(text: str, template: str) -> Extraction | None:
    matches = [m for m in _template_regex(template).finditer(text) if m.group(1).strip()]
    if not matches:
        return None
    m = matches[-1]
    line_start = text.rfind("\n", 0, m.start()) + 1
    format_ok = not text[m.end() :].strip()
    return Extraction(m.group(1).strip(), "answer_line", format_ok, text[:line_start].strip() or None)


def extract_answer(
    generation: str,
    response_format: str = "tags",
    tags: Tags = Tags(),  # noqa: B008 - frozen dataclass, safe as a default
    answer_template: str = "The answer is {answer}.",
) -> Extraction:
    """Extract the final answer (and reasoning) from one generation: "tags" strict when exactly the paper's layout,
    else the last answer tag with content; "plain" the last line matching `answer_template` (format_ok when only
    whitespace follows); else the last number (never format_ok)."""
    if response_format not in RESPONSE_FORMATS:
        raise ValueError(f"response_format must be one of {RESPONSE_FORMATS}, got {response_format!r}")
    text = generation or ""
    if response_format == "tags":
        found = _extract_tags(text, tags)
        reasoning = _thinking(text, tags, len(text))
    else:
        found = _extract_plain(text, answer_template)
        reasoning = None
    if found is not None:
        return found
    number = last_number(text)
    return Extraction(number, "last_number" if number is not None else "none", False, reasoning)


_PLACEHOLDERS = {"", "n/a", "na", "none", "null", "nan", "unknown", "?", "-"}
_DELIMITED_RE = re.compile(r"\$|\\\(|\\\[|\\boxed")
_RISKY_RE = re.compile(r"\^\s*\{[^}]*\^|\^\s*\(?[\d.]+\)?\s*\^|\d{4,}\s*\)?\s*!|\}\s*\)?\s*!|\d{60,}")
_MAX_MATH_VERIFY_CHARS = 500


@cache
def _timeout_kwarg(func: Callable[..., Any], name: str) -> bool:
    return name in inspect.signature(func).parameters


def _mv_call(func: Callable[..., Any], timeout_name: str, *args: Any, **kwargs: Any) -> Any:
    if _timeout_kwarg(func, timeout_name):
        kwargs[timeout_name] = 5 if threading.current_thread() is threading.main_thread() else None
    return func(*args, **kwargs)


def _only_words(rest: str) -> bool:
    """Whether `rest` (what math_verify left unparsed) is prose: no digits/LaTeX, 1-letter words or hedges."""
    if re.search(r"[\d\\^_{}=+*/()\[\]]", rest):
        return False
    return all(len(w) > 1 and w.lower() not in NOT_UNITS for w in re.findall(r"[A-Za-z]+", rest))


@lru_cache(maxsize=4096)
def _mv_candidates(text: str) -> tuple[list[Any], ...]:
    """math_verify parses of `text`: as ``$text$``, and as-is when only words are left unparsed (so ``2\\sqrt{2}``
    never reads as ``2``)."""
    s = text.translate(MINUS).replace("**", "").strip()
    if not s or len(s) > _MAX_MATH_VERIFY_CHARS or _RISKY_RE.search(s):
        return ()
    try:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    except ImportError:  # pragma: no cover - math-verify is a dependency
        return ()
    configs = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]

    def run(source: str) -> list[Any]:
        try:
            return list(_mv_call(parse, "parsing_timeout", source, extraction_config=configs))
        except Exception:
            return []

    if _DELIMITED_RE.search(s):
        return tuple(r for r in (run(s),) if r)
    results = []
    if wrapped := run("$" + re.sub(r"(?<!\\)%", r"\\%", s) + "$"):
        results.append(wrapped)
    direct = run(s)
    if direct and isinstance(direct[-1], str) and direct[-1] in s and _only_words(s.replace(direct[-1], "", 1)):
        results.append(direct)
    return tuple(results)


def _math_verify_match(predicted: str, gold: str) -> bool:
    golds = _mv_candidates(gold)
    if not golds:
        return False
    from math_verify import verify

    for candidate in _mv_candidates(predicted):
        try:
            if _mv_call(verify, "timeout_seconds", golds[0], candidate):  # gold first
                return True
        except Exception:
            continue
    return False


def _default_normalizer(text: str) -> str:
    """Lowercase, collapse whitespace, strip trailing punctuation and a leading article (a/an/the)."""
    s = " ".join(text.lower().split()).rstrip(_TRAILING_PUNCT).strip()
    return re.sub(r"^(?:a|an|the)\s+", "", s)


def gold_is_parseable(gold: str, answer_type: str) -> bool:
    """Whether `gold` can be parsed for `answer_type` (never matched otherwise): a plain number, for math also a
    math_verify parse; one letter A-E; non-empty normalised text."""
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {answer_type!r}")
    if answer_type == "multiple_choice":
        return len(gold.strip()) == 1 and gold.strip().upper() in "ABCDE"
    if answer_type == "text":
        return bool(_default_normalizer(gold))
    if gold.strip().lower() in _PLACEHOLDERS:
        return False
    if parse_number(gold) is not None:
        return True
    return answer_type == "math" and bool(_mv_candidates(gold))


def answers_match(
    predicted: str | None, gold: str, answer_type: str = "math", normalizer: Callable[[str], str] | None = None
) -> bool:
    """Whether `predicted` answers `gold` for `answer_type`: equal plain numbers (math: else math_verify, never for a
    hedged prediction), the committed letter, or equal text after `normalizer`; False for None or an unparseable
    gold."""
    if predicted is None or not gold_is_parseable(gold, answer_type):
        return False
    if answer_type == "multiple_choice":
        return committed_letter(predicted) == gold.strip().upper()
    if answer_type == "text":
        norm = normalizer or _default_normalizer
        return bool(norm(gold)) and norm(predicted) == norm(gold)
    if not predicted.strip():
        return False
    gold_number, predicted_number = parse_number(gold), parse_number(predicted)
    if gold_number is not None and predicted_number is not None:
        return numbers_equal(predicted_number, gold_number)
    if answer_type == "numeric" or (is_hedged(predicted) and not is_hedged(gold)):
        return False
    return _math_verify_match(predicted, gold)


def composite_score(accuracy: float, format_accuracy: float) -> float:
    """The paper's composite metric: 0.7 * accuracy + 0.3 * format accuracy (both fractions in [0, 1])."""
    for name, value in (("accuracy", accuracy), ("format_accuracy", format_accuracy)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")
    return 0.7 * accuracy + 0.3 * format_accuracy
