"""Math answer extraction and grading.

Extraction is plain string work (no sympy). Grading compares a gold answer with a predicted one:
plain numbers on a fast exact path, everything else with math-verify (gold first, as
`verify(parse(gold), parse(pred))`). math-verify times itself out with SIGALRM, which only works in
the main thread; elsewhere we call it with its timeouts disabled instead of letting it raise.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from fractions import Fraction
from functools import lru_cache
from typing import Any

__all__ = ["extract_boxed", "last_number", "extract_answer", "math_equal", "parse_number"]

logger = logging.getLogger(__name__)

_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
# A number: 1,234 or 1234, optional decimals (or just .5), optional "/denominator". The minus sign
# counts only when it is not a binary minus (not preceded by a word character or a closing bracket).
_NUMBER = re.compile(
    r"(?:(?<![\w.)\]}])-)?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:/(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)?"
)
_PLAIN_NUMBER = re.compile(r"[+-]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:/(?:\d+)(?:\.\d+)?)?")
_HASH_MARKER = re.compile(r"####\s*([^\n]*)")
_FLOAT_REL_TOL = 1e-9


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the brace group opening at text[start] == "{" and the index after it."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":  # an escaped character (\{, \}) never opens or closes a group
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
        i += 1
    return None


def extract_boxed(text: str | None) -> str | None:
    """Content of the last complete \\boxed{...} (or \\fbox{...}) in `text`, nested braces kept.

    `\\boxed 5` (the brace-less form) is accepted too. Returns None when there is no complete box.
    """
    if not text:
        return None
    found: str | None = None
    for match in _BOXED.finditer(text):
        pos = match.end()
        while pos < len(text) and text[pos] == " ":
            pos += 1
        if pos < len(text) and text[pos] == "{":
            group = _braced(text, pos)
            if group is not None:
                found = group[0].strip()
        elif pos > match.end():  # "\boxed 5": the token up to whitespace or "$"
            token = re.match(r"[^\s$]+", text[pos:])
            if token:
                found = token.group(0)
    return found


def last_number(text: str | None) -> str | None:
    """The last number in `text` ("-3", "1234" for "1,234", "2.5", "3/4"), thousands commas removed."""
    if not text:
        return None
    matches = _NUMBER.findall(text)
    return matches[-1].replace(",", "") if matches else None


def extract_answer(text: str | None) -> str | None:
    """The final answer of a completion: the last box, else a `#### N` marker, else the last number."""
    if not text:
        return None
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    markers = _HASH_MARKER.findall(text)
    if markers:
        marked = markers[-1].strip()
        number = _PLAIN_NUMBER.search(marked)
        if number:
            return number.group(0).replace(",", "")
        if marked:
            return marked
    return last_number(text)


def parse_number(text: str) -> Fraction | None:
    """`text` as an exact rational when it is a plain number ("-1,234", "2.50", "3/4"), else None."""
    s = text.strip()
    if not _PLAIN_NUMBER.fullmatch(s):
        return None
    try:
        return Fraction(s.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _numbers_equal(gold: Fraction, pred: Fraction) -> bool:
    if gold.denominator == 1 and pred.denominator == 1:
        return gold == pred
    return gold == pred or math.isclose(float(gold), float(pred), rel_tol=_FLOAT_REL_TOL, abs_tol=0.0)


def _clean(text: str) -> str:
    s = text.strip()
    while len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s[1:-1].strip()
    return s


@lru_cache(maxsize=4096)
def _parse(text: str, threaded: bool) -> tuple[Any, ...]:
    # Sympy results are immutable, so caching is safe; golds repeat once per completion in GRPO.
    from math_verify import parse

    timeout = None if threaded else 5
    parsed = parse(f"${text}$", parsing_timeout=timeout)  # type: ignore[arg-type]
    if not parsed:
        parsed = parse(text, parsing_timeout=timeout)  # type: ignore[arg-type]
    return tuple(parsed)


def math_equal(gold: str, pred: str | None) -> bool:
    """Whether `pred` is mathematically the same answer as `gold`. Never raises; garbage is False.

    Both plain numbers: exact comparison of rationals (so 1/2 == 0.5), then a relative tolerance of
    1e-9 when either side is not an integer; no sympy. Otherwise math-verify, gold first. In threads
    other than the main one math-verify runs without its SIGALRM timeouts.
    """
    try:
        if pred is None or gold is None:
            return False
        gold_s, pred_s = _clean(str(gold)), _clean(str(pred))
        if not gold_s or not pred_s:
            return False
        gold_n, pred_n = parse_number(gold_s), parse_number(pred_s)
        if gold_n is not None and pred_n is not None:
            return _numbers_equal(gold_n, pred_n)
        if gold_s.replace(" ", "") == pred_s.replace(" ", ""):
            return True
        from math_verify import verify

        threaded = threading.current_thread() is not threading.main_thread()
        gold_p, pred_p = _parse(gold_s, threaded), _parse(pred_s, threaded)
        if not gold_p or not pred_p:
            return False
        return bool(verify(list(gold_p), list(pred_p), timeout_seconds=None if threaded else 5))  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - a grader must never crash training
        logger.debug("math_equal(%r, %r) failed: %s", gold, pred, exc)
        return False
    except BaseException as exc:  # math-verify's TimeoutException derives from BaseException
        if type(exc).__name__ == "TimeoutException":
            return False
        raise
