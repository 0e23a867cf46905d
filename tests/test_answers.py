"""The answer rule: same_answer over GSM8K-, MATH- and demo-style responses and references."""

import threading

import pytest

from r2r import final_answer, same_answer

GSM8K_FIELD = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)
DEMO = (
    "7 + 6 + 0 = 1 3 , write 3 c 1 ; 3 + 5 + 1 = 9 , write 9 c 0 ; 8 + 9 + 0 = 1 7 , "
    "write 7 c 1 ; 4 + 2 + 1 = 7 , write 7 c 0 ; so 7 7 9 3"
)

CASES = [
    # GSM8K: the answer field as shipped, "####", "the answer is", trailing words and units
    ("Natalia sold 72 clips. The answer is 72.", GSM8K_FIELD, True),
    ("So in total she sold \\boxed{72} clips.", GSM8K_FIELD, True),
    ("April: 48, May: 24, so she sold 48 + 24 = 27", GSM8K_FIELD, False),
    ("The answer is 27.", GSM8K_FIELD, False),
    (GSM8K_FIELD, "72", True),
    ("#### 72", "72", True),
    ("She earns 18 dollars.", "18", True),
    ("She earns 18 dollars.", "81", False),
    ("The answer is 72, in total.", "72", True),
    ("The answer is: $18.", "18", True),
    ("He pays \\$18.00 in all. The answer is \\$18", "18", True),
    ("The final answer is **42**.", "42", True),
    ("The answer is 15.", "150", False),
    ("Natalia sold 72 clips in April and May.", "72", True),
    # thousands separators, decimals, signs
    ("The total is 1,000 apples.", "1000", True),
    ("The answer is 1,000.", "100", False),
    ("The answer is $9{,}500$.", "9500", True),
    ("\\boxed{9\\,500}", "9500", True),
    ("\\boxed{1,234,567}", "1234567", True),
    ("\\boxed{3.50}", "3.5", True),
    ("The answer is 3.5.", "35", False),
    ("The answer is 0.5", ".5", True),
    ("\\boxed{\u22125}", "-5", True),
    ("\\boxed{-5}", "5", False),
    ("The temperature is \u22123 degrees.", "-3", True),
    # MATH: boxes, fractions, x =, text units
    ("Thus $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", True),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", True),
    ("\\boxed{\\frac12}", "\\frac{1}{2}", True),
    ("\\boxed{\\frac ab}", "\\frac{a}{b}", True),
    ("\\boxed{1/2}", "\\frac{1}{2}", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{\\frac{1}{2}}", "2", False),
    ("\\boxed{\\frac{2}{3}}", "\\frac{3}{2}", False),
    ("\\boxed{-\\frac{1}{2}}", "\\frac{-1}{2}", True),
    ("so the answer is \\boxed 5", "5", True),
    ("\\fbox{12}", "12", True),
    ("The side is \\boxed{5 cm}.", "5", True),
    ("The side is \\boxed{5\\text{ cm}}.", "5", True),
    ("We get $\\boxed{x = 3}$.", "3", True),
    ("Solving, x = 3", "x = 3", True),
    ("First \\boxed{4}, then correcting: \\boxed{\\{1, \\{2\\}\\}}", "\\{1, \\{2\\}\\}", True),
    ("\\boxed{(1,2)}", "(2,1)", False),
    ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)", True),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", True),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", True),
    ("\\boxed{50\\%}", "50", True),
    ("\\boxed{90^\\circ}", "90", True),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
    ("The area is $\\frac{3}{4}$.", "\\frac34", True),
    ("The box is cut short: \\boxed{\\frac{1}{2", "\\frac{1}{2}", False),
    ("I cannot tell.", "72", False),
    # the demo task
    (DEMO, "7793", True),
    (DEMO, "7739", False),
    (DEMO, 7793, True),
    ("4 + 2 + 1 = 7 , write 7 c 0 ; thus 7 7 9 3 .", "7793", True),
    ("so the answer is 1 2", "12", True),
]


@pytest.mark.parametrize("response, reference, expected", CASES)
def test_same_answer(response, reference, expected):
    assert same_answer(response, reference) is expected


def test_two_responses():
    """label.py's use: the LLM's response and a branch, both extracted alike."""
    assert same_answer("The answer is $\\frac{1}{2}$.", "so we get \\boxed{0.5}")
    assert same_answer("... so 7 7 9 3", DEMO)
    assert not same_answer("... so 7 7 3 9", DEMO)
    assert same_answer("She has 1,000 apples.", "The answer is 1000.")
    assert not same_answer("The answer is 15.", "The answer is 150.")
    assert not same_answer("no answer here", "no answer here either")


def test_final_answer_prints():
    assert final_answer(GSM8K_FIELD) == "72"
    assert final_answer(DEMO) == "7793"
    assert final_answer("$x = \\dfrac12$.") == "\\frac{1}{2}"
    assert final_answer("\\$1{,}000 dollars") == "1000"
    assert final_answer("-1/2") == "-\\frac{1}{2}"
    assert final_answer("cut short \\boxed{12") is None
    assert final_answer(None) is None


def test_other_thread():
    """math-verify's signal timeouts would fail outside the main thread: same_answer must not."""
    out = []
    t = threading.Thread(target=lambda: out.append(same_answer("\\boxed{0.5}", "\\frac{1}{2}")))
    t.start()
    t.join()
    assert out == [True]
