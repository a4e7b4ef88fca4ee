"""Answer extraction and math grading (posttrain.rewards.math)."""

from __future__ import annotations

import threading

import pytest

from posttrain.rewards import math as rmath
from posttrain.rewards.math import extract_answer, extract_boxed, last_number, math_equal, parse_number


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{\\sqrt{x^{2}+1}}", "\\sqrt{x^{2}+1}"),
        ("\\fbox{7}", "7"),
        ("\\boxed{ {a}{b} }", "{a}{b}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("$\\boxed 5$", "5"),
        ("\\boxed{3} and an unclosed \\boxed{4", "3"),
        ("no box here 12", None),
        ("\\boxed{12", None),
        ("", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is -3.", "-3"),
        ("That is 1,234 dollars", "1234"),
        ("it costs 2.5 now", "2.5"),
        ("three quarters: 3/4", "3/4"),
        ("14-3=11", "11"),
        ("14 - 3", "3"),
        ("x = -7, y = 12,000,000", "12000000"),
        ("a list 1,2,3", "3"),
        ("no digits", None),
    ],
)
def test_last_number(text: str, expected: str | None) -> None:
    assert last_number(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("work 5 then \\boxed{7} and 9", "7"),
        ("Janet earns 9 * 2 = 18\n#### 1,234", "1234"),
        ("#### -5\nextra words 99", "-5"),
        ("I think 12 or maybe 13", "13"),
        ("nothing", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


HALF = ["1/2", "0.5", "\\frac12", "\\frac{1}{2}", "\\dfrac{1}{2}", "$\\frac{1}{2}$"]


@pytest.mark.parametrize("gold", HALF)
@pytest.mark.parametrize("pred", HALF)
def test_half_equivalences(gold: str, pred: str) -> None:
    assert math_equal(gold, pred)
    assert not math_equal(gold, "1/3")


@pytest.mark.parametrize(
    ("gold", "pred", "expected"),
    [
        ("1234", "1,234", True),
        ("-3", "-3", True),
        ("-3", "3", False),
        ("18", "18.0", True),
        ("18", "19", False),
        ("025", "25", True),
        ("0.1", "0.1000000000001", True),
        ("0.1", "0.1001", False),
        ("\\sqrt{2}", "\\sqrt 2", True),
        ("2\\sqrt{2}", "\\sqrt{8}", True),
        ("\\sqrt{2}", "2", False),
        ("[1, 2)", "[1,2)", True),
        ("[1, 2)", "(1, 2)", False),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)", True),
        ("\\frac{14}{3}", "14/3", True),
        ("\\frac{14}{3}", "4.67", False),
        ("p - q", "p-q", True),
        ("\\text{Evelyn}", "Evelyn", True),
        ("90^\\circ", "90", True),
        ("x^2+1", "1+x^2", True),
    ],
)
def test_math_equal(gold: str, pred: str, expected: bool) -> None:
    assert math_equal(gold, pred) is expected


@pytest.mark.parametrize(
    "pred", [None, "", "   ", "}{", "\\frac{", "$$", "\\boxed{", "!!@@##", "\x00\x01", "(" * 500, "1/0", "\\sqrt{-}"]
)
def test_garbage_is_false(pred: str | None) -> None:
    assert math_equal("5", pred) is False
    assert math_equal("\\frac{1}{2}", pred) is False


def test_garbage_gold_is_false() -> None:
    assert math_equal("", "5") is False
    assert math_equal("}{", "5") is False


def test_plain_numbers_skip_math_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("math-verify must not run for plain numbers")

    monkeypatch.setattr(rmath, "_parse", boom)
    assert math_equal("1/2", "0.5")
    assert math_equal("-1,234", "-1234.0")
    assert not math_equal("7", "8")
    assert not math_equal("\\frac{1}{2}", "0.5")  # LaTeX needs math-verify, which now fails -> False


def test_parse_number() -> None:
    assert parse_number("1,234") == 1234
    assert parse_number("-3/4") * 4 == -3
    assert parse_number("x") is None
    assert parse_number("1/0") is None


def test_math_equal_from_worker_thread() -> None:
    # math-verify's default SIGALRM timeouts raise outside the main thread; math_equal must not.
    from math_verify import parse

    results: dict[str, object] = {}

    def work() -> None:
        try:
            results["eq"] = math_equal("\\frac{3}{7}", "\\dfrac{3}{7}")
            results["ne"] = math_equal("\\frac{3}{7}", "\\sqrt{7}")
            try:
                parse("$\\frac{5}{9}$")
                results["raw"] = "ok"
            except ValueError:
                results["raw"] = "raised"
        except BaseException as exc:  # noqa: BLE001 - report anything to the main thread
            results["error"] = exc

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    assert "error" not in results, results.get("error")
    assert results["eq"] is True
    assert results["ne"] is False
    assert results["raw"] == "raised"  # proves the thread would crash without our handling
