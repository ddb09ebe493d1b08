"""Answer parsers: the POPE reference rule, true/false, first-box extraction; fuzzed (never raise)."""
from hypothesis import given, settings
from hypothesis import strategies as st

from eval.parsing import parse_box, parse_true_false, parse_yes_no


def test_yes_no_reference_rule():
    assert parse_yes_no("Yes, there is a dog in the image.") == "yes"
    assert parse_yes_no("No, there is no dog.") == "no"
    assert parse_yes_no("There is not a dog") == "no"
    assert parse_yes_no("no") == "no"
    assert parse_yes_no("No.") == "no"
    # Only the text before the first '.' counts.
    assert parse_yes_no("Yes. But no cat.") == "yes"
    # Commas are dropped before splitting: "No," -> "No".
    assert parse_yes_no("No,") == "no"
    # Words are split on single spaces only, exactly like the reference (newline keeps "No\n" whole).
    assert parse_yes_no("No\nthere is") == "yes"
    # Anything without No/no/not, even empty or off-topic, is "yes" in the reference.
    assert parse_yes_no("") == "yes"
    assert parse_yes_no("Nothing here, nope") == "yes"
    assert parse_yes_no("NO") == "yes"


def test_true_false():
    assert parse_true_false("True") is True
    assert parse_true_false("the statement is FALSE.") is False
    assert parse_true_false("Yes it is") is True
    assert parse_true_false("false, not true") is False  # first match wins
    assert parse_true_false("untrue statement") is None  # whole words only
    assert parse_true_false("That is not true.") is False and parse_true_false("not wrong") is True
    assert parse_true_false("") is None


def test_parse_box():
    assert parse_box("[0.1, 0.2, 0.3, 0.4]") == (0.1, 0.2, 0.3, 0.4)
    assert parse_box("The box is [0.10,0.20 , 0.5,1] and [0, 0, 1, 1]") == (0.1, 0.2, 0.5, 1.0)
    assert parse_box("[1, 2, 3]") is None
    assert parse_box("[a, b, c, d]") is None
    assert parse_box("no box") is None
    assert parse_box("[-0.5, .25, 1e-1, 2.]") == (-0.5, 0.25, 0.1, 2.0)
    assert parse_box("[1, 2, 3] then [4, 5, 6, 7]") == (4.0, 5.0, 6.0, 7.0)
    assert parse_box("[1e999, 0, 0, 0]") is None  # inf is not a coordinate


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parsers_never_raise(text):
    assert parse_yes_no(text) in ("yes", "no")
    assert parse_true_false(text) in (True, False, None)
    box = parse_box(text)
    assert box is None or (len(box) == 4 and all(isinstance(v, float) for v in box))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=4, max_size=4), st.text(max_size=20))
def test_box_round_trip(values, prefix):
    text = prefix.replace("[", "(") + "[" + ", ".join(repr(float(v)) for v in values) + "]"
    assert parse_box(text) == tuple(float(v) for v in values)


# Text built from the characters the parsers look at, so brackets, numbers, signs, exponents, dots,
# commas and No/not words actually meet (plain st.text() rarely produces a "[a, b, c, d]").
_ANSWERISH = st.lists(st.sampled_from(["[", "]", ",", ", ", ".", "-", "+", "e", "E", "1", "0", "9", "1e999", " ",
                                       "No", "no", "not", "Yes", "true", "false", "\n", "nan", "inf"]), max_size=40)


@settings(max_examples=500, deadline=None)
@given(_ANSWERISH)
def test_parsers_never_raise_on_answer_like_text(parts):
    text = "".join(parts)
    assert parse_yes_no(text) in ("yes", "no")
    assert parse_true_false(text) in (True, False, None)
    box = parse_box(text)
    assert box is None or (len(box) == 4 and all(isinstance(v, float) and abs(v) != float("inf") for v in box))
    if box is not None:
        assert "[" in text and "]" in text
